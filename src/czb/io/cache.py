"""The download cache under ``CZB_CACHE_DIR`` and the digests czb remembers.

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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from czb.io.content import KIND_NAMES, describe_content, expected_kind
from czb.io.source import CHUNK, Remote

__all__ = ["cache_entries", "cached_sha256", "file_sha256", "known_sha256"]

SIDECAR = ".czb-entry.json"


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
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def cached_sha256(path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> str | None:
    """The SHA-256 that czb already recorded for ``path``, without hashing it again.

    Reads the sidecar next to a downloaded file, or, for a local file that
    :func:`~czb.io.fetch.fetch` verified, the record under ``cache_dir/hashes``. A record only
    counts if the file's size, modification and change times and inode still match
    it (a file edited in place with its size and mtime put back has a new ctime).

    Parameters
    ----------
    path
        A path returned by :func:`~czb.io.fetch.fetch`.
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
    meta = read_json(path.parent / SIDECAR)
    if meta is not None and meta.get("file") == path.name:
        if _same_stamp(meta, st):
            return meta.get("sha256")
        return None
    if cache_dir is None:
        from czb.core.settings import get_settings

        cache_dir = get_settings().cache_dir
    return _local_hash_lookup(Path(cache_dir), path, st)


def known_sha256(path: str | os.PathLike[str], *, cache_dir: Path | None = None) -> str:
    """The SHA-256 of ``path``: the recorded one when still valid, else hashed once and recorded.

    A large local dataset is hashed on its first use only, not on every run.
    """
    if cache_dir is None:
        from czb.core.settings import get_settings

        cache_dir = get_settings().cache_dir
    digest = cached_sha256(path, cache_dir=cache_dir)
    if digest is None:
        path = Path(path)
        before = path.stat()
        digest = file_sha256(path)
        with contextlib.suppress(OSError):  # a vanished file is reported by the caller's read
            after = path.stat()
            # Remembered only if the file did not change while it was hashed.
            if stamp(before) == stamp(after):
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
        from czb.core.settings import get_settings

        cache_dir = get_settings().cache_dir
    downloads = Path(cache_dir) / "downloads"
    entries = []
    for sidecar in sorted(downloads.glob(f"*/*/{SIDECAR}")):
        meta = read_json(sidecar)
        if meta is None or not isinstance(meta.get("file"), str):
            continue
        path = sidecar.parent / meta["file"]
        if path.is_file():
            entries.append({**meta, "path": path, "version_dir": sidecar.parent})
    entries.sort(key=lambda e: (str(e.get("uri")), neg_time(e)))
    return entries


def _local_hash_record(cache_dir: Path, path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
    return cache_dir / "hashes" / f"{key}.json"


def stamp(st: os.stat_result) -> dict[str, int]:
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
    return all(record.get(key) == value for key, value in stamp(st).items())


def _local_hash_lookup(cache_dir: Path, path: Path, st: os.stat_result) -> str | None:
    record = read_json(_local_hash_record(cache_dir, path))
    if (
        record is not None
        and record.get("path") == str(path.resolve())
        and _same_stamp(record, st)
    ):
        return record.get("sha256")
    return None


def _local_hash_store(cache_dir: Path, path: Path, st: os.stat_result, digest: str) -> None:
    record = {"path": str(path.resolve()), **stamp(st), "sha256": digest}
    # The record only saves time; a read-only cache must not stop a run.
    with contextlib.suppress(OSError):
        write_json(_local_hash_record(cache_dir, path), record)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    # Write then rename, so a reader never sees half a sidecar.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def neg_time(meta: dict[str, Any]) -> float:
    try:
        return -datetime.fromisoformat(str(meta.get("fetched_at"))).timestamp()
    except ValueError:
        return 0.0


def cached_entry(entry_dir: Path, name: str, remote: Remote) -> dict[str, Any] | None:
    """The sidecar of a finished download of this version, or ``None``."""
    meta = read_json(entry_dir / SIDECAR)
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
        write_json(path.parent / SIDECAR, {**meta, "sha256": actual, **stamp(path.stat())})
    return actual, None


def evict(entry_dir: Path) -> None:
    """Delete a cache entry (file, sidecar, partial download), so it is never used again."""
    with contextlib.suppress(OSError):
        (entry_dir / SIDECAR).unlink(missing_ok=True)
    for child in list(entry_dir.iterdir()) if entry_dir.is_dir() else []:
        if child.name == ".lock":
            continue  # may be held by this process; harmless once the sidecar is gone
        with contextlib.suppress(OSError):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def cached_problem(path: Path, meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """``(digest, None)`` for a sound cached file, ``(digest or None, why)`` for a damaged one."""
    kind = expected_kind(path.name)
    what = describe_content(path, expected=kind)
    if what is not None:
        return None, f"it is {what}, not {KIND_NAMES.get(kind, 'the expected file')}"
    return _recorded_digest(path, meta)


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
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


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def drop_stale_parts(uri_dir: Path, keep: Path) -> None:
    # A .part of an older version can never be resumed (its ETag is gone); free the space.
    for part in uri_dir.glob("*/*.part"):
        if part.parent != keep:
            with contextlib.suppress(OSError):
                part.unlink()
