"""What every task is and what it reads: parameters, metric values, ``run(context, seed)``,
and the context interface every task runs on (:class:`TaskContext`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from czb.core.errors import NotApplicableError, TaskError
from czb.evaluation.estimates import Bootstrap, Estimate
from czb.evaluation.registry import TaskInfo


@dataclass
class MetricValue:
    """One metric value from one seed. ``params`` distinguishes variants (e.g. classifier);
    ``ci95`` is the 95% confidence interval of a value estimated from sampled cells;
    ``bootstrap`` the bootstrap CI over cells (or donors) of a per-cell mean."""

    name: str
    value: float
    params: dict[str, Any] = field(default_factory=dict)
    ci95: tuple[float, float] | None = None
    bootstrap: Bootstrap | None = None

    @classmethod
    def from_estimate(cls, name: str, estimate: Estimate, **params: Any) -> MetricValue:
        """The value of ``estimate`` (:class:`~czb.evaluation.estimates.Estimate`) with
        its CIs: how tasks report a mean over cells."""
        return cls(name, estimate.value, dict(params), estimate.ci95, estimate.bootstrap)


class TaskParams(BaseModel):
    """Base of every task's parameter model; unknown parameters are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(ABC):
    """A benchmark task.

    Subclasses set :attr:`info`, a nested ``Params`` model, and implement :meth:`run`.
    """

    info: ClassVar[TaskInfo]
    Params: ClassVar[type[TaskParams]] = TaskParams
    #: Whether the task compares the embedding with the data before integration (the
    #: context's ``pre_integration``: the dataset's PCA baseline), which the pipeline then
    #: supplies; a task must still run without it.
    reads_pre_integration: ClassVar[bool] = False

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
            msg = f"task {self.info.name!r}: bad parameters: {problems}"
            raise TaskError(msg) from None

    def neighbors_needed(self, n_cells: int) -> int:
        """Neighbours per cell (self included) this task reads from the shared graph; 0 = none."""
        return 0

    def neighborhoods_needed(self, n_cells: int) -> int:
        """Neighbours (self included) of every cell this task averages over
        (:meth:`~czb.evaluation.context.EvaluationContext.cell_neighborhoods`); 0 = none."""
        return 0

    def relationship_sources(self, declared: Sequence[str] | None) -> tuple[str, ...]:
        """Known-relationship sources this task reads, given those the dataset declares
        (``None``: none declared); the caller loads them into the context's
        ``relationships`` before scoring. None by default."""
        return ()

    def check(self, context: TaskContext) -> None:
        """Raise :class:`NotApplicableError` when the data lack a role this task needs
        (``expression``: the context's expression matrix).

        Runs before any heavy work.
        """
        def lacks(need: str) -> bool:
            if need == "expression":
                return getattr(context, "expression", None) is None
            return context.role(need) is None

        missing = [need for need in self.info.requires if lacks(need)]
        if missing:
            msg = f"task {self.info.name!r} needs {', '.join(missing)} but the data have none"
            raise NotApplicableError(msg)

    @abstractmethod
    def run(self, context: TaskContext, *, seed: int) -> list[MetricValue]:
        """Compute this task's metrics for one seed."""


class TaskContext:
    """What every task reads besides its data: per-cell roles, :meth:`require`, and
    :meth:`memo` for values several tasks or seeds share.

    Subclasses fill ``_roles`` (role name → ``(n_cells,)`` array) and ``n_jobs``.
    """

    _roles: dict[str, np.ndarray]
    _memo: dict[tuple, Any]
    n_jobs: int
    #: How estimable values used by the running task were computed (see :meth:`note`).
    notes: dict[str, Any]

    def role(self, role: str) -> np.ndarray | None:
        """Per-cell values of a role (``labels``, ``batch``, ``condition``...), or ``None``."""
        return self._roles.get(role)

    def require(self, role: str) -> np.ndarray:
        values = self.role(role)
        if values is None:
            msg = f"the data have no {role}"
            raise NotApplicableError(msg)
        return values

    def plan(self, tasks: Iterable[Task]) -> None:
        """Prepare shared work for ``tasks`` (nothing by default)."""

    def drop_background(self) -> None:
        """Stop background work a task started but never collected (none by default)."""

    def note(self, what: str, how: dict[str, Any]) -> None:
        """Record how ``what`` (e.g. ``neighbors``, ``silhouette_label``) was computed
        for the task now running (exact, or approximate with its measured error)."""
        self.notes[what] = how

    def skip_metric(self, metric: str, reason: str) -> None:
        """Record that the running task leaves ``metric`` out (the task does not report
        it) because it is not defined on these data (:mod:`czb.evaluation.applicability`);
        ``reason`` goes into the result's ``computation['not_applicable']``."""
        self.notes.setdefault("not_applicable", {})[metric] = reason

    def scoped(self, task: Task) -> TaskContext:
        """The context ``task`` runs on (this one unless a subclass restricts cells)."""
        return self

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per key for this context, so tasks (and seeds) share
        expensive values (e.g. the label silhouette of ``embedding`` and ``batch_integration``)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
