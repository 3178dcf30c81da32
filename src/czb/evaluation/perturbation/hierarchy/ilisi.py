"""Level 1 of the perturbation-analysis hierarchy: are batches mixed in test1?"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.evaluation.applicability import group_problem
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.hierarchy.design import (
    ScreenDesign,
    ScreenSplit,
    stratified_subsample,
)
from czb.evaluation.perturbation.hierarchy.mixing_probe_metrics import (
    ILISI_MEAN,
    ILISI_MEAN_NORMALIZED,
    ilisi,
)
from czb.evaluation.perturbation.hierarchy.screen_task import ScreenParams, ScreenTask
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue


class PerturbationIlisiParams(ScreenParams):
    #: Harmony's perplexity; neighbours = 3 x perplexity. 83 is the reference runs'
    #: value (k = 251, perplexity = k // 3).
    perplexity: float = Field(83.0, gt=1.0)
    #: Cap on test1 cells (a batch-stratified subsample); ``None`` scores them all. The
    #: default is Tx-Evaluation's (it downsamples test1 to 300,000 cells above that).
    max_cells: int | None = Field(300_000, ge=10)
    #: Neighbour search: ``True`` exact (default), ``False`` approximate (faiss), ``None``:
    #: exact up to :data:`czb.evaluation.neighbors.EXACT_MAX_CELLS` cells.
    exact: bool | None = True


@register_task
class PerturbationIlisi(ScreenTask):
    """iLISI of batches on test1 with its controls (Bendidi et al. 2024, task 1).

    Reports the raw mean LISI (in [1, #batches]) and its normalised value
    ``1 + (mean - 1) / (#batches - 1)`` in [1, 2], each under its own name (the
    reference code logs the raw mean as "normalised"). Computed on the post-processed
    embedding itself (the reference optionally projects onto 32+ PCs first), with
    exact neighbours by default (:func:`~czb.evaluation.neighbors.knn_search`); LISI
    itself is :func:`~czb.evaluation.metrics.mixing.lisi`, in row chunks.
    """

    info = TaskInfo(
        name="perturbation_ilisi",
        description="Batch mixing of test1 cells (iLISI, raw mean and normalised) per post-processing.",
        metrics=(ILISI_MEAN.name, ILISI_MEAN_NORMALIZED.name),
        requires=("labels", "control", "batch"),
        stochastic=True,
        reference="arXiv:2410.13956",
    )
    Params = PerturbationIlisiParams

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        rows = split.test1
        if self.params.max_cells is not None and len(rows) > self.params.max_cells:
            rows = rows[stratified_subsample(design.batches[rows], self.params.max_cells, seed=seed)]
        problem = group_problem(design.batches[rows], what="batch")
        if problem is not None:
            raise NotApplicableError(f"test1 (held-out batches): {problem}; iLISI is not defined")
        mean, normalized = ilisi(X[rows], design.batches[rows], perplexity=self.params.perplexity,
                                    exact=self.params.exact)
        # Sizes vary with the split's seed, so they stay out of params (which key aggregation).
        return [MetricValue(ILISI_MEAN.name, mean), MetricValue(ILISI_MEAN_NORMALIZED.name, normalized)]
