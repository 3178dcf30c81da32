"""Every task names the metric a compact table shows, and it is one of its metrics."""

from __future__ import annotations

import pytest

from czb.evaluation.registry import TASKS, TaskInfo, load_all, register_task
from czb.evaluation.task import Task


def test_every_tasks_headline_is_one_of_its_metrics():
    load_all()
    for name, cls in TASKS.items():
        assert cls.info.headline_metric in cls.info.metrics, name


def test_a_headline_that_is_not_a_metric_is_refused():
    class Odd(Task):
        info = TaskInfo(name="odd", description="", metrics=("silhouette_score",), headline="no_such_metric")

        def run(self, context, *, seed):  # pragma: no cover - never run
            return []

    load_all()
    with pytest.raises(ValueError, match="headline 'no_such_metric'"):
        register_task(Odd)
    assert "odd" not in TASKS
