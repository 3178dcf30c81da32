"""Level 3 of the perturbation-analysis hierarchy: do cells of one perturbation agree?"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.hierarchy.consistency_knn_metrics import (
    CONSISTENCY,
    empirical_pvalues,
    mean_pairwise_cosine,
)
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign, ScreenSplit, unique_codes
from czb.evaluation.perturbation.hierarchy.screen_task import ScreenParams, ScreenTask
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue


class ConsistencyParams(ScreenParams):
    #: A perturbed gene whose mean log1p(counts per 10k) over all cells is below this
    #: is "unexpressed": its perturbation forms the null (the reference's value for Replogle).
    unexpressed_threshold: float = Field(0.15, ge=0.0)
    #: p-value below which a perturbation counts as consistent.
    alpha: float = Field(0.05, gt=0.0, lt=1.0)


@register_task
class PerturbationConsistency(ScreenTask):
    """Perturbation signal consistency (Bendidi et al. 2024, task 3; EFAAR).

    On all cells (no split), per perturbation: the mean cosine similarity over
    distinct pairs of its cells (computed from sums of unit vectors, never a
    cells × cells matrix). The null is that statistic for perturbations of
    unexpressed genes (mean log-normalised expression below ``unexpressed_threshold``;
    those perturbations are not scored). ``p = (1 + #null >= observed) / (1 + #null)``;
    the score is the share of scored perturbations with ``p < alpha``. Perturbations
    with fewer than two cells are skipped and counted (``n_skipped_single_cell``);
    targets absent from the measured genes cannot be tested for expression and are
    scored (``n_target_not_measured``), as in the reference.
    """

    info = TaskInfo(
        name="perturbation_consistency",
        description="Share of perturbations whose cells agree (mean pairwise cosine) beyond the unexpressed-gene null.",
        metrics=(CONSISTENCY.name,),
        requires=("labels", "control", "batch", "expression"),
        stochastic=False,
        reference="doi:10.1371/journal.pcbi.1012463",
    )
    Params = ConsistencyParams
    uses_split = False

    def _null_mask(self, context: EvaluationContext, perts: np.ndarray) -> tuple[np.ndarray, int]:
        """Which perturbations target unexpressed genes, and how many targets are not measured."""
        expression = context.expression
        if expression.gene_symbols is None:
            msg = "perturbation consistency needs gene symbols in the expression data to find unexpressed targets"
            raise NotApplicableError(msg)

        def compute():
            means = expression.gene_means()
            by_symbol = dict(zip(map(str, expression.gene_symbols), means))
            target_means = np.array([by_symbol.get(p, np.nan) for p in perts])
            return target_means

        target_means = context.memo(("target_mean_expression", tuple(perts)), compute)
        measured = ~np.isnan(target_means)
        null = measured & (target_means < self.params.unexpressed_threshold)
        return null, int((~measured).sum())

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        perturbed = np.flatnonzero(~design.controls)
        perts, codes = unique_codes(design.perturbations[perturbed])
        means, sizes = mean_pairwise_cosine(X[perturbed], codes, len(perts))
        null_mask, n_unmeasured = self._null_mask(context, perts)
        usable = sizes >= 2
        null = means[null_mask & usable]
        if null.size == 0:
            msg = (f"no perturbation targets an unexpressed gene (mean log-normalised expression < "
                   f"{self.params.unexpressed_threshold}) with 2+ cells: the consistency null is empty")
            raise NotApplicableError(msg)
        smallest_p = 1.0 / (1.0 + null.size)
        if smallest_p >= self.params.alpha:
            needed = int(np.ceil(1.0 / self.params.alpha - 1.0 + 1e-9))
            msg = (f"the consistency null has {null.size} unexpressed-gene perturbations, so no p-value can "
                   f"fall below {self.params.alpha} (smallest possible: {smallest_p:.3f}); it needs at least {needed}")
            raise NotApplicableError(msg)
        scored = ~null_mask & usable
        if not scored.any():
            msg = "no perturbation of an expressed (or unmeasured) gene has 2+ cells: there is nothing to score"
            raise NotApplicableError(msg)
        p = empirical_pvalues(means[scored], null)
        value = float(np.mean(p < self.params.alpha))
        extra = {"n_scored": int(scored.sum()), "n_null": int(null.size),
                 "n_skipped_single_cell": int((~usable).sum()), "n_target_not_measured": n_unmeasured}
        return [MetricValue(CONSISTENCY.name, value, extra)]
