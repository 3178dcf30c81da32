"""Executors run a suite's jobs: :class:`~czb.bench.executors.local.LocalExecutor` in
worker processes on this machine, :class:`~czb.bench.executors.ray.RayExecutor` on a
Ray cluster.

An executor takes :class:`Job`\\ s and hands back each one's outcome (its return value,
or the exception it raised or its worker died of); scheduling by dependencies and
retries are the suite runner's. Jobs declare the CPUs, GPUs and memory they need, and
an executor never runs more at once than its machines hold.
"""

from __future__ import annotations

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
    """What the suite runner needs of an executor."""

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


def make_executor(name: str, **options: Any) -> Executor:
    """``local`` or ``ray`` (``address=HOST:PORT``)."""
    from czb.core.errors import CzbError

    if name == "local":
        from czb.bench.executors.local import LocalExecutor

        return LocalExecutor(**options)
    if name == "ray":
        from czb.bench.executors.ray import RayExecutor

        return RayExecutor(**options)
    msg = f"unknown executor {name!r}; use local or ray"
    raise CzbError(msg)
