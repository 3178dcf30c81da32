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
remembered in ``CZB_CACHE_DIR/hashes`` keyed by (path, size, mtime), so a
large local file is hashed once, not on every run.

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
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from czb.errors import FetchError

__all__ = ["cache_entries", "cached_sha256", "fetch", "file_sha256", "is_remote"]

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
    counts if the file's size and modification time still match it.

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
        if meta.get("size_on_disk") == st.st_size and meta.get("mtime_ns") == st.st_mtime_ns:
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
        digest = file_sha256(path)
        with contextlib.suppress(OSError):  # a vanished file is reported by the caller's read
            _local_hash_store(Path(cache_dir), path, path.stat(), digest)
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
    if expected is not None:
        actual = known_sha256(path, cache_dir=cache_dir)
        if actual != expected:
            msg = f"{uri}: sha256 mismatch: expected {expected}, got {actual}"
            raise FetchError(msg)
    return path


def _local_hash_record(cache_dir: Path, path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return cache_dir / "hashes" / f"{key}.json"


def _local_hash_lookup(cache_dir: Path, path: Path, st: os.stat_result) -> str | None:
    record = _read_json(_local_hash_record(cache_dir, path))
    if (
        record is not None
        and record.get("path") == str(path.resolve())
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
    ):
        return record.get("sha256")
    return None


def _local_hash_store(cache_dir: Path, path: Path, st: os.stat_result, digest: str) -> None:
    record = {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": digest,
    }
    # The record only saves time; a read-only cache must not stop a run.
    with contextlib.suppress(OSError):
        _write_json(_local_hash_record(cache_dir, path), record)


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


def _recorded_digest(path: Path, meta: dict[str, Any]) -> str | None:
    """The sidecar's digest if the file is untouched since; else hash it and re-record.

    Returns ``None`` when the file no longer matches what was downloaded (edited
    or damaged in the cache), so the caller downloads it again.
    """
    st = path.stat()
    recorded = meta.get("sha256")
    if (
        recorded
        and meta.get("size_on_disk") == st.st_size
        and meta.get("mtime_ns") == st.st_mtime_ns
    ):
        return recorded
    actual = file_sha256(path)
    if recorded and actual != recorded:
        return None
    with contextlib.suppress(OSError):
        _write_json(
            path.parent / _SIDECAR,
            {**meta, "sha256": actual, "size_on_disk": st.st_size, "mtime_ns": st.st_mtime_ns},
        )
    return actual


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
    candidates = []
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
    mismatches = []
    for meta, path in candidates:  # newest first; an older copy may be the one the spec wants
        digest = _recorded_digest(path, meta)
        if digest is None:
            continue
        if expected is None or digest == expected:
            return path
        mismatches.append(digest)
    if mismatches:
        msg = (
            f"{uri}: sha256 mismatch: expected {expected}, the cached copies have "
            f"{', '.join(mismatches)}, and czb is offline"
        )
    else:
        msg = f"{uri}: the cached copy in {uri_dir} is damaged and czb is offline"
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
                digest = _recorded_digest(path, meta)
                if digest is not None:
                    return _check_digest(uri, expected, digest, path)
            _drop_stale_parts(uri_dir, keep=entry_dir)
            try:
                digest, st = _download(uri, source, remote, path, progress)
            except _RemoteChanged:
                continue
            part = _part(path)
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
                "size_on_disk": st.st_size,
                "mtime_ns": st.st_mtime_ns,  # os.replace keeps it: still true after the rename
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            # Sidecar first: a crash between the two leaves a sidecar without its file,
            # which reads as "not cached", never as a cached file with no record.
            _write_json(entry_dir / _SIDECAR, meta)
            os.replace(part, path)
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
) -> tuple[str, os.stat_result]:
    """Fill ``path.part`` with the object, resuming what is there; return its sha256 and stat."""
    part = _part(path)
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
    return hasher.hexdigest(), part.stat()


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
        return _Body(partial=partial, chunks=chunks, close=response.close)

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
        return _Body(partial=partial, chunks=body.iter_chunks(_CHUNK), close=body.close)
