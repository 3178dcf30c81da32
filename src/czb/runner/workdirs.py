"""Folders czb makes while it works (weights staging, container runs), named after the
process that made them, so that a later run can clear what a killed one left behind.

A folder's name carries ``<pid>@<host>``: a later run on the same host removes it once
that process is gone. Folders of another host (a shared cache) are left to their own
host, or to age.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

#: Folders this old may be cleared whoever made them (no staging or run takes a day).
STALE_AFTER_S = 24 * 3600
#: What :func:`process_tag` looks like inside a folder name.
TAG_PATTERN = r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)"


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
