"""Folders czb makes while it works (weights staging, container runs), named after the
process that made them, so that a later run can clear what a killed one left behind; and
:func:`remove_tree`, which removes such a folder whatever was left inside it.

A folder's name carries ``<pid>@<host>``: a later run on the same host removes it once
that process is gone. Folders of another host (a shared cache) are left to their own
host, or to age.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import time
from pathlib import Path

#: Folders this old may be cleared whoever made them (no staging or run takes a day).
STALE_AFTER_S = 24 * 3600
#: What :func:`process_tag` looks like inside a folder name.
TAG_PATTERN = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)"
#: Opens a folder itself, never what a symbolic link in its place points to.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def host_tag() -> str:
    """This host's name as it goes into folder names (letters, digits, '.', '_')."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"


def process_tag() -> str:
    """``<pid>@<host>``: lets a later run tell whether the process that made a folder is gone."""
    return f"{os.getpid()}@{host_tag()}"


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this host (``False`` when it cannot tell)."""
    if pid <= 0:
        return False  # 0 and below name process groups, not a process
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # the second: a number no process can have
        return True
    except (PermissionError, OSError):  # alive (another user's), or cannot tell
        return False
    return False


def stale_folders(parent: Path, pattern: str, *, age_clears_tagged: bool) -> list[Path]:
    """Folders (not links) under ``parent`` whose names match ``pattern`` and that were
    left behind: tagged by a process of this host that is gone, or untagged (an older
    czb's) and more than :data:`STALE_AFTER_S` old.

    Parameters
    ----------
    pattern
        A regular expression the whole name must match; the tag, when the name has one,
        in the groups of :data:`TAG_PATTERN` (``pid``, ``host``).
    age_clears_tagged
        Clear tagged folders by age too (another host's, whose process cannot be asked):
        right where nothing takes a day (staging), wrong where a run may (containers).
    """
    matcher = re.compile(pattern)
    host = host_tag()
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = matcher.fullmatch(entry.name)
        try:
            if match is None or not entry.is_dir(follow_symlinks=False):
                continue
            pid = match.group("pid")
            old = time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if pid is None:
            gone = old
        else:
            mine = match.group("host") == host and int(pid) != os.getpid()
            gone = (mine and process_gone(int(pid))) or (age_clears_tagged and old)
        if gone:
            stale.append(Path(entry.path))
    return stale


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a folder, or anything else) without following links or leaving
    its file system, however deep it goes and whatever its owner did to the permissions
    of the folders inside.

    A container may leave a tree thousands of folders deep (deeper than Python's
    recursion and than ``PATH_MAX``), so the walk is iterative and goes by descriptor,
    one folder at a time: it never builds long paths and holds at most three
    descriptors.

    Raises
    ------
    OSError
        Something could not be removed (the caller decides whether that matters).
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        path.unlink()
        return
    fd = _open_folder_to_remove(os.fspath(path), None)
    try:
        _empty_folder(fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _open_folder_to_remove(name: str, dir_fd: int | None) -> int:
    """A descriptor of folder ``name``, made readable and writable (a container's user,
    which on a rootless engine is ours, may have left it mode 000)."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        _unlock(name, dir_fd)
        fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    with contextlib.suppress(OSError):
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
            os.fchmod(fd, 0o700)
    return fd


def _unlock(name: str, dir_fd: int | None) -> None:
    """``chmod 700`` the folder ``name`` itself, never what a link in its place points to:
    through an ``O_PATH`` descriptor opened without following links, where Linux has one."""
    o_path = getattr(os, "O_PATH", 0)
    if not o_path or not os.path.isdir("/proc/self/fd"):
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return
    fd = os.open(name, o_path | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)


def _empty_folder(root_fd: int) -> None:
    """Remove everything inside the folder ``root_fd``, depth first, without recursion.

    Going down opens a child relative to its parent; going up opens ``..`` and checks it
    is the folder that was left (device and inode), so a tree changed meanwhile stops
    the walk rather than leading it elsewhere. A folder on another file system (a mount
    point) is refused, never entered.
    """
    root = os.fstat(root_fd)
    trail: list[tuple[str, int, int]] = []  # (name, device, inode) of each folder above the current one
    fd = os.dup(root_fd)
    try:
        while True:
            child, removed = None, 0
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
            if child is None and removed:
                continue  # look again: a listing need not show names while others go
            if child is not None:
                here = os.fstat(fd)
                child_fd = _open_folder_to_remove(child, fd)
                if os.fstat(child_fd).st_dev != root.st_dev:
                    os.close(child_fd)
                    msg = f"{child} is a mount point"
                    raise OSError(errno.EXDEV, msg)
                trail.append((child, here.st_dev, here.st_ino))
                os.close(fd)
                fd = child_fd
                continue
            if not trail:
                return  # the root is empty
            name, device, inode = trail.pop()
            parent_fd = root_fd if not trail else os.open("..", DIR_FLAGS, dir_fd=fd)
            parent = os.fstat(parent_fd)
            if (parent.st_dev, parent.st_ino) != (device, inode):
                if parent_fd != root_fd:
                    os.close(parent_fd)
                msg = "the tree changed while it was being removed"
                raise OSError(errno.ESTALE, msg)
            os.close(fd)
            fd = os.dup(parent_fd) if parent_fd == root_fd else parent_fd
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
