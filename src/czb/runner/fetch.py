"""Fetching dataset files: local paths, ``file://``, ``http(s)://`` and ``s3://``.

Remote files are downloaded once into ``CZB_CACHE_DIR/downloads`` and reused
while the remote object is unchanged. The cache layout is::

    downloads/
      <sha1(uri)[:16]>/                 one folder per URI
        <sha1(etag|size)[:16]>/         one folder per version of the remote object
          <basename>                    the file, under its own name
          <basename>.part               an unfinished download (resumed next time)
          .czb-entry.json               sidecar: uri, etag, size, sha256, fetched_at

Keying by URI and the remote's ETag and size (not by file name) means a changed
remote object gets a new entry, two URIs with the same file name never collide,
and the file still carries a name a human recognises.

Digests of local files that were checked against a spec's ``sha256`` are
remembered in ``CZB_CACHE_DIR/hashes`` keyed by path and the file's size, mtime,
ctime and inode, so a large local file is hashed once, not on every run, and a
file edited in place is hashed again even if its size and mtime were put back
(the ctime cannot be set back). Sidecars of downloads carry the same stamp.

A download that is not the kind of file its name says (an HTML login page served
with status 200 for an ``.h5ad``, a JSON or XML error body) is deleted, never
cached, and the error says what was received (its type and size, not its content).

``boto3``, ``requests`` and ``rich`` are imported inside the functions that use
them so that importing this module (and starting the CLI) stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import re
import shutil
import stat
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from czb.errors import DatasetWarning, FetchError
from czb.terminal import human_bytes

__all__ = [
    "cache_entries",
    "cached_sha256",
    "describe_content",
    "expected_kind",
    "fetch",
    "file_sha256",
    "is_remote",
    "known_sha256",
]

REMOTE_SCHEMES = frozenset({"http", "https", "s3"})

_SIDECAR = ".czb-entry.json"
_CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
_CONNECT_TIMEOUT_S = 15
_READ_TIMEOUT_S = 60
#: GET attempts per fetch; a new attempt is made only if the previous one made progress.
_MAX_ATTEMPTS = 3


# --------------------------------------------------------------------------- public API


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names a file that has to be downloaded (``http(s)://`` or ``s3://``).

    Parameters
    ----------
    uri
        A dataset URI or a local path.

    Returns
    -------
    bool
        ``True`` for ``http://``, ``https://`` and ``s3://`` URIs; ``False`` for local
        paths and ``file://`` URIs (and for anything else).
    """
    return _scheme(uri) in REMOTE_SCHEMES


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, read in chunks (memory use does not grow with the file).

    Parameters
    ----------
    path
        The file to read.

    Returns
    -------
    str
        The hex digest (64 lowercase characters).
    """
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def cached_sha256(path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> str | None:
    """The SHA-256 that czb already recorded for ``path``, without hashing it again.

    Reads the sidecar next to a downloaded file, or, for a local file that
    :func:`fetch` verified, the record under ``cache_dir/hashes``. A record only
    counts if the file's size, modification and change times and inode still match
    it (a file edited in place with its size and mtime put back has a new ctime).

    Parameters
    ----------
    path
        A path returned by :func:`fetch`.
    cache_dir
        czb's cache folder; defaults to ``CZB_CACHE_DIR``. Only needed for local files.

    Returns
    -------
    str or None
        The hex digest, or ``None`` when none is recorded or the file changed since.
    """
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    meta = _read_json(path.parent / _SIDECAR)
    if meta is not None and meta.get("file") == path.name:
        if _same_stamp(meta, st):
            return meta.get("sha256")
        return None
    if cache_dir is None:
        from czb.settings import get_settings

        cache_dir = get_settings().cache_dir
    return _local_hash_lookup(Path(cache_dir), path, st)


def known_sha256(path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> str:
    """The SHA-256 of ``path``: the recorded one when still valid, else hashed once and recorded.

    A large local dataset is hashed on its first use only, not on every run.
    """
    if cache_dir is None:
        from czb.settings import get_settings

        cache_dir = get_settings().cache_dir
    digest = cached_sha256(path, cache_dir=cache_dir)
    if digest is None:
        path = Path(path)
        before = path.stat()
        digest = file_sha256(path)
        with contextlib.suppress(OSError):  # a vanished file is reported by the caller's read
            after = path.stat()
            # Remembered only if the file did not change while it was hashed.
            if _stamp(before) == _stamp(after):
                _local_hash_store(Path(cache_dir), path, after, digest)
    return digest


def cache_entries(cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Every finished download in the cache, for listing and cleaning.

    Reads the sidecars under ``cache_dir/downloads``; writes nothing. Unfinished
    downloads (``.part`` files) are not listed.

    Parameters
    ----------
    cache_dir
        czb's cache folder; defaults to ``CZB_CACHE_DIR``.

    Returns
    -------
    list of dict
        One dict per entry, sorted by URI and newest first within a URI, with the
        sidecar's keys (``uri``, ``etag``, ``size``, ``last_modified``, ``sha256``,
        ``fetched_at``, ``file``) plus ``path`` (the cached file, a :class:`~pathlib.Path`)
        and ``version_dir`` (the folder holding the entry; delete it to drop the entry).
    """
    if cache_dir is None:
        from czb.settings import get_settings

        cache_dir = get_settings().cache_dir
    downloads = Path(cache_dir) / "downloads"
    entries = []
    for sidecar in sorted(downloads.glob(f"*/*/{_SIDECAR}")):
        meta = _read_json(sidecar)
        if meta is None or not isinstance(meta.get("file"), str):
            continue
        path = sidecar.parent / meta["file"]
        if path.is_file():
            entries.append({**meta, "path": path, "version_dir": sidecar.parent})
    entries.sort(key=lambda e: (str(e.get("uri")), _neg_time(e)))
    return entries


