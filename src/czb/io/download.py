"""Filling a ``.part`` file from a remote source: resuming, retrying a broken
connection that made progress, and hashing what was written."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from czb.core.errors import FetchError
from czb.io.cache import part_path
from czb.io.progress import ProgressBar
from czb.io.source import CHUNK, Remote, Source, short_cause

#: GET attempts per fetch; a new attempt is made only if the previous one made progress.
_MAX_ATTEMPTS = 3


def download(
    uri: str, source: Source, remote: Remote, path: Path, progress: bool
) -> tuple[str, os.stat_result, str | None]:
    """Fill ``path.part`` with the object, resuming what is there; return its sha256, stat
    and the Content-Type the server declared (``None`` if none, or nothing was fetched)."""
    part = part_path(path)
    content_type: str | None = None
    hasher: Any = None
    hashed = -1  # how many bytes of .part ``hasher`` covers; -1: none yet
    attempts = 0
    with ProgressBar(progress, path.name, remote.size).shown() as bar:
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
                cause = short_cause(e)
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
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest
