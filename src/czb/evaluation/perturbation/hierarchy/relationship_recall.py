"""Level 5 of the perturbation-analysis hierarchy: are known gene relationships recalled?"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.data.relationships import Relationships
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign, ScreenSplit, unique_codes
from czb.evaluation.perturbation.hierarchy.ranking import class_codes
from czb.evaluation.perturbation.hierarchy.recall_metrics import (
    RELATIONSHIP_MAP,
    RELATIONSHIP_RECALL,
    RELATIONSHIP_RECALL_BOUND,
    cosine_matrix,
    cosine_mean_average_precisions,
    tail_recall,
    tail_recall_upper_bound,
    upper_triangle,
)
from czb.evaluation.perturbation.hierarchy.screen_task import ScreenParams, ScreenTask
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue

DEFAULT_SOURCES = ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")


class RecallParams(ScreenParams):
    #: Relationship sources (see :mod:`czb.data.relationship_sources`); ``None``: the
    #: dataset's ``relationship_sources``, else the five EFAAR databases.
    sources: tuple[str, ...] | None = None
    #: Tails of the similarity distribution counted as predicted links.
    low_quantile: float = Field(0.05, gt=0.0, lt=0.5)
    high_quantile: float = Field(0.95, gt=0.5, lt=1.0)
    #: Fewer perturbed genes than this make the distribution meaningless (EFAAR: 20).
    min_perturbations: int = Field(20, ge=3)


@register_task
class PerturbationRecall(ScreenTask):
    """Known-relationship recall (Bendidi et al. 2024, task 5; EFAAR).

    On all cells (no split): controls are dropped (by the boolean control role, so
    they can never leak into the map), the embedding is averaged per perturbed gene,
    and the cosine similarities of all distinct gene pairs form the null. A known pair
    (both genes perturbed) is recalled when its similarity lies in the lowest or
    highest 5% of that null; recall is reported ×100 per source, beside its true upper
    bound and the mean average precision of retrieving each gene's partners.
    """

    info = TaskInfo(
        name="perturbation_recall",
        description="Recall (x100) of CORUM/HuMAP/Reactome/SIGNOR/StringDB pairs in the 5% tails of "
        "perturbation-mean cosine similarities, with its upper bound and mAP.",
        metrics=(RELATIONSHIP_RECALL.name, RELATIONSHIP_RECALL_BOUND.name, RELATIONSHIP_MAP.name),
        requires=("labels", "control", "batch"),
        stochastic=False,
        reference="doi:10.1371/journal.pcbi.1012463",
    )
    Params = RecallParams
    uses_split = False

    def relationship_sources(self, declared: Sequence[str] | None) -> tuple[str, ...]:
        return tuple(self.params.sources or declared or DEFAULT_SOURCES)

    def _sources(self, context: EvaluationContext) -> list[Relationships]:
        return [context.relationship(name) for name in self.relationship_sources(context.relationship_sources)]

    def check(self, context: EvaluationContext) -> None:
        super().check(context)
        self._sources(context)  # a missing or unreadable source fails before any work

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        perturbed = np.flatnonzero(~design.controls)
        genes, codes = unique_codes(design.perturbations[perturbed])
        if len(genes) < self.params.min_perturbations:
            msg = f"{len(genes)} perturbed genes; known-relationship recall needs at least {self.params.min_perturbations}"
            raise NotApplicableError(msg)
        sums = np.zeros((len(genes), X.shape[1]))
        np.add.at(sums, codes, X[perturbed].astype(np.float64))
        means = sums / np.bincount(codes)[:, None]
        S = cosine_matrix(means)
        null = np.sort(upper_triangle(S))
        low, high = self.params.low_quantile, self.params.high_quantile
        out, found = [], []
        for rel in self._sources(context):
            pairs = rel.restricted_to(genes)
            params = {"source": rel.name, "n_pairs": int(len(pairs)), "n_genes": int(len(genes))}
            if len(pairs) == 0:
                nan = float("nan")
                out += [MetricValue(m.name, nan, params) for m in
                        (RELATIONSHIP_RECALL, RELATIONSHIP_RECALL_BOUND, RELATIONSHIP_MAP)]
                continue
            i, j = class_codes(genes, pairs[:, 0]), class_codes(genes, pairs[:, 1])
            recall = tail_recall(null, S[i, j].astype(np.float64), low=low, high=high)
            bound = tail_recall_upper_bound(null, len(pairs), low=low, high=high)
            adjacency = sp.coo_matrix((np.ones(2 * len(i), bool), (np.r_[i, j], np.r_[j, i])),
                                      shape=(len(genes), len(genes))).tocsr()
            found.append((params, adjacency))
            out += [MetricValue(RELATIONSHIP_RECALL.name, 100.0 * recall, params),
                    MetricValue(RELATIONSHIP_RECALL_BOUND.name, 100.0 * bound, params)]
        # One pass of float64 cosine blocks serves every source's mAP.
        maps = cosine_mean_average_precisions(means, [adjacency for _, adjacency in found])
        out += [MetricValue(RELATIONSHIP_MAP.name, mean_ap, {**params, "n_queries": n_queries})
                for (params, _), (mean_ap, n_queries) in zip(found, maps)]
        return out
