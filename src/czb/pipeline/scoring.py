"""The steps of a unit of work: embedding a dataset with one source (an outcome, never
an exception), the evaluation context an embedding is scored in, and the result record
of one task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
from czb.evaluation.runner import TaskResult
from czb.evaluation.task import Task
from czb.models.embedding import Embedding
from czb.pipeline.tasks import PlannedTask


def model_record(described: Mapping[str, Any], info: Mapping[str, Any] | None = None) -> R.ModelRecord:
    """The ``model`` of result records from a source's ``describe()``: name, kind, image
    digest (``"in-process"`` for baselines and files; ``"unresolved"`` for a docker model
    that never ran), parameters, and ``info`` about this run."""
    kind = described["kind"]
    return R.ModelRecord(
        name=described["name"],
        kind=kind,
        image_digest=described.get("image_digest") or ("in-process" if kind != "docker" else "unresolved"),
        parameters=dict(described.get("parameters") or {}),
        info=dict(info or {}),
    )


def stored_model(value: Any, fallback: R.ModelRecord | None) -> R.ModelRecord | None:
    """A model record read back from a unit's output in the store, or ``fallback`` when
    the output holds no valid one (a damaged or foreign file)."""
    try:
        return R.ModelRecord.model_validate(value)
    except ValueError:
        return fallback


def result_record(
    *,
    dataset: R.DatasetRecord,
    model: R.ModelRecord,
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
        model=model.model_copy(deep=True),
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
                bootstrap=None if m.bootstrap is None else m.bootstrap.to_json(),
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

    model: R.ModelRecord
    embedding: Embedding | None = None
    status: str = "ok"
    error: str | None = None
    runtime_s: float = 0.0

    @property
    def cell_index(self) -> np.ndarray | None:
        """The dataset cells the embedding's rows belong to (``None``: all, or no embedding)."""
        return self.embedding.cell_index if self.embedding is not None else None


def embed_dataset(source: Any, ds: Dataset, *, seed: int, raise_errors: bool = False) -> Embedded:
    """Embed ``ds`` with ``source``; a failure or a not-applicable model is returned, not raised
    (unless ``raise_errors``, for debugging). A failed docker run keeps its container's last
    log lines in ``model.info["log_tail"]``."""
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
    info.update(embedding.info if embedding is not None else {})
    return Embedded(model_record(source.describe(), info), embedding, status, error, usage.runtime_s)


def embedding_context(
    values: np.ndarray,
    roles: dict[str, np.ndarray | None],
    *,
    tasks: Iterable[Task] = (),
    expression: Any = None,
    relationship_sources: Sequence[str] | None = None,
    n_jobs: int = 1,
    exact: bool | None = None,
    pre_integration: np.ndarray | None = None,
) -> EvaluationContext:
    """The evaluation context of an embedding whose rows ``roles`` annotate (``labels``,
    ``batch`` or ``None``, and any extra role), with the known relationships ``tasks`` read
    (:meth:`~czb.evaluation.task.Task.relationship_sources`, given the dataset's
    ``relationship_sources``) loaded now: a source that cannot be loaded fails only the
    tasks reading it, before they start. ``pre_integration``: the dataset's PCA baseline,
    rows aligned (:attr:`~czb.evaluation.task.Task.reads_pre_integration`)."""
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
        pre_integration=pre_integration,
    )
