"""The one registry of metrics and tasks.

Every metric and task declares its metadata as data next to its code, by calling
:func:`register_metric` / decorating with :func:`register_task` in its own module.
Adding a metric touches one place: its module (plus a test).
"""

from __future__ import annotations

import importlib
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
    """

    name: str
    description: str
    reference: str
    range: tuple[float | None, float | None] = (0.0, 1.0)
    higher_is_better: bool = True
    stochastic: bool = False


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
    """

    name: str
    description: str
    metrics: tuple[str, ...]
    requires: tuple[str, ...] = ("labels",)
    stochastic: bool = True
    reference: str = ""
    kind: Literal["cell", "multi_dataset", "perturbation"] = "cell"
    extra: dict = field(default_factory=dict)


METRICS: dict[str, MetricInfo] = {}
#: Task classes (:class:`czb.evaluation.task.Task` subclasses) by name. The registry is
#: typed without importing them: ``task`` imports ``TaskInfo`` from here.
TASKS: dict[str, type] = {}
TaskClass = TypeVar("TaskClass", bound=type)

# Modules whose import registers metrics and tasks; loaded on first lookup.
_MODULES = (
    "czb.evaluation.metrics.clustering",
    "czb.evaluation.metrics.silhouette",
    "czb.evaluation.metrics.mixing",
    "czb.evaluation.metrics.classification",
    "czb.evaluation.metrics.aggregate",
    "czb.evaluation.perturbation.prediction.metrics",
    "czb.evaluation.metrics.sequential",
    "czb.evaluation.perturbation.hierarchy.mixing_probe_metrics",
    "czb.evaluation.perturbation.hierarchy.consistency_knn_metrics",
    "czb.evaluation.perturbation.hierarchy.recall_metrics",
    "czb.evaluation.perturbation.hierarchy.reconstruction_metrics",
    "czb.evaluation.tasks.clustering",
    "czb.evaluation.tasks.sequential_organization",
    "czb.evaluation.tasks.embedding",
    "czb.evaluation.tasks.label_prediction",
    "czb.evaluation.tasks.batch_integration",
    "czb.evaluation.tasks.cross_species_integration",
    "czb.evaluation.tasks.cross_species_label_prediction",
    "czb.evaluation.perturbation.prediction.task",
    "czb.evaluation.perturbation.hierarchy.ilisi",
    "czb.evaluation.perturbation.hierarchy.linear_probe",
    "czb.evaluation.perturbation.hierarchy.consistency",
    "czb.evaluation.perturbation.hierarchy.knn_organization",
    "czb.evaluation.perturbation.hierarchy.relationship_recall",
    "czb.evaluation.perturbation.hierarchy.reconstruction",
)


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
    TASKS[cls.info.name] = cls
    return cls


def load_all() -> None:
    """Import every metric and task module (idempotent)."""
    for module in _MODULES:
        importlib.import_module(module)


def get_task(name: str) -> type:
    """The task implementation registered under ``name``."""
    from czb.core.errors import UnknownNameError

    load_all()
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownNameError("task", name, TASKS) from None
