"""What every task is: parameters, requirements, and ``run(context, seed)``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from czb.errors import NotApplicableError, TaskError
from czb.evaluation.registry import TaskInfo

if TYPE_CHECKING:
    from czb.evaluation.context import EvaluationContext


@dataclass
class MetricValue:
    """One metric value from one seed. ``params`` distinguishes variants (e.g. classifier);
    ``ci95`` is the 95% confidence interval of a value estimated from sampled cells."""

    name: str
    value: float
    params: dict[str, Any] = field(default_factory=dict)
    ci95: tuple[float, float] | None = None


class TaskParams(BaseModel):
    """Base of every task's parameter model; unknown parameters are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(ABC):
    """A benchmark task.

    Subclasses set :attr:`info`, a nested ``Params`` model, and implement :meth:`run`.
    """

    info: ClassVar[TaskInfo]
    Params: ClassVar[type[TaskParams]] = TaskParams

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

    def check(self, context: EvaluationContext) -> None:
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
    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        """Compute this task's metrics for one seed."""
