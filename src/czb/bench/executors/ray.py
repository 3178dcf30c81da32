"""Jobs as Ray tasks on a cluster, placed by Ray's resource scheduler.

Each job becomes one task asking for the CPUs, GPUs and memory it declares: an embed
unit of a model whose spec asks for a GPU runs on a node with a free GPU, scoring jobs
on CPU nodes. Ray's own retries are off: a task that dies with its worker or node comes
back as an error and the suite runner retries it, with the same bounded count as any
other failure. Every node needs czb installed (the jobs are czb's functions) and must
reach the store and the datasets' URIs.
"""

from __future__ import annotations

import time
from typing import Any

from czb.core.errors import CzbError
from czb.pipeline.executors import Job


def _call(fn: Any, args: tuple, kwargs: dict) -> Any:
    return fn(*args, **kwargs)


class RayExecutor:
    """Runs jobs on the Ray cluster at ``address`` (``HOST:PORT``; ``None``: the one
    ``RAY_ADDRESS`` names, or a new local one).

    Jobs count as running from submission: Ray queues them until a node has their
    resources.
    """

    def __init__(self, *, address: str | None = None):
        try:
            import ray
        except ImportError:
            msg = "the ray executor needs Ray: pip install 'czb[cluster]'"
            raise CzbError(msg) from None
        self._ray = ray
        self._owns_connection = not ray.is_initialized()
        if self._owns_connection:
            try:
                ray.init(address=address, namespace="czb", log_to_driver=False, configure_logging=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                msg = f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS'}: {e}"
                raise CzbError(msg) from e
        self.slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(_call)
        self._running: dict[Any, Job] = {}

    def submit(self, job: Job) -> None:
        options: dict[str, Any] = {"num_cpus": job.cpus, "num_gpus": job.gpus, "max_retries": 0}
        if job.memory_gb:
            options["memory"] = int(job.memory_gb * 2**30)
        ref = self._task.options(name=job.label or job.fn.__name__, **options).remote(job.fn, job.args, job.kwargs)
        job.seconds = time.monotonic()
        self._running[ref] = job

    def wait(self, timeout: float | None = None) -> list[tuple[Job, Any, BaseException | None]]:
        ray = self._ray
        if not self._running:
            return []
        refs = list(self._running)
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        if ready:  # and whatever else is ready by now
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        out = []
        for ref in ready:
            job = self._running.pop(ref)
            job.seconds = time.monotonic() - job.seconds
            try:
                out.append((job, ray.get(ref), None))
            except ray.exceptions.RayTaskError as e:  # the job raised: hand back its own exception
                cause = e.as_instanceof_cause()
                out.append((job, None, getattr(cause, "cause", None) or cause))
            except ray.exceptions.RayError as e:  # its worker or node died, or its result was lost
                out.append((job, None, e))
        return out

    def running(self) -> int:
        return len(self._running)

    def queued(self) -> int:
        return 0

    def shutdown(self) -> None:
        for ref in self._running:
            self._ray.cancel(ref, force=True)
        self._running.clear()
        if self._owns_connection:
            self._ray.shutdown()