def fetch(
    uri: str,
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
    offline: bool | None = None,
    progress: bool = False,
) -> Path:
    """Return a local path to the file ``uri`` names, downloading it if need be.

    Local paths and ``file://`` URIs are returned as they are (nothing is copied).
    ``http(s)://`` and ``s3://`` (anonymous, unsigned requests; endpoint from
    ``CZB_S3_ENDPOINT_URL``) objects are downloaded into ``cache_dir/downloads``:
    the remote is asked for its ETag and size first (HTTP ``HEAD`` / S3
    ``HeadObject``) and a cached copy of that version is returned without
    downloading. Downloads go to a ``.part`` file that is renamed into place
    only when complete and checked; an interrupted download is resumed with a
    range request the next time (or restarted if the server ignores ranges or
    the object changed).

    Parameters
    ----------
    uri
        Local path, ``file://``, ``http://``, ``https://`` or ``s3://bucket/key``.
    sha256
        Expected hex digest. Checked after a download, against the recorded digest
        on a cache hit, and for local files (the result is remembered by path,
        size and mtime so the file is not hashed again on every run).
    cache_dir
        czb's cache folder; defaults to ``CZB_CACHE_DIR``.
    offline
        Never touch the network: return the newest cached copy of ``uri``.
        Defaults to ``CZB_OFFLINE``.
    progress
        Show a progress bar (bytes, speed, ETA) on stderr while downloading.

    Returns
    -------
    Path
        The local file. For a download, its digest is recorded in the sidecar
        (see :func:`cached_sha256`).

    Raises
    ------
    FetchError
        The file does not exist, cannot be downloaded (one line naming the URI and
        the cause), does not match ``sha256``, or is not cached while offline.

    Notes
    -----
    Reads: the local file, or the remote object and ``cache_dir/downloads``.
    Writes: ``cache_dir/downloads/<uri key>/<version key>/`` (the file, its
    ``.part`` while downloading, a ``.czb-entry.json`` sidecar and a ``.lock``),
    and ``cache_dir/hashes/`` for verified local files.
    """
    if cache_dir is None or offline is None:
        from czb.settings import get_settings

        settings = get_settings()
        cache_dir = settings.cache_dir if cache_dir is None else cache_dir
        offline = settings.offline if offline is None else offline
    cache_dir = Path(cache_dir).expanduser()
    expected = sha256.lower() if sha256 else None

    scheme = _scheme(uri)
    if scheme not in REMOTE_SCHEMES:
        return _fetch_local(uri, scheme, expected, cache_dir)
    if offline:
        return _fetch_offline(uri, expected, cache_dir)
    source: _Source = _S3Source(uri) if scheme == "s3" else _HttpSource(uri)
    try:
        return _fetch_remote(uri, source, expected, cache_dir, progress)
    finally:
        source.close()


# --------------------------------------------------------------------------- local files


def _scheme(uri: str) -> str:
    # A Windows drive letter ("C:\\data.h5ad") parses as a one-letter scheme: not a URI.
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]+):", uri)
    return match.group(1).lower() if match else ""


