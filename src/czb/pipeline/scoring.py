"""Embedding a dataset with one source and scoring tasks on the result, one record per task.

A source that fails to embed, or a task that fails, becomes a ``failed`` record; it is never
dropped. A model that does not produce what a task scores gets a ``not_applicable`` record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import czb
from czb.core import records as R
from czb.core.errors import CzbError, NotApplicableError
from czb.data.dataset import Dataset
from czb.data.relationship_sources import load_sources
from czb.evaluation.context import EvaluationContext
from czb.evaluation.resources import measure
from czb.evaluation.runner import TaskResult, run_task
from czb.evaluation.task import Task
from czb.pipeline.dataset_views import dataset_record
from czb.pipeline.tasks import PlannedTask

Progress = Callable[[str], None]


def result_record(
    *,
    dataset: R.DatasetRecord,
    model: dict[str, Any],
    planned: PlannedTask,
    result: TaskResult,
    command: str,
    embedding_runtime_s: float,
) -> R.ResultRecord:
    """The result record of one task on one model's output for one dataset."""
    return R.ResultRecord(
        czb_version=czb.__version__,
        created_at=R.now_utc(),
        command=command,
        host=R.host_record(),
        dataset=dataset,
        model=R.ModelRecord(
            name=model["name"],
            kind=model["kind"],
            image_digest=model.get("image_digest") or ("in-process" if model["kind"] != "docker" else "unresolved"),
            parameters=model.get("parameters", {}),
            info=model.get("info", {}),
        ),
        task=R.TaskRecord(
            name=planned.spec.name,
            implementation=planned.spec.implementation,
            parameters=planned.task.params.model_dump(mode="json"),
        ),
        seeds=result.seeds,
        status=result.status,
        error=result.error,
        metrics=[
            R.MetricRecord(
                name=m.name,
                value=m.value,
                value_std_dev=m.value_std_dev,
                values_raw=m.values_raw,
                params=m.params,
                ci95=list(m.ci95) if m.ci95 is not None else None,
            )
            for m in result.metrics
        ],
        runtime_s=result.runtime_s,
        embedding_runtime_s=embedding_runtime_s,
        peak_memory_mb=result.peak_memory_mb,
        computation=result.computation,
    )


@dataclass
class Embedded:
    """The outcome of embedding one dataset with one source: an embedding, or why not."""

    model: dict[str, Any]
    embedding: Any = None
    status: str = "ok"
    error: str | None = None
    runtime_s: float = 0.0

    @property
    def cell_index(self) -> np.ndarray | None:
        """The dataset cells the embedding's rows belong to (``None``: all, or no embedding)."""
        return self.embedding.cell_index if self.embedding is not None else None


def embed_dataset(source: Any, ds: Dataset, *, seed: int, raise_errors: bool = False) -> Embedded:
    """Embed ``ds`` with ``source``; a failure or a not-applicable model is returned, not raised
    (unless ``raise_errors``, for debugging)."""
    info: dict[str, Any] = {}
    with measure() as usage:
        try:
            embedding = source.embed(ds, seed=seed)
        except NotApplicableError as e:
            embedding, status, error = None, "not_applicable", str(e)
        except Exception as e:  # noqa: BLE001 - a crashing model is a failed run, recorded
            if raise_errors:
                raise
            embedding, status = None, "failed"
            error = str(e) if isinstance(e, CzbError) else f"{type(e).__name__}: {e}"
            if getattr(e, "log_tail", None):
                info["log_tail"] = e.log_tail[-50:]
        else:
            status, error = "ok", None
    model = source.describe()
    info.update(embedding.info if embedding is not None else {})
    return Embedded({**model, "info": info}, embedding, status, error, usage.runtime_s)


def unscored_records(embedded: Embedded, dataset: R.DatasetRecord, planned: Sequence[PlannedTask], *,
              seeds: Sequence[int], command: str) -> list[R.ResultRecord]:
    """One failed / not-applicable record per task, for an embedding that does not exist."""
    prefix = "embedding failed: " if embedded.status == "failed" else ""
    result = TaskResult(task="", status=embedded.status, seeds=list(seeds), error=f"{prefix}{embedded.error}")
    return [
        result_record(dataset=dataset, model=embedded.model, planned=p, result=result, command=command,
                      embedding_runtime_s=embedded.runtime_s)
        for p in planned
    ]


