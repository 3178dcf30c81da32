"""Executors run a suite's jobs: :class:`~czb.bench.executors.local.LocalExecutor` in
worker processes on this machine, :class:`~czb.bench.executors.ray.RayExecutor` on a
Ray cluster.

Both implement :class:`czb.pipeline.executors.Executor`: jobs declare the CPUs, GPUs and
memory they need, and an executor never runs more at once than its machines hold.
"""

from __future__ import annotations

from typing import Any

from czb.pipeline.executors import Executor


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
