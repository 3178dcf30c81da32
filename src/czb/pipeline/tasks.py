"""Tasks as a run plans them: a task spec with its implementation built (parameters validated)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from czb.evaluation.registry import get_task
from czb.evaluation.task import Task
from czb.specs.schema import TaskSpec


@dataclass
class PlannedTask:
    spec: TaskSpec
    task: Task


def build_tasks(specs: Sequence[TaskSpec]) -> list[PlannedTask]:
    """Instantiate each task spec's implementation with its parameters (validated now)."""
    return [PlannedTask(spec, get_task(spec.implementation)(**spec.parameters)) for spec in specs]
