"""Batch integration: are batches mixed while cell types stay apart?"""

from __future__ import annotations

import numpy as np

from czb.evaluation.applicability import require_groups
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import aggregate as agg
from czb.evaluation.metrics import clustering as clu
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task, TaskParams


class BatchIntegrationParams(TaskParams):
    #: cz-benchmarks' fixed neighbourhood for entropy_per_cell (self included).
    entropy_neighbors: int = 200
    #: scib-metrics' neighbourhood for LISI (perplexity = k // 3).
    lisi_neighbors: int = 90
    #: Leiden graph of the bio-conservation ARI/NMI.
    n_neighbors: int = 15


#: What every integration task reports (batches, or species as batches): mixing, bio
#: conservation and scIB's totals.
INTEGRATION_METRICS = (
    mix.ENTROPY_PER_CELL.name, sil.BATCH_SILHOUETTE.name, mix.ILISI_NORMALIZED.name,
    sil.SILHOUETTE_SCORE.name, clu.ADJUSTED_RAND_INDEX.name, clu.NORMALIZED_MUTUAL_INFO.name,
    agg.SCIB_BIO_CONSERVATION.name, agg.SCIB_BATCH_CORRECTION.name, agg.SCIB_OVERALL.name,
)


class IntegrationTask(Task):
    """What integration tasks share: the neighbours their mixing metrics read."""

    params: BatchIntegrationParams

    def neighbors_needed(self, n_cells: int) -> int:
        p = self.params
        if n_cells > mix.EXACT_MAX_CELLS:  # entropy and iLISI use sampled neighbourhoods
            return p.n_neighbors
        return max(p.entropy_neighbors, p.lisi_neighbors, p.n_neighbors)

    def neighborhoods_needed(self, n_cells: int) -> int:
        return max(self.params.entropy_neighbors, self.params.lisi_neighbors)


@register_task
class BatchIntegration(IntegrationTask):
    """cz-benchmarks' ``entropy_per_cell`` and ``batch_silhouette``, plus what keeps them honest.

    Mixing alone rewards destroying structure: a random embedding mixes batches
    perfectly. So the result also holds bio conservation (label silhouette, Leiden
    ARI/NMI) and scIB's weighted total ``0.6 bio + 0.4 batch``, where the batch
    group is ``batch_silhouette`` and ``ilisi_normalized``. ``entropy_per_cell`` is
    kept under its name for comparison but left out of the total: at a fixed
    k = 200 it falls as datasets grow, while ``ilisi_normalized`` does not.
    """

    info = TaskInfo(
        name="batch_integration",
        description="Batch mixing (entropy, batch silhouette, iLISI) with bio conservation and an scIB total.",
        metrics=INTEGRATION_METRICS,
        requires=("labels", "batch"),
        stochastic=True,
        reference="doi:10.1038/s41592-021-01336-8",
    )
    Params = BatchIntegrationParams

    def check(self, context: EvaluationContext) -> None:
        super().check(context)
        require_groups(context.require("labels"), what="label", task=self.info.name,
                       metrics="its bio-conservation metrics and scIB totals")
        require_groups(context.require("batch"), what="batch", task=self.info.name,
                       metrics="its batch-mixing metrics")

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        p = self.params
        labels, batches = context.require("labels"), context.require("batch")
        context.start_leiden(1.0, seed=seed, k=p.n_neighbors)  # runs beside the distance work below
        rows, idx, dist = context.cell_neighborhoods(self.neighborhoods_needed(context.n_cells))
        n = context.n_cells
        # Seed-independent values: computed once per embedding, repeated for every seed.
        fixed = {
            mix.ENTROPY_PER_CELL.name: context.memo(
                ("entropy_per_cell", p.entropy_neighbors),
                lambda: mix.entropy_estimate(idx[:, : p.entropy_neighbors], batches, n_cells=n),
            ),
            sil.BATCH_SILHOUETTE.name: context.silhouette("silhouette_batch", labels, batches=batches),
            mix.ILISI_NORMALIZED.name: context.memo(
                ("ilisi_normalized", p.lisi_neighbors),
                lambda: mix.ilisi_estimate(idx[:, : p.lisi_neighbors], dist[:, : p.lisi_neighbors], batches,
                                           n_cells=n, rows=rows),
            ),
            sil.SILHOUETTE_SCORE.name: context.silhouette("silhouette_label", labels),
        }
        estimates = fixed
        fixed = {name: v.value for name, v in fixed.items()}
        clusters = context.leiden(1.0, seed=seed, k=p.n_neighbors)
        ari = clu.adjusted_rand_index(labels, clusters)
        nmi = clu.normalized_mutual_info(labels, clusters)
        values = {**fixed, clu.ADJUSTED_RAND_INDEX.name: ari, clu.NORMALIZED_MUTUAL_INFO.name: nmi}
        values.update(scib_totals(context, values))
        return [
            MetricValue(name, value, ci95=estimates[name].ci95 if name in estimates else None)
            for name, value in values.items()
        ]


BIO_PARTS = (sil.SILHOUETTE_SCORE.name, clu.ADJUSTED_RAND_INDEX.name, clu.NORMALIZED_MUTUAL_INFO.name)
BATCH_PARTS = (sil.BATCH_SILHOUETTE.name, mix.ILISI_NORMALIZED.name)


def scib_totals(context: EvaluationContext, values: dict[str, float]) -> dict[str, float]:
    """scIB's totals of ``values``; a part that is not defined (NaN) is removed from
    ``values`` and left out with its reason (:meth:`~czb.evaluation.task.TaskContext.skip_metric`),
    and so is every total it is part of (a total of fewer parts would not compare)."""
    reasons: dict[str, str] = {}
    if not np.isfinite(values.get(sil.BATCH_SILHOUETTE.name, 0.0)):
        # scIB scores batches within each label; here no label has a scorable set of batches.
        reasons[sil.BATCH_SILHOUETTE.name] = (
            "no label has its cells in 2 or more batches (and fewer batches than cells), so batches "
            "cannot be compared within labels")
    for name, value in values.items():
        if not np.isfinite(value):
            reasons.setdefault(name, "not defined on these data")
    bio_ok = not any(n in reasons for n in BIO_PARTS)
    batch_ok = not any(n in reasons for n in BATCH_PARTS)
    totals: dict[str, float] = {}
    if bio_ok and batch_ok:
        totals = agg.scib_scores(bio=[values[n] for n in BIO_PARTS], batch=[values[n] for n in BATCH_PARTS])
    else:
        missing = ", ".join(n for n in (*BIO_PARTS, *BATCH_PARTS) if n in reasons)
        reasons[agg.SCIB_OVERALL.name] = f"{missing} not defined on these data"
        if bio_ok:
            totals[agg.SCIB_BIO_CONSERVATION.name] = float(np.mean([values[n] for n in BIO_PARTS]))
        else:
            reasons[agg.SCIB_BIO_CONSERVATION.name] = f"{missing} not defined on these data"
        if batch_ok:
            totals[agg.SCIB_BATCH_CORRECTION.name] = float(np.mean([values[n] for n in BATCH_PARTS]))
        else:
            reasons[agg.SCIB_BATCH_CORRECTION.name] = f"{missing} not defined on these data"
    for name, why in reasons.items():
        context.skip_metric(name, why)
        values.pop(name, None)
    return totals
