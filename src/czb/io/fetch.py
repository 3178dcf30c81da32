"""Fetching dataset files: local paths, ``file://``, ``http(s)://`` and ``s3://``.

Local files are returned where they are; remote ones are downloaded once into
the cache (:mod:`czb.io.cache`) through an HTTP or S3 source, checked to be the
kind of file their name says (:mod:`czb.io.content`) and reused while the
remote object is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import stat
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from czb.core.errors import DatasetWarning, FetchError
from czb.io.cache import (
    SIDECAR,
    cached_entry,
    cached_problem,
    drop_stale_parts,
    evict,
    known_sha256,
    locked,
    neg_time,
    part_path,
    read_json,
    stamp,
    write_json,
)
from czb.io.content import refuse_wrong_content
from czb.io.download import download
from czb.io.http import HttpSource
from czb.io.s3 import S3Source
from czb.io.source import RemoteChanged, Source, Unreachable

__all__ = ["fetch", "is_remote"]

REMOTE_SCHEMES = frozenset({"http", "https", "s3"})

#: The next step when a file is neither reachable nor cached: fill a cache elsewhere.
COPY_A_CACHE = (
    "on a connected machine run `czb datasets fetch NAME` for its dataset (or this command, "
    "online), copy that machine's cache folder here and point CZB_CACHE_DIR at it"
)


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
        (see :func:`~czb.io.cache.cached_sha256`).

    Raises
    ------
    FetchError
        The file does not exist, cannot be downloaded (one line naming the whole URI,
        the cause and the next step: ``--offline`` with a copy cached earlier, or a
        cache filled on a connected machine), does not match ``sha256``, or is not
        cached while offline.

    Notes
    -----
    Reads: the local file, or the remote object and ``cache_dir/downloads``.
    Writes: ``cache_dir/downloads/<uri key>/<version key>/`` (the file, its
    ``.part`` while downloading, a ``.czb-entry.json`` sidecar and a ``.lock``),
    and ``cache_dir/hashes/`` for verified local files.
    """
    if cache_dir is None or offline is None:
        from czb.core.settings import get_settings

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
    source: Source = S3Source(uri) if scheme == "s3" else HttpSource(uri)
    try:
        return _fetch_remote(uri, source, expected, cache_dir, progress)
    except Unreachable as e:
        raise _hinted(str(e), _next_step(uri, cache_dir, missing=e.missing)) from None
    finally:
        source.close()


def _hinted(problem: str, hint: str) -> FetchError:
    """``problem; hint`` as one message (records and library users see both), with the
    hint also kept apart: the CLI shows it on a ``hint:`` line of its own."""
    error = FetchError(f"{problem}; {hint}")
    error.hint = hint  # type: ignore[attr-defined]
    return error


def _next_step(uri: str, cache_dir: Path, *, missing: bool) -> str:
    """What to do when ``uri`` cannot be fetched: use the copy cached earlier, fix the
    URI (the remote has no such file), or bring a cache from a connected machine."""
    cached = _cached_copies(uri, cache_dir)
    if cached:
        when = str(cached[0][0].get("fetched_at") or "earlier")
        use = f"a copy fetched {when} is in the cache ({cache_dir}): use --offline (or CZB_OFFLINE=1) to run on it"
        return f"check the uri in its spec; {use}" if missing else use
    if missing:
        return "check the uri in its spec: the server has no such file, or refuses it"
    return f"check the network and try again; to work without one, {COPY_A_CACHE}, then use --offline"


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


# --------------------------------------------------------------------------- remote files


def _uri_key(uri: str) -> str:
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def _basename(uri: str) -> str:
    name = posixpath.basename(unquote(urlsplit(uri).path).rstrip("/"))
    # Keep the name readable but safe as a single path component on any OS.
    name = re.sub(r"[^\w.+-]", "_", name).lstrip(".")[-200:]
    return name or "download"


def _check_digest(uri: str, expected: str | None, actual: str, path: Path) -> Path:
    if expected is not None and actual != expected:
        msg = (
            f"{uri}: sha256 mismatch: expected {expected}, got {actual} "
            f"(cached copy {path}; the spec or the remote object is out of date)"
        )
        raise FetchError(msg)
    return path


def _cached_copies(uri: str, cache_dir: Path) -> list[tuple[dict[str, Any], Path]]:
    """The copies of ``uri`` in the cache (sidecar and file), newest first; not checked."""
    candidates: list[tuple[dict[str, Any], Path]] = []
    for sidecar in (cache_dir / "downloads" / _uri_key(uri)).glob(f"*/{SIDECAR}"):
        meta = read_json(sidecar)
        if meta and meta.get("uri") == uri and isinstance(meta.get("file"), str):
            path = sidecar.parent / meta["file"]
            if path.is_file():
                candidates.append((meta, path))
    return sorted(candidates, key=lambda c: neg_time(c[0]))


def _fetch_offline(uri: str, expected: str | None, cache_dir: Path) -> Path:
    candidates = _cached_copies(uri, cache_dir)
    if not candidates:
        msg = f"{uri} is not in the cache ({cache_dir / 'downloads'}) and czb is offline (--offline or CZB_OFFLINE)"
        raise _hinted(msg, COPY_A_CACHE)
    mismatches, damaged = [], []
    for meta, path in candidates:  # newest first; an older copy may be the one the spec wants
        with locked(path.parent):
            digest, why = cached_problem(path, meta)
            if why is not None:
                evict(path.parent)
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


def _fetch_remote(
    uri: str, source: Source, expected: str | None, cache_dir: Path, progress: bool
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
        with locked(entry_dir):
            # Checked under the lock: another process may have just finished this download.
            meta = cached_entry(entry_dir, name, remote)
            if meta is not None:
                digest, why = cached_problem(path, meta)
                if why is None:
                    return _check_digest(uri, expected, digest, path)
                evict(entry_dir)  # damaged or edited in the cache: downloaded again below
                warnings.warn(
                    f"{uri}: the cached copy {path} was damaged or edited in the cache ({why}); "
                    "deleted it and downloading it again",
                    DatasetWarning,
                    stacklevel=3,
                )
            drop_stale_parts(uri_dir, keep=entry_dir)
            try:
                digest, st, content_type = download(uri, source, remote, path, progress)
            except RemoteChanged:
                continue
            part = part_path(path)
            refuse_wrong_content(uri, part, name, content_type)
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
                **stamp(st),
                "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            # Sidecar first: a crash between the two leaves a sidecar without its file,
            # which reads as "not cached", never as a cached file with no record.
            write_json(entry_dir / SIDECAR, meta)
            os.replace(part, path)
            # The rename may change the ctime: record the stamp the file has now (a crash
            # before this line only costs one more hash on the next use).
            with contextlib.suppress(OSError):
                write_json(entry_dir / SIDECAR, {**meta, **stamp(path.stat())})
            return path
    msg = f"{uri} kept changing while it was being downloaded; try again later"
    raise FetchError(msg)
