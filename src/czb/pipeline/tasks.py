"""Tasks as a run plans them: a task spec with its implementation built (parameters validated)."""

from __future__ import annotations

from dataclasses import dataclass

from czb.evaluation.registry import get_task
from czb.evaluation.task import Task
from czb.specs.schema import TaskSpec


@dataclass
class PlannedTask:
    """A task spec and its implementation, built with the spec's parameters."""

    spec: TaskSpec
    task: Task

    @classmethod
    def build(cls, spec: TaskSpec) -> PlannedTask:
        """Instantiate the spec's implementation (its parameters are validated now)."""
        return cls(spec, get_task(spec.implementation)(**spec.parameters))