def embedding_context(
    values: np.ndarray,
    roles: dict[str, np.ndarray | None],
    *,
    tasks: Iterable[Task] = (),
    expression: Any = None,
    relationship_sources: Sequence[str] | None = None,
    n_jobs: int = 1,
    exact: bool | None = None,
) -> EvaluationContext:
    """The evaluation context of an embedding whose rows ``roles`` annotate (``labels``,
    ``batch`` or ``None``, and any extra role), with the known relationships ``tasks`` read
    (:meth:`~czb.evaluation.task.Task.relationship_sources`, given the dataset's
    ``relationship_sources``) loaded now: a source that cannot be loaded fails only the
    tasks reading it, before they start."""
    roles = dict(roles)
    sources = [name for task in tasks for name in task.relationship_sources(relationship_sources)]
    return EvaluationContext(
        values,
        labels=roles.pop("labels"),
        batches=roles.pop("batch", None),
        roles={k: v for k, v in roles.items() if v is not None},
        expression=expression,
        relationship_sources=relationship_sources,
        relationships=load_sources(sources),
        n_jobs=n_jobs,
        exact=exact,
    )


def score_embedding(
    embedded: Embedded,
    dataset: R.DatasetRecord,
    roles: dict[str, np.ndarray | None],
    planned: Sequence[PlannedTask],
    *,
    seeds: Sequence[int],
    n_jobs: int,
    command: str,
    progress: Progress | None = None,
    raise_errors: bool = False,
    expression: Any = None,
    relationship_sources: Sequence[str] | None = None,
    exact: bool | None = None,
) -> list[R.ResultRecord]:
    """Score every task on one embedding, sharing one neighbour graph.

    ``roles`` holds per-cell annotations aligned with the embedding's rows: ``labels``,
    ``batch`` (or ``None``) and any extra role; ``expression`` the cells' expression
    for tasks that read it (rows aligned likewise).
    """
    if embedded.embedding is None:
        return unscored_records(embedded, dataset, planned, seeds=seeds, command=command)
    say = progress or (lambda _msg: None)
    context = embedding_context(embedded.embedding.values, roles, tasks=[p.task for p in planned],
                                expression=expression, relationship_sources=relationship_sources,
                                n_jobs=n_jobs, exact=exact)
    return _score_tasks(context, planned, dataset=dataset, model=lambda: embedded.model, seeds=seeds,
                        command=command, embedding_runtime_s=embedded.runtime_s, say=say,
                        raise_errors=raise_errors)


def score_predictor(
    source: Any,
    ds: Dataset,
    data: Any,
    planned: Sequence[PlannedTask],
    *,
    seeds: Sequence[int],
    n_jobs: int,
    command: str,
    progress: Progress | None = None,
    raise_errors: bool = False,
) -> list[R.ResultRecord]:
    """Score a perturbation predictor on every perturbation task of one dataset."""
    from czb.evaluation.perturbation.prediction.data import PerturbationContext

    say = progress or (lambda _msg: None)
    if hasattr(source, "bind"):  # a docker predictor: organism and input checks first
        try:
            source.bind(ds)
        except NotApplicableError as e:
            skipped = Embedded({**source.describe(), "info": {}}, None, "not_applicable", str(e))
            return unscored_records(skipped, dataset_record(ds), planned, seeds=seeds, command=command)
    context = PerturbationContext(data, source, n_jobs=n_jobs)
    # Described after each task: a docker predictor knows its image once it has run.
    return _score_tasks(context, planned, dataset=dataset_record(ds),
                        model=lambda: {**source.describe(), "info": {}}, seeds=seeds, command=command,
                        embedding_runtime_s=0.0, say=say, raise_errors=raise_errors)


def _score_tasks(
    context: Any,
    planned: Sequence[PlannedTask],
    *,
    dataset: R.DatasetRecord,
    model: Callable[[], dict[str, Any]],
    seeds: Sequence[int],
    command: str,
    embedding_runtime_s: float,
    say: Progress,
    raise_errors: bool,
) -> list[R.ResultRecord]:
    """Run every planned task on one context, one record each (``model()`` read after the task)."""
    context.plan(p.task for p in planned)
    records = []
    for p in planned:
        described = model()
        say(f"{dataset.name}: {described['name']}: {p.spec.name}")
        result = run_task(p.task, context, seeds, raise_errors=raise_errors)
        records.append(result_record(dataset=dataset, model=model(), planned=p, result=result,
                                     command=command, embedding_runtime_s=embedding_runtime_s))
    return records