def _fetch_local(uri: str, scheme: str, expected: str | None, cache_dir: Path) -> Path:
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            msg = f"{uri}: file:// URIs on another host are not supported"
            raise FetchError(msg)
        from urllib.request import url2pathname

        path = Path(url2pathname(parts.path))
    elif scheme and ("://" in uri or not Path(uri).exists()):
        # builtin:, synthetic: and friends are resolved elsewhere; they are not files.
        msg = (
            f"{uri}: unsupported URI scheme {scheme!r}; "
            "use a local path, file://, http(s):// or s3://"
        )
        raise FetchError(msg)
    else:
        path = Path(uri).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        msg = f"no such file: {path}" + (f" (from {uri})" if str(path) != uri else "")
        raise FetchError(msg) from None
    except OSError as e:
        msg = f"cannot read {path}: {e.strerror}"
        raise FetchError(msg) from None
    if path.is_dir():
        msg = f"{path} is a folder, not a file"
        raise FetchError(msg)
    if not stat.S_ISREG(st.st_mode):
        # A fifo or device would block or never end (/dev/stdin, /dev/zero).
        msg = f"{path} is not a regular file (a device, pipe or socket)"
        raise FetchError(msg)
    if expected is not None:
        actual = known_sha256(path, cache_dir=cache_dir)
        if actual != expected:
            msg = (
                f"{path}: sha256 mismatch: expected {expected}, got {actual}; the file changed "
                "since the spec was written: restore it, or update the spec's sha256 if the change is intended"
            )
            raise FetchError(msg)
    return path


