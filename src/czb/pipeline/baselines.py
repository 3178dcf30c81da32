"""Which baselines a comparison needs, and each model's difference from its baseline."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from czb.core import records as R
from czb.core.errors import CzbError
from czb.evaluation.registry import get_task

BASELINE_MODEL = "pca"


#: What perturbation predictors are compared with in tables (both baselines are scored).
BASELINE_PREDICTOR = "control_mean"


def baselines_for(task_kinds: Iterable[str]) -> list[str]:
    """The baselines every comparison on tasks of these kinds needs: PCA for embeddings
    (cell-level and multi-dataset tasks), the simple predictors for perturbation responses."""
    from czb.models.predictors import BASELINE_PREDICTORS

    kinds = set(task_kinds)
    return ([BASELINE_MODEL] if kinds - {"perturbation"} else []) + (
        list(BASELINE_PREDICTORS) if "perturbation" in kinds else [])


def reference_baseline(record: R.ResultRecord) -> str:
    """The baseline a record is compared with: ``pca`` for embeddings, ``control_mean``
    for perturbation predictions."""
    try:
        kind = get_task(record.task.implementation).info.kind
    except CzbError:
        kind = "cell"
    return BASELINE_PREDICTOR if kind == "perturbation" else BASELINE_MODEL


def baseline_differences(records: Sequence[R.ResultRecord], baseline: str | None = None) -> dict:
    """``{(dataset, task, metric, params-key, model): model value - baseline value}`` for ok records.

    The baseline is ``baseline`` when given, else each record's :func:`reference_baseline`.
    """
    def key(r: R.ResultRecord, m: R.MetricRecord) -> tuple:
        return (r.dataset.name, r.task.name, m.name, tuple(sorted((k, str(v)) for k, v in m.params.items())))

    def reference(r: R.ResultRecord) -> str:
        return baseline or reference_baseline(r)

    base = {
        key(r, m): m.value
        for r in records
        if r.model.name == reference(r) and r.status == "ok"
        for m in r.metrics
    }
    out = {}
    for r in records:
        if r.model.name == reference(r) or r.status != "ok":
            continue
        for m in r.metrics:
            b = base.get(key(r, m))
            if b is not None and m.value is not None:
                out[(*key(r, m), r.model.name)] = m.value - b
    return out
