"""Run tasks on a context: each task once per seed (once if deterministic), failures and
inapplicable data as results, values aggregated over seeds; :func:`evaluate` scores one
embedding on several tasks."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from czb.core.errors import NotApplicableError
from czb.evaluation.context import EvaluationContext
from czb.evaluation.estimates import Bootstrap
from czb.evaluation.registry import get_task
from czb.evaluation.resources import measure
from czb.evaluation.task import MetricValue, Task, TaskContext

Status = Literal["ok", "failed", "not_applicable"]
DEFAULT_SEEDS = (0, 1, 2)


@dataclass
class AggregatedMetric:
    """A metric over seeds: mean, sample standard deviation, and every value.

    ``ci95`` is the confidence interval of an estimated value, ``bootstrap`` the bootstrap
    CI over cells (or donors) of a per-cell mean; each kept only when every seed reports
    the same value and interval (a seed-independent value, computed once)."""

    name: str
    value: float
    value_std_dev: float | None
    values_raw: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    ci95: tuple[float, float] | None = None
    bootstrap: Bootstrap | None = None


@dataclass
class TaskResult:
    """The outcome of one task on one embedding."""

    task: str
    status: Status
    metrics: list[AggregatedMetric] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    error: str | None = None
    runtime_s: float = 0.0
    peak_memory_mb: float = 0.0
    #: How estimable values were computed (neighbour graph, silhouettes): see ``TaskContext.note``.
    computation: dict[str, Any] = field(default_factory=dict)

    def metric(self, name: str, **params: Any) -> AggregatedMetric:
        """The metric called ``name`` whose params include ``params``."""
        for m in self.metrics:
            if m.name == name and all(m.params.get(k) == v for k, v in params.items()):
                return m
        msg = f"{self.task} has no metric {name!r} with params {params}"
        raise KeyError(msg)


def aggregate(values: Iterable[MetricValue]) -> list[AggregatedMetric]:
    """Group per-seed values by (name, params) and summarise each group."""
    groups: dict[tuple, list[MetricValue]] = {}
    for v in values:
        groups.setdefault((v.name, tuple(sorted(v.params.items()))), []).append(v)
    out = []
    for (name, params), group in groups.items():
        raw = [float(v.value) for v in group]
        finite = [x for x in raw if np.isfinite(x)]
        mean = statistics.fmean(finite) if finite else float("nan")
        std = statistics.stdev(finite) if len(finite) > 1 else None
        cis = {(v.value, v.ci95) for v in group}
        ci95 = group[0].ci95 if len(cis) == 1 else None
        boots = {(v.value, v.bootstrap) for v in group}
        bootstrap = group[0].bootstrap if len(boots) == 1 else None
        out.append(AggregatedMetric(name, mean, std, raw, dict(params), ci95, bootstrap))
    return out


def run_task(
    task: Task, context: TaskContext, seeds: Sequence[int], *, raise_errors: bool = False
) -> TaskResult:
    """Run ``task`` once per seed (once if it is deterministic).

    A failing task becomes a ``failed`` result unless ``raise_errors`` (for debugging).
    """
    seeds = list(seeds) if task.info.stochastic else list(seeds)[:1]
    name = task.info.name
    context.notes = {}
    excluded: dict[str, int] = {}
    try:
        # Cells without a label (or batch) the task needs are left out, and counted.
        context = context.scoped(task)
        context.notes = {}
        excluded = dict(getattr(context, "excluded", {}))
        task.check(context)
    except NotApplicableError as e:
        return TaskResult(name, "not_applicable", seeds=seeds, error=str(e), computation=excluded)
    except Exception as e:  # noqa: BLE001 - e.g. a resource the task reads cannot be fetched
        if raise_errors:
            raise
        return TaskResult(name, "failed", seeds=seeds, error=f"{type(e).__name__}: {e}", computation=excluded)
    values: list[MetricValue] = []
    error: str | None = None
    with measure() as usage:
        try:
            for seed in seeds:
                values += task.run(context, seed=seed)
        except NotApplicableError as e:
            return TaskResult(name, "not_applicable", seeds=seeds, error=str(e),
                              computation={**excluded, **context.notes})
        except Exception as e:  # noqa: BLE001 - one task's crash must not lose the others' results
            if raise_errors:
                raise
            error = f"{type(e).__name__}: {e}"
        finally:
            context.drop_background()
    computation = {**excluded, **context.notes}
    if error is not None:
        return TaskResult(name, "failed", seeds=seeds, error=error, runtime_s=usage.runtime_s,
                          peak_memory_mb=usage.peak_memory_mb, computation=computation)
    if not values:  # nothing is defined on these data
        reasons = "; ".join(f"{k}: {v}" for k, v in context.notes.get("not_applicable", {}).items())
        return TaskResult(name, "not_applicable", seeds=seeds, error=reasons or "the task reported no metric",
                          runtime_s=usage.runtime_s, peak_memory_mb=usage.peak_memory_mb, computation=computation)
    return TaskResult(name, "ok", aggregate(values), seeds, None, usage.runtime_s, usage.peak_memory_mb,
                      computation=computation)


def evaluate(
    X: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    batches: np.ndarray | None = None,
    roles: Mapping[str, np.ndarray] | None = None,
    tasks: Sequence[str | Task] = ("clustering", "embedding", "label_prediction", "batch_integration"),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    n_jobs: int = 1,
    exact: bool | None = None,
    pre_integration: np.ndarray | None = None,
) -> list[TaskResult]:
    """Score an embedding on several tasks, sharing one neighbour graph.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels, batches
        ``(n_cells,)`` cell labels and batch labels.
    roles
        Further per-cell annotations (``time_point``...).
    tasks
        Registered task names (default parameters) or configured :class:`Task` objects.
    seeds
        Seeds of stochastic steps; deterministic tasks use the first only.
    n_jobs
        Worker processes for tasks that parallelise.
    exact
        Exact neighbour graph and silhouettes at any size (``True``), approximate ones at
        any size (``False``), or by size (``None``); see :class:`EvaluationContext`.
    pre_integration
        ``(n_cells, d)`` representation before integration (e.g. the data's PCA), rows
        as ``X``'s, for ``pcr_comparison``; ``None``: that metric is left out.

    Returns
    -------
    One :class:`TaskResult` per task, in order; failures are results, not exceptions.
    """
    task_objs = [get_task(t)() if isinstance(t, str) else t for t in tasks]
    context = EvaluationContext(X, labels=labels, batches=batches, roles=roles, n_jobs=n_jobs, exact=exact,
                                pre_integration=pre_integration)
    context.plan(task_objs)
    return [run_task(t, context, seeds) for t in task_objs]
