"""Jobs in worker processes on this machine, bounded by its cores, GPUs and memory."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any

from czb.pipeline.executors import Job


def local_gpus() -> int:
    """NVIDIA GPUs visible here (``nvidia-smi -L``; 0 without it)."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _with_gpus(gpu_ids: list[int], fn: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``fn`` seeing only ``gpu_ids`` (``CUDA_VISIBLE_DEVICES``), as Ray runs a GPU task."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    try:
        return fn(*args, **kwargs)
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def local_memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().total / 2**30


class LocalExecutor:
    """Runs jobs in worker processes (loky: a crashed worker is replaced, and the
    crash is reported as that job's error).

    A job starts when the CPUs, GPUs and memory it declares are free; jobs that fit
    start in submission order, and a job that cannot fit even on an idle machine runs
    alone rather than never. A GPU job sees only the GPUs it was given
    (``CUDA_VISIBLE_DEVICES``); with no GPU detected, GPU jobs run one at a time and the
    model fails with its own reason, as with ``czb run``.

    Parameters
    ----------
    cpus
        CPU cores to use (default: all).
    memory_gb
        Memory to fill (default: 90% of this machine's).
    gpus
        GPUs to use (default: those ``nvidia-smi`` lists).
    """

    def __init__(self, *, cpus: int | None = None, memory_gb: float | None = None, gpus: int | None = None):
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_gb = memory_gb if memory_gb is not None else 0.9 * local_memory_gb()
        self.gpus = gpus if gpus is not None else local_gpus()
        self.slots = self.cpus
        self._queue: deque[Job] = deque()
        self._running: dict[Future, Job] = {}
        self._gpu_ids: dict[Future, list[int]] = {}
        self._pool: Any = None

    # resources ----------------------------------------------------------------------

    def _free(self) -> tuple[int, int, float]:
        jobs = list(self._running.values())
        return (self.cpus - sum(j.cpus for j in jobs), max(self.gpus, 1) - sum(j.gpus for j in jobs),
                self.memory_gb - sum(j.memory_gb or 0.0 for j in jobs))

    def _fits(self, job: Job) -> bool:
        if not self._running:
            return True  # alone on the machine: it gets everything there is
        cpus, gpus, memory = self._free()
        return job.cpus <= cpus and (job.gpus == 0 or job.gpus <= gpus) and (job.memory_gb or 0.0) <= memory

    # work ---------------------------------------------------------------------------

    def _free_gpu_ids(self, n: int) -> list[int]:
        taken = {i for ids in self._gpu_ids.values() for i in ids}
        return [i for i in range(self.gpus) if i not in taken][:n]

    def _start(self, job: Job, gpu_ids: list[int]) -> Future:
        """Submit to the pool, replacing a pool that a dead worker broke."""
        from concurrent.futures.process import BrokenProcessPool

        from joblib.externals.loky.process_executor import ProcessPoolExecutor

        call = (_with_gpus, gpu_ids, job.fn, job.args, job.kwargs) if gpu_ids else (job.fn, *job.args)
        kwargs = {} if gpu_ids else job.kwargs
        for _ in range(2):
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.cpus)
            try:
                return self._pool.submit(*call, **kwargs)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, kill_workers=True)
                self._pool = None
        msg = "cannot start a worker process"
        raise RuntimeError(msg)

    def _dispatch(self) -> None:
        waiting = deque()
        while self._queue:
            job = self._queue.popleft()
            if self._fits(job):
                gpu_ids = self._free_gpu_ids(job.gpus) if job.gpus and self.gpus else []
                future = self._start(job, gpu_ids)
                job.seconds = time.monotonic()  # its start, until it finishes
                self._running[future] = job
                self._gpu_ids[future] = gpu_ids
            else:
                waiting.append(job)
        self._queue = waiting

    def submit(self, job: Job) -> None:
        self._queue.append(job)
        self._dispatch()

    def wait(self, timeout: float | None = None) -> list[tuple[Job, Any, BaseException | None]]:
        if not self._running:
            return []
        done, _ = wait_futures(list(self._running), timeout=timeout, return_when=FIRST_COMPLETED)
        out = []
        for future in done:
            job = self._running.pop(future)
            self._gpu_ids.pop(future, None)
            job.seconds = time.monotonic() - job.seconds
            error = future.exception()
            out.append((job, None if error is not None else future.result(), error))
        self._dispatch()
        return out

    def running(self) -> int:
        return len(self._running)

    def queued(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, kill_workers=True)
            self._pool = None
        self._running.clear()
        self._gpu_ids.clear()
        self._queue.clear()
