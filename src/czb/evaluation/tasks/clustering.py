"""Cell clustering: do Leiden clusters of the embedding recover the labels?"""

from __future__ import annotations

from czb.evaluation.applicability import require_groups
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import clustering as m
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task, TaskParams


class ClusteringParams(TaskParams):
    #: Neighbours of the Leiden graph, self included (scanpy's default, as cz-benchmarks).
    n_neighbors: int = 15
    resolution: float = 1.0
    #: Also report scIB-style values optimised over resolutions 0.2..2.0 (ten more Leiden
    #: runs). ``None``: only up to SWEEP_MAX_CELLS cells, where they cost seconds.
    resolution_sweep: bool | None = None


#: Largest dataset the resolution sweep runs on by default.
SWEEP_MAX_CELLS = 50_000


@register_task
class Clustering(Task):
    """Leiden (igraph, 2 iterations, modularity) on the UMAP-weighted kNN graph.

    ``adjusted_rand_index`` and ``normalized_mutual_info`` at resolution 1.0 are
    cz-benchmarks' definition; ``scib_leiden_*`` take the NMI-optimal resolution of
    scib-metrics' sweep (optimistic by construction: the labels choose the resolution).
    """

    info = TaskInfo(
        name="clustering",
        description="Leiden clusters of the kNN graph vs cell labels (ARI, NMI).",
        metrics=(m.ADJUSTED_RAND_INDEX.name, m.NORMALIZED_MUTUAL_INFO.name,
                 m.SCIB_LEIDEN_NMI.name, m.SCIB_LEIDEN_ARI.name),
        requires=("labels",),
        stochastic=True,
        reference="doi:10.1038/s41592-021-01336-8",
        cost="scIB's resolution sweep, up to 50,000 cells: 10 more Leiden runs per seed (about 1 s each "
        "at 50,000 cells; half of them in a worker when a core is free)",
    )
    Params = ClusteringParams

    def neighbors_needed(self, n_cells: int) -> int:
        return self.params.n_neighbors

    def check(self, context: EvaluationContext) -> None:
        super().check(context)
        require_groups(context.require("labels"), what="label", task=self.info.name,
                       metrics="ARI and NMI of clusters against labels")

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        labels = context.require("labels")
        p = self.params
        sweep = p.resolution_sweep if p.resolution_sweep is not None else context.n_cells <= SWEEP_MAX_CELLS
        # Every other resolution of the sweep runs in a worker where the machine has a core
        # to spare (EvaluationContext.start_leiden); this process takes the rest meanwhile.
        here, worker = m.SCIB_RESOLUTIONS[0::2], m.SCIB_RESOLUTIONS[1::2]
        if sweep:
            context.start_leiden(worker, seed=seed, k=p.n_neighbors)
        clusters = context.leiden(p.resolution, seed=seed, k=p.n_neighbors)
        out = [
            MetricValue(m.ADJUSTED_RAND_INDEX.name, m.adjusted_rand_index(labels, clusters)),
            MetricValue(m.NORMALIZED_MUTUAL_INFO.name, m.normalized_mutual_info(labels, clusters)),
        ]
        if not sweep:
            context.note("resolution_sweep", {"run": False, "why": f"above {SWEEP_MAX_CELLS} cells; "
                                              "set resolution_sweep: true to run it"})
        else:
            partitions = {r: context.leiden(r, seed=seed, k=p.n_neighbors) for r in (*here, *worker)}
            best = max(
                (
                    (m.normalized_mutual_info(labels, c), m.adjusted_rand_index(labels, c), r)
                    for r in m.SCIB_RESOLUTIONS
                    for c in [partitions[r]]
                ),
                key=lambda t: t[0],
            )
            # The chosen resolution varies by seed, so it is not a grouping param.
            nmi, ari, _ = best
            out += [MetricValue(m.SCIB_LEIDEN_NMI.name, nmi), MetricValue(m.SCIB_LEIDEN_ARI.name, ari)]
        return out