def _local_hash_record(cache_dir: Path, path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return cache_dir / "hashes" / f"{key}.json"


def _stamp(st: os.stat_result) -> dict[str, int]:
    """What tells a file's content changed without reading it. The ctime matters: setting
    size and mtime back after an edit (``os.utime``) is easy, setting the ctime back is not."""
    return {
        "size_on_disk": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def _same_stamp(record: dict[str, Any], st: os.stat_result) -> bool:
    return all(record.get(key) == value for key, value in _stamp(st).items())


def _local_hash_lookup(cache_dir: Path, path: Path, st: os.stat_result) -> str | None:
    record = _read_json(_local_hash_record(cache_dir, path))
    if (
        record is not None
        and record.get("path") == str(path.resolve())
        and _same_stamp(record, st)
    ):
        return record.get("sha256")
    return None


def _local_hash_store(cache_dir: Path, path: Path, st: os.stat_result, digest: str) -> None:
    record = {"path": str(path.resolve()), **_stamp(st), "sha256": digest}
    # The record only saves time; a read-only cache must not stop a run.
    with contextlib.suppress(OSError):
        _write_json(_local_hash_record(cache_dir, path), record)


# --------------------------------------------------------------------------- what a file is

#: The kind of file a name promises, by extension (longest match first).
_KINDS_BY_SUFFIX = {
    ".h5ad": "hdf5", ".h5": "hdf5", ".hdf5": "hdf5", ".loom": "hdf5",
    ".zip": "zip", ".whl": "zip", ".npz": "zip",
    ".gz": "gzip", ".tgz": "gzip",
    ".parquet": "parquet",
    ".npy": "npy",
    ".txt": "text", ".tsv": "text", ".csv": "text", ".tab": "text", ".rpt": "text",
    ".json": "json",
    ".html": "html", ".htm": "html",
}
_KIND_NAMES = {
    "hdf5": "an HDF5 file", "zip": "a zip archive", "gzip": "a gzip file",
    "parquet": "a Parquet file", "npy": "a NumPy .npy file", "text": "a text table",
    "json": "a JSON document", "html": "an HTML page",
}
_SIGNATURES = {
    "hdf5": (b"\x89HDF\r\n\x1a\n",),
    "zip": (b"PK\x03\x04", b"PK\x05\x06"),
    "gzip": (b"\x1f\x8b",),
    "parquet": (b"PAR1",),
    "npy": (b"\x93NUMPY",),
}
#: Bytes looked at to tell what a file is.
_SNIFF_BYTES = 1024


def expected_kind(name: str) -> str | None:
    """The kind of file a file name promises (``"hdf5"``, ``"zip"``, ``"text"``...), or ``None``.

    Parameters
    ----------
    name
        A file name or path; only its extension counts.
    """
    lowered = name.lower()
    for suffix in sorted(_KINDS_BY_SUFFIX, key=len, reverse=True):
        if lowered.endswith(suffix):
            return _KINDS_BY_SUFFIX[suffix]
    return None


def _has_signature(path: Path, head: bytes, kind: str) -> bool:
    signatures = _SIGNATURES[kind]
    if head.startswith(signatures):
        return True
    if kind != "hdf5":
        return False
    # HDF5 may start after a user block of 512, 1024, 2048... bytes.
    with contextlib.suppress(OSError), open(path, "rb") as f:
        offset = 512
        while offset <= 1 << 20:
            f.seek(offset)
            if f.read(8) == signatures[0]:
                return True
            offset *= 2
    return False


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file look like, in words (never the bytes themselves)."""
    if not head:
        return "an empty file"
    for kind, signatures in _SIGNATURES.items():
        if head.startswith(signatures):
            return _KIND_NAMES[kind]
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        text.startswith(b"<!--") and b"<html" in text
    ):
        return "an HTML page"
    if text.startswith((b"<?xml", b"<error")):
        return "an XML document (as object stores send for errors)"
    if text.startswith((b"{", b"[")):
        return "a JSON document (as web services send for errors)"
    if b"\x00" in head:
        return "binary data of an unknown kind"
    return "plain text"


def describe_content(path: str | os.PathLike[str], *, expected: str | None) -> str | None:
    """What a file is, in words, when it is not the kind expected; ``None`` when it fits.

    Reads the first bytes only and never quotes them: the answer is a phrase like
    ``"an HTML page"``, ``"an empty file"`` or ``"a JSON document (...)"``.

    Parameters
    ----------
    path
        The file.
    expected
        What it should be: a key of :func:`expected_kind` (``"hdf5"``, ``"zip"``,
        ``"gzip"``, ``"parquet"``, ``"npy"`` must carry their signature; ``"text"`` must
        be text that is not an HTML, XML or JSON document; ``"json"`` must not be HTML
        or XML), or ``None`` for a file of unknown kind, which only an HTML page fails.

    Returns
    -------
    ``None`` if the file fits, else a phrase saying what it is.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None  # unreadable: the reader says so in its own words
    looks = _looks_like(head)
    if expected in _SIGNATURES:
        return None if _has_signature(path, head, expected) else looks
    if expected == "html":
        return None
    if expected == "text":
        return None if looks == "plain text" else looks
    if expected == "json":
        return looks if looks.startswith(("an HTML", "an XML", "an empty")) else None
    return looks if looks == "an HTML page" else None


def _refuse_wrong_content(uri: str, part: Path, name: str, content_type: str | None) -> None:
    """Delete a finished download that is not the kind of file its name says, and say why."""
    kind = expected_kind(name)
    # The bytes decide, not the declared type: servers label valid files text/html too.
    what = describe_content(part, expected=kind)
    if what is None:
        return
    declared = (content_type or "").split(";")[0].strip().lower()
    size = part.stat().st_size
    with contextlib.suppress(OSError):
        part.unlink()
    wanted = _KIND_NAMES.get(kind, "the file") if kind else "the file"
    served = f"{declared or 'no content type'}, {human_bytes(size)}"
    hint = (
        "the URL may need a login or be wrong"
        if what.startswith(("an HTML", "an XML", "a JSON"))
        else "the URL may be wrong"
    )
    msg = f"{uri}: received {what} ({served}) instead of {wanted}; {hint}. Nothing was cached"
    raise FetchError(msg)


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class _Remote:
    """What the remote says about the current version of an object."""

    etag: str | None
    size: int | None
    last_modified: str | None

    @property
    def version_key(self) -> str:
        # Last-Modified stands in for a missing ETag; without either, the size is all we have.
        validator = self.etag or f"lm:{self.last_modified or ''}"
        return hashlib.sha1(f"{validator}|{self.size}".encode()).hexdigest()[:16]


def _uri_key(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def _basename(uri: str) -> str:
    name = posixpath.basename(unquote(urlsplit(uri).path).rstrip("/"))
    # Keep the name readable but safe as a single path component on any OS.
    name = re.sub(r"[^\w.+-]", "_", name).lstrip(".")[-200:]
    return name or "download"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Write then rename, so a reader never sees half a sidecar.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _neg_time(meta: dict[str, Any]) -> float:
    try:
        return -datetime.fromisoformat(str(meta.get("fetched_at"))).timestamp()
    except ValueError:
        return 0.0


def _cached_entry(entry_dir: Path, name: str, remote: _Remote) -> dict[str, Any] | None:
    """The sidecar of a finished download of this version, or ``None``."""
    meta = _read_json(entry_dir / _SIDECAR)
    if meta is None or meta.get("file") != name or meta.get("etag") != remote.etag:
        return None
    try:
        size = (entry_dir / name).stat().st_size
    except OSError:
        return None
    if remote.size is not None and size != remote.size:
        return None
    return meta


def _recorded_digest(path: Path, meta: dict[str, Any]) -> tuple[str, str | None]:
    """``(actual digest, None)`` of a cached file, or ``(actual, why)`` when it is damaged.

    The sidecar's digest is taken as it is while the file's stamp (size, mtime, ctime,
    inode) is unchanged; otherwise the file is hashed and re-recorded. A file whose
    content no longer matches the digest recorded at download (edited or damaged in
    the cache) comes back with the reason, for the caller to evict it.
    """
    st = path.stat()
    recorded = meta.get("sha256")
    if recorded and _same_stamp(meta, st):
        return recorded, None
    actual = file_sha256(path)
    if recorded and actual != recorded:
        return actual, f"its sha256 is {actual}, not the {recorded} recorded when it was downloaded"
    with contextlib.suppress(OSError):
        _write_json(path.parent / _SIDECAR, {**meta, "sha256": actual, **_stamp(path.stat())})
    return actual, None


def _evict(entry_dir: Path) -> None:
    """Delete a cache entry (file, sidecar, partial download), so it is never used again."""
    with contextlib.suppress(OSError):
        (entry_dir / _SIDECAR).unlink(missing_ok=True)
    for child in list(entry_dir.iterdir()) if entry_dir.is_dir() else []:
        if child.name == ".lock":
            continue  # may be held by this process; harmless once the sidecar is gone
        with contextlib.suppress(OSError):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def _cached_problem(path: Path, meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(digest, None)`` for a sound cached file, ``(digest or None, why)`` for a damaged one."""
    kind = expected_kind(path.name)
    what = describe_content(path, expected=kind)
    if what is not None:
        return None, f"it is {what}, not {_KIND_NAMES.get(kind, 'the expected file')}"
    return _recorded_digest(path, meta)


def _check_digest(uri: str, expected: str | None, actual: str, path: Path) -> Path:
    if expected is not None and actual != expected:
        msg = (
            f"{uri}: sha256 mismatch: expected {expected}, got {actual} "
            f"(cached copy {path}; the spec or the remote object is out of date)"
        )
        raise FetchError(msg)
    return path


def _fetch_offline(uri: str, expected: str | None, cache_dir: Path) -> Path:
    uri_dir = cache_dir / "downloads" / _uri_key(uri)
    candidates: list[tuple[dict[str, Any], Path]] = []
    for sidecar in uri_dir.glob(f"*/{_SIDECAR}"):
        meta = _read_json(sidecar)
        if meta and meta.get("uri") == uri and isinstance(meta.get("file"), str):
            path = sidecar.parent / meta["file"]
            if path.is_file():
                candidates.append((meta, path))
    if not candidates:
        msg = (
            f"{uri} is not in the cache ({cache_dir / 'downloads'}) and czb is offline; "
            "run `czb datasets fetch NAME` for its dataset while online"
        )
        raise FetchError(msg)
    candidates.sort(key=lambda c: _neg_time(c[0]))
    mismatches, damaged = [], []
    for meta, path in candidates:  # newest first; an older copy may be the one the spec wants
        with _locked(path.parent):
            digest, why = _cached_problem(path, meta)
            if why is not None:
                _evict(path.parent)
                damaged.append((path, why))
                continue
        if expected is None or digest == expected:
            return path
        mismatches.append(digest)
    again = "run `czb datasets fetch NAME` for its dataset while online to download it again"
    if damaged:
        path, why = damaged[0]
        msg = f"{uri}: the cached copy {path} was damaged or edited in the cache ({why}) and was deleted; {again}"
    else:
        msg = (
            f"{uri}: sha256 mismatch: expected {expected}, the cached copies have "
            f"{', '.join(mismatches)}, and czb is offline; {again}, or update the spec's sha256"
        )
    raise FetchError(msg)


class _RemoteChanged(Exception):
    """The object changed between the HEAD and the GET; start over with a fresh HEAD."""


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` so two processes don't write one ``.part``."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent fetches of one URI are on the user
        yield
        return
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fetch_remote(
    uri: str, source: _Source, expected: str | None, cache_dir: Path, progress: bool
) -> Path:
    name = _basename(uri)
    uri_dir = cache_dir / "downloads" / _uri_key(uri)
    for _ in range(3):
        remote = source.head()
        entry_dir = uri_dir / remote.version_key
        path = entry_dir / name
        try:
            entry_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            msg = f"cannot write to the cache {cache_dir}: {e.strerror}"
            raise FetchError(msg) from None
        with _locked(entry_dir):
            # Checked under the lock: another process may have just finished this download.
            meta = _cached_entry(entry_dir, name, remote)
            if meta is not None:
                digest, why = _cached_problem(path, meta)
                if why is None:
                    return _check_digest(uri, expected, digest, path)
                _evict(entry_dir)  # damaged or edited in the cache: downloaded again below
                warnings.warn(
                    f"{uri}: the cached copy {path} was damaged or edited in the cache ({why}); "
                    "deleted it and downloading it again",
                    DatasetWarning,
                    stacklevel=3,
                )
            _drop_stale_parts(uri_dir, keep=entry_dir)
            try:
                digest, st, content_type = _download(uri, source, remote, path, progress)
            except _RemoteChanged:
                continue
            part = _part(path)
            _refuse_wrong_content(uri, part, name, content_type)
            if expected is not None and digest != expected:
                part.unlink(missing_ok=True)
                msg = (
                    f"{uri}: sha256 mismatch: expected {expected}, got {digest}; "
                    "the download was deleted"
                )
                raise FetchError(msg)
            meta = {
                "uri": uri,
                "file": name,
                "etag": remote.etag,
                "size": remote.size,
                "last_modified": remote.last_modified,
                "sha256": digest,
                **_stamp(st),
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            # Sidecar first: a crash between the two leaves a sidecar without its file,
            # which reads as "not cached", never as a cached file with no record.
            _write_json(entry_dir / _SIDECAR, meta)
            os.replace(part, path)
            # The rename may change the ctime: record the stamp the file has now (a crash
            # before this line only costs one more hash on the next use).
            with contextlib.suppress(OSError):
                _write_json(entry_dir / _SIDECAR, {**meta, **_stamp(path.stat())})
            return path
    msg = f"{uri} kept changing while it was being downloaded; try again later"
    raise FetchError(msg)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _drop_stale_parts(uri_dir: Path, keep: Path) -> None:
    # A .part of an older version can never be resumed (its ETag is gone); free the space.
    for part in uri_dir.glob("*/*.part"):
        if part.parent != keep:
            with contextlib.suppress(OSError):
                part.unlink()


# --------------------------------------------------------------------------- downloading


@dataclass
class _Body:
    """An open GET response: whether it starts at the requested offset, and its bytes."""

    partial: bool
    chunks: Iterator[bytes]
    close: Any
    content_type: str | None = None


class _Source:
    """A remote object: :meth:`head` describes it, :meth:`get` streams it from an offset."""

    uri: str
    #: Exceptions that mean "the connection broke mid-stream" (resumable).
    interrupted: tuple[type[BaseException], ...] = ()

    def head(self) -> _Remote:
        raise NotImplementedError

    def get(self, offset: int, remote: _Remote) -> _Body:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _download(
    uri: str, source: _Source, remote: _Remote, path: Path, progress: bool
) -> tuple[str, os.stat_result, str | None]:
    """Fill ``path.part`` with the object, resuming what is there; return its sha256, stat
    and the Content-Type the server declared (``None`` if none, or nothing was fetched)."""
    part = _part(path)
    content_type: str | None = None
    hasher: Any = None
    hashed = -1  # how many bytes of .part ``hasher`` covers; -1: none yet
    attempts = 0
    with _ProgressBar(progress, path.name, remote.size).shown() as bar:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            if remote.size is not None and offset > remote.size:
                part.unlink()
                offset = 0
            if remote.size is not None and offset == remote.size and offset > 0:
                break  # complete already; only the rename was missing
            body = source.get(offset, remote)
            content_type = body.content_type or content_type
            try:
                if offset and not body.partial:
                    offset = 0  # the server ignored the range (or the object changed): start over
                if offset == 0:
                    hasher, hashed = hashlib.sha256(), 0
                elif hashed != offset:
                    hasher, hashed = _hash_prefix(part), offset
                bar.reset(offset)
                with _open_for_writing(part, append=offset > 0) as write:
                    for chunk in body.chunks:
                        write(chunk)
                        hasher.update(chunk)
                        hashed += len(chunk)
                        bar.advance(len(chunk))
                cause = None
            except source.interrupted as e:
                cause = _short_cause(e)
            finally:
                body.close()
            got = part.stat().st_size
            if cause is None and (remote.size is None or got == remote.size):
                break
            if cause is None:
                assert remote.size is not None
                cause = f"the server sent {got - offset} bytes, {remote.size - offset} expected"
            attempts += 1
            if got <= offset or attempts >= _MAX_ATTEMPTS:
                total = "?" if remote.size is None else remote.size
                msg = (
                    f"download of {uri} was interrupted after {got} of {total} bytes ({cause}); "
                    "run again to resume"
                )
                raise FetchError(msg)
    if hashed != part.stat().st_size:
        hasher = _hash_prefix(part)
    return hasher.hexdigest(), part.stat(), content_type


@contextlib.contextmanager
def _open_for_writing(path: Path, *, append: bool) -> Iterator[Any]:
    """Open ``path`` and yield its ``write``; disk errors become FetchError, not "interrupted"."""

    def fail(e: OSError) -> FetchError:
        return FetchError(f"cannot write {path}: {e.strerror}")

    try:
        f = open(path, "ab" if append else "wb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise fail(e) from None

    def write(chunk: bytes) -> None:
        try:
            f.write(chunk)
        except OSError as e:  # disk full etc.: retrying the network would not help
            raise fail(e) from None

    try:
        yield write
    finally:
        try:
            f.close()  # flushes: a full disk can show up only here
        except OSError as e:
            raise fail(e) from None


def _hash_prefix(path: Path) -> Any:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest


def _short_cause(exc: BaseException) -> str:
    """One line saying why a request failed, from deep inside urllib3/botocore wrappers."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        # The innermost OS error ("Connection refused", "Name or service not known") says it best.
        if type(e).__module__ == "builtins" and isinstance(e, OSError) and e.strerror:
            return e.strerror
        if type(e).__module__ == "builtins" and isinstance(e, TimeoutError):
            return "timed out"
        if type(e).__name__ in ("IncompleteRead", "IncompleteReadError"):
            return "the connection closed early"
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _ProgressBar:
    """A rich progress bar on stderr, or nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool, description: str, total: int | None):
        self.total = total
        self.bar: Any = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task(description, total=total, start=False)

    @contextlib.contextmanager
    def shown(self) -> Iterator[_ProgressBar]:
        if self.bar is None:
            yield self
            return
        self.bar.start()
        self.bar.start_task(self.task)
        try:
            yield self
        finally:
            self.bar.stop()

    def reset(self, completed: int) -> None:
        if self.bar is not None:
            self.bar.reset(self.task, completed=completed, total=self.total)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)


# --------------------------------------------------------------------------- HTTP(S)


class _HttpSource(_Source):
    def __init__(self, uri: str):
        import requests
        import urllib3.exceptions

        from czb import __version__

        self.uri = uri
        self.requests = requests
        self.session = requests.Session()
        # identity: Content-Length and Range must refer to the bytes as stored, not gzipped.
        self.session.headers.update(
            {"User-Agent": f"czb/{__version__}", "Accept-Encoding": "identity"}
        )
        self.interrupted = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)

    def _request(self, method: str, headers: dict[str, str] | None = None) -> Any:
        try:
            return self.session.request(
                method,
                self.uri,
                headers=headers,
                stream=True,
                allow_redirects=True,
                timeout=(_CONNECT_TIMEOUT_S, _READ_TIMEOUT_S),
            )
        except self.requests.RequestException as e:
            msg = f"cannot fetch {self.uri}: {_short_cause(e)}"
            raise FetchError(msg) from None

    def _raise_for_status(self, response: Any) -> None:
        if response.status_code >= 400:
            response.close()
            reason = f" {response.reason}" if response.reason else ""
            msg = f"cannot fetch {self.uri}: HTTP {response.status_code}{reason}"
            raise FetchError(msg)

    def head(self) -> _Remote:
        response = self._request("HEAD")
        response.close()
        if response.status_code in (403, 405, 501):
            # Some servers (and presigned URLs) refuse HEAD but allow GET: read a GET's headers.
            response = self._request("GET")
            response.close()
        self._raise_for_status(response)
        length = response.headers.get("Content-Length")
        return _Remote(
            etag=response.headers.get("ETag"),
            size=int(length) if length and length.isdigit() else None,
            last_modified=response.headers.get("Last-Modified"),
        )

    def get(self, offset: int, remote: _Remote) -> _Body:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            # If-Range: the server sends the whole (new) object instead of a range of it
            # if it changed. Weak ETags are not allowed there.
            validator = (
                remote.etag
                if remote.etag and not remote.etag.startswith("W/")
                else remote.last_modified
            )
            if validator:
                headers["If-Range"] = validator
        response = self._request("GET", headers)
        if response.status_code == 416:  # the range is past the end: the .part is bogus
            response.close()
            response = self._request("GET")
        self._raise_for_status(response)
        etag = response.headers.get("ETag")
        if remote.etag and etag and etag != remote.etag:
            response.close()
            raise _RemoteChanged
        content_range = response.headers.get("Content-Range", "")
        partial = response.status_code == 206 and content_range.startswith(f"bytes {offset}-")
        if response.headers.get("Content-Encoding", "identity").lower() in ("identity", ""):
            # Raw reads: a decoding read that hits a dropped connection throws away the
            # bytes it had buffered (up to a chunk), which a resume would then fetch again.
            chunks = response.raw.stream(_CHUNK, decode_content=False)
        else:  # the server compressed it anyway: store what it decodes to, as requests would
            chunks = response.iter_content(_CHUNK)
        return _Body(partial=partial, chunks=chunks, close=response.close,
                     content_type=response.headers.get("Content-Type"))

    def close(self) -> None:
        self.session.close()


# --------------------------------------------------------------------------- S3


class _S3Source(_Source):
    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.uri, self.bucket, self.key = uri, parts.netloc, parts.path.lstrip("/")
        if not self.bucket or not self.key:
            msg = f"{uri}: an S3 URI must look like s3://bucket/key"
            raise FetchError(msg)
        self._client: Any = None
        import botocore.exceptions
        import urllib3.exceptions

        self.errors = botocore.exceptions
        self.interrupted = (
            botocore.exceptions.BotoCoreError,
            urllib3.exceptions.HTTPError,
            OSError,
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            import botocore
            from botocore.config import Config

            from czb.settings import get_settings

            config = Config(
                signature_version=botocore.UNSIGNED,  # public buckets: no credentials used
                connect_timeout=_CONNECT_TIMEOUT_S,
                read_timeout=_READ_TIMEOUT_S,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            try:
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=get_settings().s3_endpoint_url, config=config
                )
            except self.errors.BotoCoreError as e:  # e.g. AWS_PROFILE names a missing profile
                msg = f"cannot fetch {self.uri}: {e}"
                raise FetchError(msg) from None
        return self._client

    def _explain(self, error: Exception) -> str:
        if isinstance(error, self.errors.ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NotFound"):
                code = self._not_found_code()
            cause = {
                "NoSuchKey": f"no such key {self.key!r} in bucket {self.bucket!r} (NoSuchKey)",
                "NoSuchBucket": f"no such bucket {self.bucket!r} (NoSuchBucket)",
                "404": "not found (HTTP 404)",
            }.get(code)
            if cause is None and (status == 403 or code in ("403", "AccessDenied", "Forbidden")):
                cause = "access denied (czb reads S3 anonymously, so the object must be public)"
            if cause is None:
                message = error.response.get("Error", {}).get("Message") or ""
                cause = f"{code}: {message}" if message else f"{code} (HTTP {status})"
        else:
            cause = _short_cause(error)
        return f"cannot fetch {self.uri}: {cause}"

    def _not_found_code(self) -> str:
        # HeadObject has no body, so a 404 does not say whether the bucket or the key is
        # missing; a one-byte GET does.
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key, Range="bytes=0-0")
        except self.errors.ClientError as e:
            return str(e.response.get("Error", {}).get("Code", "404"))
        except Exception:  # noqa: BLE001 - only refining an error message
            return "404"
        response["Body"].close()
        return "404"

    def head(self) -> _Remote:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except (self.errors.ClientError, self.errors.BotoCoreError) as e:
            raise FetchError(self._explain(e)) from None
        modified = response.get("LastModified")
        return _Remote(
            etag=response.get("ETag"),
            size=response.get("ContentLength"),
            last_modified=modified.isoformat() if modified is not None else None,
        )

    def get(self, offset: int, remote: _Remote) -> _Body:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        if remote.etag:
            kwargs["IfMatch"] = remote.etag  # fail rather than splice two versions together
        try:
            response = self.client.get_object(**kwargs)
        except self.errors.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise _RemoteChanged from None
            raise FetchError(self._explain(e)) from None
        except self.errors.BotoCoreError as e:
            raise FetchError(self._explain(e)) from None
        partial = str(response.get("ContentRange", "")).startswith(f"bytes {offset}-")
        body = response["Body"]
        return _Body(partial=partial, chunks=body.iter_chunks(_CHUNK), close=body.close,
                     content_type=response.get("ContentType"))
