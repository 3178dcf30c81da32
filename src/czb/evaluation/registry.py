"""The one registry of metrics and tasks.

Every metric and task declares its metadata as data next to its code, by calling
:func:`register_metric` / decorating with :func:`register_task` in its own module.
Adding a metric touches one place: its module (plus a test).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Literal, TypeVar


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is, as data.

    Attributes
    ----------
    name
        Stable identifier written into results (cz-benchmarks' ``MetricType``
        string where the metric is theirs, so results compare).
    description
        One sentence: what is measured.
    reference
        DOI (or URL) of the definition followed.
    range
        ``(low, high)`` of possible values; ``None`` for unbounded ends.
    higher_is_better
        Direction of improvement.
    stochastic
        Whether the value depends on the seed.
    per_cell_mean
        Whether the value is a mean of per-cell values (possibly within strata, e.g. per
        label then over labels): its tasks record a bootstrap CI over cells (or donors),
        which is how the report tests a deterministic value against the baseline.
    aggregate
        Whether the value combines other metrics (scIB's totals): the report shows the
        ``random`` embedding's value and the bio-conservation floor beside it.
    """

    name: str
    description: str
    reference: str
    range: tuple[float | None, float | None] = (0.0, 1.0)
    higher_is_better: bool = True
    stochastic: bool = False
    per_cell_mean: bool = False
    aggregate: bool = False


@dataclass(frozen=True)
class TaskInfo:
    """What a task is, as data.

    Attributes
    ----------
    name
        Implementation name referred to by task specs (``implementation:``).
    description
        One sentence.
    metrics
        Names of the metrics the task reports (all registered).
    requires
        Roles the dataset must provide besides the embedding: ``labels``,
        ``batch``, ``time_point``, ...
    stochastic
        Whether the task has random steps (then it runs once per seed).
    reference
        DOI of the benchmark whose definition is followed.
    cost
        What the task computes beyond the benchmark it follows, and what that costs
        (shown by ``czb list tasks``); empty when it computes no more.
    """

    name: str
    description: str
    metrics: tuple[str, ...]
    requires: tuple[str, ...] = ("labels",)
    stochastic: bool = True
    reference: str = ""
    cost: str = ""
    kind: Literal["cell", "multi_dataset", "perturbation"] = "cell"
    extra: dict = field(default_factory=dict)
    #: The metric a compact table shows (``czb run``'s); default the first of :attr:`metrics`.
    headline: str | None = None

    @property
    def headline_metric(self) -> str:
        return self.headline or self.metrics[0]


METRICS: dict[str, MetricInfo] = {}
#: Task classes (:class:`czb.evaluation.task.Task` subclasses) by name. The registry is
#: typed without importing them: ``task`` imports ``TaskInfo`` from here.
TASKS: dict[str, type] = {}
TaskClass = TypeVar("TaskClass", bound=type)

#: Packages whose modules register metrics and tasks when imported; every module in them
#: is loaded on first lookup, so a new metric or task module needs no entry here.
_PACKAGES = ("czb.evaluation.metrics", "czb.evaluation.tasks", "czb.evaluation.perturbation")


def register_metric(info: MetricInfo) -> MetricInfo:
    """Add a metric to :data:`METRICS`; returns ``info`` so modules can keep a handle."""
    if info.name in METRICS and METRICS[info.name] != info:
        msg = f"metric {info.name!r} registered twice with different metadata"
        raise ValueError(msg)
    METRICS[info.name] = info
    return info


def register_task(cls: TaskClass) -> TaskClass:
    """Class decorator adding a task to :data:`TASKS`."""
    missing = [m for m in cls.info.metrics if m not in METRICS]
    if missing:
        msg = f"task {cls.info.name!r} reports unregistered metrics {missing}"
        raise ValueError(msg)
    if cls.info.headline_metric not in cls.info.metrics:
        msg = f"task {cls.info.name!r}: headline {cls.info.headline!r} is not one of its metrics"
        raise ValueError(msg)
    TASKS[cls.info.name] = cls
    return cls


def load_all() -> None:
    """Import every metric and task module (idempotent)."""
    for name in _PACKAGES:
        package = importlib.import_module(name)
        for module in pkgutil.walk_packages(package.__path__, f"{name}."):
            importlib.import_module(module.name)


def get_task(name: str) -> type:
    """The task implementation registered under ``name``."""
    from czb.core.errors import UnknownNameError

    load_all()
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownNameError("task", name, TASKS) from None
