"""Sequential organisation: are cells of nearby time points close in the embedding?"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from czb.core.errors import NotApplicableError, TaskError
from czb.evaluation.applicability import group_problem
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import sequential as seq
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task, TaskParams


class SequentialOrganizationParams(TaskParams):
    #: Neighbours per cell, self excluded (cz-benchmarks' default).
    k: int = Field(15, ge=1)
    #: cz-benchmarks' density-adapted neighbourhood sizes (3 to 50 per cell).
    adaptive_k: bool = False
    #: ``sampled``: cz-benchmarks' Monte Carlo random baseline, seeded per run seed;
    #: ``exact``: its expectation (the mean time difference of two distinct cells).
    baseline: Literal["sampled", "exact"] = "sampled"


def ordered_time_points(values: np.ndarray) -> np.ndarray:
    """Time points as float64, or :class:`TaskError` when they have no order.

    Numbers pass; strings pass only when every one reads as a number (``"3"``,
    ``"1.5"``), as cz-benchmarks accepts them. Labels such as ``"young"``/``"old"``
    need their order declared in the dataset spec, which makes the runner pass ranks.
    """
    values = np.asarray(values)
    if values.dtype.kind in "biuf":
        t = values.astype(np.float64)
    elif values.dtype.kind in "USO":
        try:
            t = values.astype(np.float64)
        except (TypeError, ValueError):
            examples = ", ".join(repr(v) for v in list(dict.fromkeys(values.tolist()))[:5])
            msg = (
                f"time_point values are labels without an order (e.g. {examples}); declare it in the "
                "dataset spec as `label_order: {time_point: [first, second, ...]}`"
            )
            raise TaskError(msg) from None
    else:
        msg = f"time_point must be numbers or ordered labels; got dtype {values.dtype}"
        raise TaskError(msg)
    bad = ~np.isfinite(t)
    if bad.any():
        first = np.flatnonzero(bad)[:5].tolist()
        msg = f"time_point is missing or not finite for {int(bad.sum())} cells (first: {first})"
        raise TaskError(msg)
    return t


@register_task
class SequentialOrganization(Task):
    """cz-benchmarks' sequential organisation: silhouette of time points and sequential alignment.

    ``silhouette_score`` treats each time point as a label (rescaled silhouette, as in
    ``embedding``); ``sequential_alignment`` compares the time differences between
    each cell and its ``k`` nearest neighbours to those of random cells. The random
    baseline is drawn per seed, so the task runs once per seed; the silhouette is
    computed once per embedding and the neighbours come from the shared graph.
    """

    info = TaskInfo(
        name="sequential_organization",
        description="Silhouette of time points and k-NN sequential alignment against a seeded "
        "random baseline.",
        metrics=(sil.SILHOUETTE_SCORE.name, seq.SEQUENTIAL_ALIGNMENT.name),
        requires=("time_point",),
        stochastic=True,
        reference="https://github.com/chanzuckerberg/cz-benchmarks",
    )
    Params = SequentialOrganizationParams

    def neighbors_needed(self, n_cells: int) -> int:
        p = self.params
        if p.adaptive_k:
            return seq.adaptive_columns_needed(n_cells, p.k)
        return p.k + 1

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        p = self.params
        t = context.memo(("time_points",), lambda: ordered_time_points(context.require("time_point")))
        needed = self.neighbors_needed(context.n_cells)
        at_least = max(p.k + 1, needed)
        if context.n_cells < at_least:
            msg = (
                f"sequential_organization needs at least {at_least} cells for k = {p.k}; "
                f"the data have {context.n_cells}"
            )
            raise NotApplicableError(msg)
        if len(np.unique(t)) < 2:  # every neighbour is "aligned": the score would be 1
            problem = group_problem(t, what="time point")
            msg = f"task {self.info.name!r}: {problem}; sequential alignment is not defined"
            raise NotApplicableError(msg)
        out = []
        problem = group_problem(t, what="time point")
        if problem is None:
            silhouette = context.silhouette("silhouette_label[time_point]", t)
            out.append(MetricValue.from_estimate(sil.SILHOUETTE_SCORE.name, silhouette))
        else:  # e.g. a continuous pseudotime: one time point per cell
            context.skip_metric(sil.SILHOUETTE_SCORE.name, f"{problem}; the silhouette of time points is not defined")
        graph = context.neighbors(needed)
        idx, dist = graph.knn(needed)
        alignment = seq.sequential_alignment(
            idx, t, p.k, seed=seed, adaptive_k=p.adaptive_k, knn_distances=dist, baseline=p.baseline
        )
        return [*out, MetricValue(seq.SEQUENTIAL_ALIGNMENT.name, alignment)]
