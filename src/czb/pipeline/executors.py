"""What runs a plan's jobs: the :class:`Job` and :class:`Executor` protocol, and the
:class:`InProcessExecutor` that ``czb run`` uses.

An executor takes :class:`Job`\\ s and hands back each one's outcome (its return value,
or the exception it raised or its worker died of); scheduling by dependencies and
retries are :mod:`czb.pipeline.execute`'s. Jobs declare the CPUs, GPUs and memory they
need, and an executor never runs more at once than its machines hold. Executors that
run jobs in other processes or on other machines are :mod:`czb.bench.executors`'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(eq=False)
class Job:
    """A function call and what it needs to run."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    cpus: int = 1
    gpus: int = 0
    memory_gb: float | None = None
    #: The runner's bookkeeping (unit keys, attempt number).
    tag: Any = None
    #: Wall seconds from its start to its end, set by the executor when it finishes.
    seconds: float = 0.0


class Executor(Protocol):
    """What the plan runner needs of an executor."""

    #: How many jobs can run at once (for progress and ETA).
    slots: int

    def submit(self, job: Job) -> None:
        """Queue ``job``; it starts when resources allow."""

    def wait(self, timeout: float | None = None) -> list[tuple[Job, Any, BaseException | None]]:
        """Jobs that finished since the last call, as ``(job, result, error)``; waits up to
        ``timeout`` seconds for at least one when none has."""

    def running(self) -> int:
        """Jobs started and not finished."""

    def queued(self) -> int:
        """Jobs submitted and not started."""

    def shutdown(self) -> None:
        """Stop every worker (jobs still running are abandoned)."""


class InProcessExecutor:
    """Runs jobs one at a time in this process, when :meth:`wait` is called.

    Nothing is pickled, so a job may carry what cannot cross processes (a callback that
    streams container logs to the terminal). Score jobs go before embed jobs: the
    embeddings of one dataset are scored before the next dataset is embedded, so the
    dataset a job loads is usually the one loaded last (:func:`czb.pipeline.work.load_checked`
    keeps it). An exception of a ``fatal`` type, or any with ``raise_errors``
    (``czb --debug``), propagates; otherwise it is handed back as the job's outcome, like
    any executor's.
    """

    slots = 1

    def __init__(self, *, raise_errors: bool = False, fatal: tuple[type[BaseException], ...] = (),
                 on_start: Callable[[Job], None] | None = None):
        self.raise_errors, self.fatal = raise_errors, fatal
        self.on_start = on_start
        self._queue: list[Job] = []

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def wait(self, timeout: float | None = None) -> list[tuple[Job, Any, BaseException | None]]:
        if not self._queue:
            return []
        # First a score job (tag kind "score"), else the oldest job.
        index = next((i for i, j in enumerate(self._queue) if _kind(j) == "score"), 0)
        job = self._queue.pop(index)
        if self.on_start is not None:
            self.on_start(job)
        start = time.perf_counter()
        try:
            result, error = job.fn(*job.args, **job.kwargs), None
        except Exception as e:  # noqa: BLE001 - a job's failure is its outcome
            if self.raise_errors or isinstance(e, self.fatal):
                raise
            result, error = None, e
        job.seconds = time.perf_counter() - start
        return [(job, result, error)]

    def running(self) -> int:
        return 0

    def queued(self) -> int:
        return len(self._queue)

    def shutdown(self) -> None:
        self._queue.clear()


def _kind(job: Job) -> str | None:
    return job.tag[0] if isinstance(job.tag, tuple) and job.tag else None
