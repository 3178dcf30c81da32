"""Wall time and peak resident memory of a block of work."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass
class Usage:
    """Filled in when the ``measure()`` block exits."""

    runtime_s: float = 0.0
    peak_memory_mb: float = 0.0


def _proc_children(pid: int) -> list[int]:
    """Direct children of ``pid`` from ``/proc/PID/task/TID/children`` (one short read per thread)."""
    children = []
    try:
        for task in (_PROC / str(pid) / "task").iterdir():
            children += [int(c) for c in (task / "children").read_text().split()]
    except OSError:  # the process (or one of its threads) exited meanwhile
        pass
    return children


def _proc_rss(pid: int) -> int:
    try:
        return int((_PROC / str(pid) / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):  # exited meanwhile
        return 0


def _proc_tree_rss() -> int:
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        total += _proc_rss(pid)
        todo += _proc_children(pid)
    return total


def _psutil_tree_rss() -> int:
    import psutil

    proc = psutil.Process()
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # the child exited meanwhile
            pass
    return total


def tree_rss() -> Callable[[], int]:
    """A function returning the resident bytes of this process and all its descendants.

    Where the kernel lists each thread's children (Linux with ``CONFIG_PROC_CHILDREN``),
    the tree is walked from there: a sample then costs a few small reads. psutil instead
    finds children by scanning every process on the machine (about 1 ms per 70 processes,
    taken while holding the GIL), which would slow the measured work itself.
    """
    if (_PROC / str(os.getpid()) / "task" / str(threading.get_native_id()) / "children").exists():
        return _proc_tree_rss
    return _psutil_tree_rss


@contextmanager
def measure(interval_s: float = 0.05):
    """Time the block and sample this process's RSS (children included) to find its peak."""
    rss = tree_rss()
    usage = Usage()
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield usage
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], rss())
        usage.runtime_s = time.perf_counter() - start
        usage.peak_memory_mb = peak[0] / 2**20
