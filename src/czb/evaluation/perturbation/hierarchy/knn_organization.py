"""Level 4 of the perturbation-analysis hierarchy: do neighbours share the perturbation?"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.evaluation.applicability import topk_problem
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.hierarchy.consistency_knn_metrics import (
    KNN_TOP1,
    KNN_TOP5,
    knn_vote_ranks,
)
from czb.evaluation.perturbation.hierarchy.design import (
    ScreenDesign,
    ScreenSplit,
    stratified_subsample,
    unique_codes,
)
from czb.evaluation.perturbation.hierarchy.ranking import class_codes
from czb.evaluation.perturbation.hierarchy.screen_task import (
    ScreenParams,
    ScreenTask,
    topk_accuracies,
)
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue

#: Tx-Evaluation subsamples the kNN reference (train) to this many cells, stratified
#: by perturbation, whenever it has more (``downsample_data``, ``sampled_size``).
REFERENCE_CELLS = 100_000


class KnnParams(ScreenParams):
    #: Neighbours; ``None``: floor(sqrt(#reference cells)), plus one when even
    #: (Tx-Evaluation's rule; its released configs fix 251).
    k: int | None = Field(None, ge=1)
    #: Cap on reference (train) cells, a perturbation-stratified subsample; ``None``: all.
    #: The default is Tx-Evaluation's.
    max_reference_cells: int | None = Field(REFERENCE_CELLS, ge=10)
    #: Neighbour search: ``True`` exact (default), ``False`` approximate (faiss), ``None``:
    #: exact up to :data:`czb.evaluation.neighbors.EXACT_MAX_CELLS` reference cells.
    exact: bool | None = True


def default_k(n_reference: int) -> int:
    """floor(sqrt(n)), made odd by adding one (Tx-Evaluation's ``main_eval``)."""
    k = max(1, math.isqrt(n_reference))
    return k + 1 if k % 2 == 0 else k


@register_task
class PerturbationKnn(ScreenTask):
    """kNN organisation (Bendidi et al. 2024, task 4): reference = train, query = test1,
    controls left out of both; each of the k nearest reference cells (Euclidean) votes
    for its perturbation with weight 1 / (distance + 1e-5); top-1 and top-5 accuracy.

    As in Tx-Evaluation, a reference of more than ``max_reference_cells`` (100,000)
    cells is subsampled, stratified by perturbation, and ``k`` defaults to
    floor(sqrt(#reference cells)) made odd (317 at the cap). The votes are computed from
    each query's neighbour list (:func:`~czb.evaluation.perturbation.hierarchy.consistency_knn_metrics.knn_vote_ranks`),
    never a query × reference or query × class matrix.
    """

    info = TaskInfo(
        name="perturbation_knn",
        description="Top-1/top-5 accuracy on test1 of a distance-weighted kNN vote among train cells.",
        metrics=(KNN_TOP1.name, KNN_TOP5.name),
        requires=("labels", "control", "batch"),
        stochastic=True,
        reference="arXiv:2410.13956",
    )
    Params = KnnParams

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        reference = split.train[~design.controls[split.train]]
        if self.params.max_reference_cells is not None and len(reference) > self.params.max_reference_cells:
            keep = stratified_subsample(design.perturbations[reference], self.params.max_reference_cells, seed=seed)
            reference = reference[keep]
        query = split.test1[~design.controls[split.test1]]
        if len(reference) == 0 or len(query) == 0:
            msg = f"the split left {len(reference)} train and {len(query)} test1 perturbed cells; no neighbours to vote"
            raise NotApplicableError(msg)
        classes, ref_codes = unique_codes(design.perturbations[reference])
        top1_problem = topk_problem(len(classes), 1)
        if top1_problem is not None:
            raise NotApplicableError(f"the reference (train) cells hold {top1_problem}")
        query_codes = class_codes(classes, design.perturbations[query])
        k = self.params.k or default_k(len(reference))
        ranks = knn_vote_ranks(X[reference], ref_codes, X[query], query_codes, k, exact=self.params.exact)
        return topk_accuracies(ranks, len(classes), KNN_TOP1.name, KNN_TOP5.name, context,
                               cells="the reference (train) cells")
