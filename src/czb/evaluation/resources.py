"""Wall time and peak resident memory of a block of work."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Usage:
    """Filled in when the ``measure()`` block exits."""

    runtime_s: float = 0.0
    peak_memory_mb: float = 0.0


@contextmanager
def measure(interval_s: float = 0.05):
    """Time the block and sample this process's RSS (children included) to find its peak."""
    import psutil

    proc = psutil.Process()
    usage = Usage()
    peak = [0]
    stop = threading.Event()

    def rss() -> int:
        total = proc.memory_info().rss
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:  # the child exited meanwhile
                pass
        return total

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
