"""Batch integration: are batches mixed while cell types stay apart?"""

from __future__ import annotations

from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import aggregate as agg
from czb.evaluation.metrics import clustering as clu
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.tasks.base import MetricValue, Task, TaskParams


class BatchIntegrationParams(TaskParams):
    #: cz-benchmarks' fixed neighbourhood for entropy_per_cell (self included).
    entropy_neighbors: int = 200
    #: scib-metrics' neighbourhood for LISI (perplexity = k // 3).
    lisi_neighbors: int = 90
    #: Leiden graph of the bio-conservation ARI/NMI.
    n_neighbors: int = 15


@register_task
class BatchIntegration(Task):
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
        metrics=(
            mix.ENTROPY_PER_CELL.name, sil.BATCH_SILHOUETTE.name, mix.ILISI_NORMALIZED.name,
            sil.SILHOUETTE_SCORE.name, clu.ADJUSTED_RAND_INDEX.name, clu.NORMALIZED_MUTUAL_INFO.name,
            agg.SCIB_BIO_CONSERVATION.name, agg.SCIB_BATCH_CORRECTION.name, agg.SCIB_OVERALL.name,
        ),
        requires=("labels", "batch"),
        stochastic=True,
        reference="doi:10.1038/s41592-021-01336-8",
    )
    Params = BatchIntegrationParams

    def neighbors_needed(self, n_cells: int) -> int:
        p = self.params
        if n_cells > mix.EXACT_MAX_CELLS:  # entropy and iLISI use sampled neighbourhoods
            return p.n_neighbors
        return max(p.entropy_neighbors, p.lisi_neighbors, p.n_neighbors)

    def neighborhoods_needed(self, n_cells: int) -> int:
        return max(self.params.entropy_neighbors, self.params.lisi_neighbors)

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
        totals = agg.scib_scores(
            bio=[fixed[sil.SILHOUETTE_SCORE.name], ari, nmi],
            batch=[fixed[sil.BATCH_SILHOUETTE.name], fixed[mix.ILISI_NORMALIZED.name]],
        )
        values = {**fixed, clu.ADJUSTED_RAND_INDEX.name: ari, clu.NORMALIZED_MUTUAL_INFO.name: nmi, **totals}
        return [
            MetricValue(name, value, ci95=estimates[name].ci95 if name in estimates else None)
            for name, value in values.items()
        ]
