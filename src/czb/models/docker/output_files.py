"""Opening and copying the files a container leaves in ``/output``, which are hostile.

A name there may be a symbolic link to a host file (its target is resolved on the host,
not in the container), a hard link, a FIFO that blocks its reader, a device, a folder or
a sparse file of a terabyte. So only the expected names are looked at (anything else is
ignored: never listed, opened or kept); each must be a regular file with one link and
within its size cap, is opened with ``O_NOFOLLOW | O_NONBLOCK``
(:func:`open_regular`), and is copied through that descriptor into a folder czb made,
which the container never had (:func:`collect_output`). The embedding cache is read the
same way.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from czb.core.errors import EmbeddingError
from czb.models.workdirs import DIR_FLAGS

#: A cap no file reaches, for czb's own files (the container log it keeps).
UNLIMITED = 1 << 62

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
#: Creates a new file: never an existing name, never through a link.
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _file_kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _check_stat(st: os.stat_result, file: str, cap: int, *, name: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        msg = f"{name}: output file {file} is {_file_kind(st.st_mode)}; only regular files are accepted"
        raise EmbeddingError(msg)
    if st.st_nlink != 1:
        msg = (f"{name}: output file {file} has {st.st_nlink} hard links; "
               f"only files with one link are accepted")
        raise EmbeddingError(msg)
    if st.st_size > cap:
        msg = f"{name}: output file {file} is {st.st_size} bytes, over its limit of {cap} bytes"
        raise EmbeddingError(msg)


@contextlib.contextmanager
def open_folder(folder: Path, *, name: str) -> Iterator[int]:
    """A descriptor of ``folder`` itself (never through a symbolic link)."""
    try:
        fd = os.open(folder, DIR_FLAGS)
    except OSError as e:
        msg = f"{name}: cannot open the output folder {folder} ({e.strerror})"
        raise EmbeddingError(msg) from None
    try:
        yield fd
    finally:
        os.close(fd)


def open_regular(dir_fd: int, file: str, cap: int, *, name: str) -> int | None:
    """A read descriptor of ``file`` in folder ``dir_fd``; ``None`` when there is no such name.

    ``lstat`` first, so a FIFO or device is never opened; then ``O_NOFOLLOW`` and a check
    that the opened file is the one inspected.

    Raises
    ------
    EmbeddingError
        Not a regular file with one link, or over ``cap`` bytes.
    """
    try:
        before = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        msg = f"{name}: cannot inspect output file {file} ({e.strerror})"
        raise EmbeddingError(msg) from None
    _check_stat(before, file, cap, name=name)
    try:
        fd = os.open(file, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        msg = f"{name}: cannot open output file {file} ({e.strerror})"
        raise EmbeddingError(msg) from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            msg = f"{name}: output file {file} was replaced while it was being opened"
            raise EmbeddingError(msg)
        _check_stat(now, file, cap, name=name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chunks(fd: int, cap: int, file: str, *, name: str) -> Iterator[bytes]:
    """The bytes of ``fd`` from its current offset, failing past ``cap`` (a file still growing)."""
    total = 0
    while chunk := os.read(fd, 1 << 22):
        total += len(chunk)
        if total > cap:
            msg = f"{name}: output file {file} grew over its limit of {cap} bytes"
            raise EmbeddingError(msg)
        yield chunk


def read_regular(dir_fd: int, file: str, cap: int, *, name: str) -> bytes | None:
    """The bytes of ``file`` in folder ``dir_fd``, opened as :func:`open_regular` opens it;
    ``None`` when there is no such name."""
    fd = open_regular(dir_fd, file, cap, name=name)
    if fd is None:
        return None
    try:
        return b"".join(_chunks(fd, cap, file, name=name))
    finally:
        os.close(fd)


def copy_fd(fd: int, dir_fd: int, file: str, cap: int, *, name: str) -> None:
    """Copy ``fd`` into a new file ``file`` of folder ``dir_fd`` (never an existing name)."""
    out = os.open(file, NEW_FILE_FLAGS, 0o644, dir_fd=dir_fd)
    try:
        for chunk in _chunks(fd, cap, file, name=name):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    finally:
        os.close(out)


def collect_output(output_dir: Path, dest: Path, files: Mapping[str, int], *, name: str) -> list[str]:
    """Copy the expected files of a container's ``/output`` into ``dest``, a new folder of czb's.

    Only the names in ``files`` are looked at: anything else the container left there is
    ignored (never listed, opened or kept), so a flood of files costs nothing but their
    removal. Each expected name that exists must be a regular file with one link, no
    larger than its cap; it is opened without following links and copied through that
    descriptor, so what is copied is what was checked.

    Parameters
    ----------
    files
        ``{file name: largest size in bytes}``.

    Returns
    -------
    The names copied (absent ones are left to the reader to report).

    Raises
    ------
    EmbeddingError
        One line naming the refused file: a symbolic link, hard link, folder, FIFO,
        device or socket, or a file over its cap.
    """
    copied = []
    with open_folder(output_dir, name=name) as source, open_folder(dest, name=name) as target:
        for file, cap in files.items():
            fd = open_regular(source, file, cap, name=name)
            if fd is None:
                continue
            try:
                copy_fd(fd, target, file, cap, name=name)
            finally:
                os.close(fd)
            copied.append(file)
    return copied


def read_tail(folder: Path, file: str, n: int, *, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``n`` lines of a regular file ``file`` in ``folder`` (its last ``max_bytes`` only)."""
    try:
        with open_folder(folder, name="embedding cache") as dir_fd:
            fd = open_regular(dir_fd, file, UNLIMITED, name="embedding cache")
            if fd is None:
                return []
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - max_bytes))
                lines = f.read(max_bytes).decode("utf-8", errors="replace").splitlines()
        return (lines[1:] if size > max_bytes else lines)[-n:]
    except (OSError, EmbeddingError):
        return []
