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
        return max(p.entropy_neighbors, p.lisi_neighbors, p.n_neighbors)

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        p = self.params
        labels, batches = context.require("labels"), context.require("batch")
        graph = context.neighbors(max(p.entropy_neighbors, p.lisi_neighbors))
        entropy_idx, _ = graph.knn(min(p.entropy_neighbors, graph.k))
        lisi_idx, lisi_dist = graph.knn(min(p.lisi_neighbors, graph.k))
        # Seed-independent values: computed once per embedding, repeated for every seed.
        fixed = {
            mix.ENTROPY_PER_CELL.name: context.memo(
                ("entropy_per_cell", p.entropy_neighbors), lambda: mix.entropy_per_cell(entropy_idx, batches)
            ),
            sil.BATCH_SILHOUETTE.name: context.silhouette("silhouette_batch", labels, batches=batches),
            mix.ILISI_NORMALIZED.name: context.memo(
                ("ilisi_normalized", p.lisi_neighbors), lambda: mix.ilisi_normalized(lisi_idx, lisi_dist, batches)
            ),
            sil.SILHOUETTE_SCORE.name: context.silhouette("silhouette_label", labels),
        }
        estimates = {name: v for name, v in fixed.items() if isinstance(v, sil.Estimate)}
        fixed = {name: v.value if isinstance(v, sil.Estimate) else v for name, v in fixed.items()}
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
