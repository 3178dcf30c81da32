"""Batch integration: are batches mixed while cell types stay apart?"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from czb.evaluation.applicability import require_groups
from czb.evaluation.context import EvaluationContext
from czb.evaluation.estimates import Estimate
from czb.evaluation.metrics import aggregate as agg
from czb.evaluation.metrics import bio_floor, kbet, scib
from czb.evaluation.metrics import clustering as clu
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task, TaskParams


class BatchIntegrationParams(TaskParams):
    #: cz-benchmarks' fixed neighbourhood for entropy_per_cell (self included).
    entropy_neighbors: int = 200
    #: scib-metrics' neighbourhood for iLISI and cLISI (perplexity = k // 3).
    lisi_neighbors: int = 90
    #: Leiden graph of the ARI/NMI, and the graph of graph_connectivity.
    n_neighbors: int = 15
    #: scib-metrics' graph for kBET.
    kbet_neighbors: int = kbet.KBET_NEIGHBORS


#: What every integration task reports (batches, or species as batches): cz-benchmarks'
#: metrics, scib-metrics' two groups (:data:`~czb.evaluation.metrics.aggregate.BIO_METRICS`,
#: :data:`~czb.evaluation.metrics.aggregate.BATCH_METRICS`) and their totals.
INTEGRATION_METRICS = (
    mix.ENTROPY_PER_CELL.name, clu.ADJUSTED_RAND_INDEX.name, clu.NORMALIZED_MUTUAL_INFO.name,
    *agg.BIO_METRICS, *agg.BATCH_METRICS,
    agg.SCIB_BIO_CONSERVATION.name, agg.SCIB_BATCH_CORRECTION.name, agg.SCIB_OVERALL.name,
    bio_floor.KNN_LABEL_ACCURACY.name,
)
#: Why pcr_comparison is left out when the context has no pre-integration representation.
NO_PRE_INTEGRATION = ("the pre-integration PCA of the dataset's expression was not given (the pipeline "
                      "passes its PCA baseline's embedding)")


class IntegrationTask(Task):
    """What integration tasks share: the neighbours their mixing metrics read, and the
    data before integration (for ``pcr_comparison``)."""

    params: BatchIntegrationParams
    reads_pre_integration = True

    def neighbors_needed(self, n_cells: int) -> int:
        p = self.params
        if n_cells > mix.EXACT_MAX_CELLS:  # entropy and LISI use sampled neighbourhoods, kBET a subsample
            return p.n_neighbors
        return max(p.entropy_neighbors, p.lisi_neighbors, p.n_neighbors, p.kbet_neighbors)

    def neighborhoods_needed(self, n_cells: int) -> int:
        return max(self.params.entropy_neighbors, self.params.lisi_neighbors)


@register_task
class BatchIntegration(IntegrationTask):
    """cz-benchmarks' ``entropy_per_cell`` and ``batch_silhouette``, scib-metrics' full
    metric set, and what keeps mixing honest.

    Mixing alone rewards destroying structure: a random embedding mixes batches
    perfectly. So the result also holds bio conservation and scIB's weighted total
    ``0.6 bio + 0.4 batch`` over scib-metrics' Benchmarker groups
    (:mod:`czb.evaluation.metrics.aggregate`), on raw values. ``entropy_per_cell`` and
    the Leiden ARI/NMI (cz-benchmarks' resolution-1.0 values) are kept under their names
    for comparison but left out of the totals: at a fixed k = 200 entropy falls as
    datasets grow, and the Benchmarker's Leiden metrics are off by default.
    """

    info = TaskInfo(
        name="batch_integration",
        description="Batch mixing (entropy, batch silhouette, iLISI, kBET, graph connectivity, PCR) "
        "with bio conservation and scIB totals.",
        metrics=INTEGRATION_METRICS,
        requires=("labels", "batch"),
        stochastic=True,
        reference="doi:10.1038/s41592-021-01336-8",
        cost="scib-metrics' set beside cz-benchmarks' two metrics: iLISI, cLISI and kBET on the shared "
        "graph, k-means NMI/ARI and a Leiden run per seed; isolated labels read the label silhouette's scan",
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
        values: dict[str, Estimate | float] = {
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
            scib.CLISI_NORMALIZED.name: context.memo(
                ("clisi_normalized", p.lisi_neighbors),
                lambda: scib.clisi_estimate(idx[:, : p.lisi_neighbors], dist[:, : p.lisi_neighbors], labels,
                                            n_cells=n, rows=rows),
            ),
            **scib_batch_values(context, labels, batches, key="batch", full=rows is None, params=p),
        }
        values.update(scib_bio_values(context, labels, batches, key="batch", seed=seed))
        values[bio_floor.KNN_LABEL_ACCURACY.name] = label_floor(context, labels, key="labels")
        clusters = context.leiden(1.0, seed=seed, k=p.n_neighbors)
        values[clu.ADJUSTED_RAND_INDEX.name] = clu.adjusted_rand_index(labels, clusters)
        values[clu.NORMALIZED_MUTUAL_INFO.name] = clu.normalized_mutual_info(labels, clusters)
        absent = {}
        if context.pre_integration is None:
            absent[scib.PCR_COMPARISON.name] = NO_PRE_INTEGRATION
        totals = scib_totals(context, {k: getattr(v, "value", v) for k, v in values.items()}, absent=absent)
        out = [
            MetricValue.from_estimate(name, v) if isinstance(v, Estimate) else MetricValue(name, v)
            for name, v in values.items() if name not in context.notes.get("not_applicable", {})
        ]
        return out + totals


def label_floor(context: EvaluationContext, labels: np.ndarray, *, key: str) -> Estimate:
    """The bio-conservation floor (:mod:`czb.evaluation.metrics.bio_floor`): leave-one-out
    kNN label accuracy on the shared graph, its chance level noted, so a report can flag
    an embedding whose labels are near chance whatever its totals."""
    k = bio_floor.GRAPH_K

    def compute() -> bio_floor.BioFloor:
        idx, _ = context.neighbors(k).knn(min(k, context.n_cells))
        donors = context.role("donor")
        return bio_floor.knn_label_floor(idx, labels, clusters=None if donors is None else np.asarray(donors))

    floor = context.memo(("bio_floor", k, key), compute)
    context.note(bio_floor.NOTE_KEY, floor.describe())
    return floor.accuracy


def scib_bio_values(
    context: EvaluationContext, labels: np.ndarray, batches: np.ndarray, *, key: str, seed: int,
    cells: np.ndarray | None = None,
) -> dict[str, Estimate | float]:
    """isolated_labels with ``batches`` as the batch (of all cells, memoised under ``key``)
    and the k-means NMI/ARI of ``cells`` (boolean mask, default all) for one seed."""
    shared = context.label_silhouettes() if labels is context.role("labels") else None
    isolated = context.memo(
        ("isolated_labels", key),
        lambda: scib.isolated_labels(context.X, labels, batches, exact=context.exact, n_jobs=context.n_jobs,
                                     silhouettes=shared),
    )
    context.note(scib.ISOLATED_LABELS.name, isolated.describe())
    X, kept = (context.X, labels) if cells is None else (context.X[cells], np.asarray(labels)[cells])
    nmi, ari = scib.nmi_ari_kmeans(X, kept, seed=seed)
    return {scib.ISOLATED_LABELS.name: isolated, scib.NMI_KMEANS.name: nmi, scib.ARI_KMEANS.name: ari}


def scib_batch_values(
    context: EvaluationContext, labels: np.ndarray, batches: np.ndarray, *, key: str, full: bool,
    params: BatchIntegrationParams, connectivity_cells: np.ndarray | None = None,
) -> dict[str, float]:
    """kbet_per_label, graph_connectivity and pcr_comparison with ``batches`` as the batch
    (memoised under ``key``), the last only with the context's pre-integration representation.

    kBET runs on the shared ``kbet_neighbors`` graph when ``full`` (the cells'
    neighbourhoods are not sampled), else on a random subsample
    (:func:`~czb.evaluation.metrics.kbet.kbet_subsample`); ``connectivity_cells`` (boolean)
    restricts graph connectivity to those cells' labels.
    """
    k = params.kbet_neighbors

    def compute_kbet() -> tuple[float, dict]:
        if full:
            score = kbet.kbet_per_label(context.neighbors(k).connectivities(k), batches, labels)
            return score, {"method": "exact", "k": k}
        score, m = kbet.kbet_subsample(context.X, batches, labels, k=k)
        return score, {"method": "random_subsample", "n_sampled": m, "k": k}

    score, how = context.memo(("kbet_per_label", k, key), compute_kbet)
    context.note(kbet.KBET_PER_LABEL.name, how)
    idx, _ = context.neighbors(params.n_neighbors).knn(min(params.n_neighbors, context.n_cells))
    out = {
        kbet.KBET_PER_LABEL.name: score,
        scib.GRAPH_CONNECTIVITY.name: context.memo(
            ("graph_connectivity", params.n_neighbors, key),
            lambda: scib.graph_connectivity(idx, labels, cells=connectivity_cells),
        ),
    }
    if context.pre_integration is None:
        context.skip_metric(scib.PCR_COMPARISON.name, NO_PRE_INTEGRATION)
        return out
    pre = context.memo(("pcr", "pre_integration", key),
                       lambda: scib.principal_component_regression(context.pre_integration, batches))
    post = context.memo(("pcr", "embedding", key), lambda: scib.principal_component_regression(context.X, batches))
    out[scib.PCR_COMPARISON.name] = scib.pcr_comparison(pre, post)
    return out


def scib_totals(
    context: EvaluationContext, values: dict[str, float], *, absent: Mapping[str, str] | None = None,
    params: dict | None = None,
) -> list[MetricValue]:
    """scIB's raw totals of ``values`` over :data:`~czb.evaluation.metrics.aggregate.BIO_METRICS`
    and :data:`~czb.evaluation.metrics.aggregate.BATCH_METRICS`.

    A part that is not defined (NaN) is left out with its reason
    (:meth:`~czb.evaluation.task.TaskContext.skip_metric`), and so is every total it
    is part of (a total of fewer parts would not compare). A part in ``absent`` (not
    computed for want of an input, e.g. the pre-integration PCA) is left out of its
    totals instead, which then carry ``params['without']`` naming it, so they never
    compare with totals of every part.
    """
    absent = dict(absent or {})
    reasons: dict[str, str] = {}
    if not np.isfinite(values.get(sil.BATCH_SILHOUETTE.name, 0.0)):
        # scIB scores batches within each label; here no label has a scorable set of batches.
        reasons[sil.BATCH_SILHOUETTE.name] = (
            "no label has its cells in 2 or more batches (and fewer batches than cells), so batches "
            "cannot be compared within labels")
    if not np.isfinite(values.get(kbet.KBET_PER_LABEL.name, 0.0)):
        reasons[kbet.KBET_PER_LABEL.name] = (
            f"no label has {kbet.MIN_CELLS} or more cells in 2 or more batches, so no neighbourhood "
            "batch composition can be tested")
    for name, value in values.items():
        if not np.isfinite(value):
            reasons.setdefault(name, "not defined on these data")
    for name, why in reasons.items():
        context.skip_metric(name, why)
    bio = [n for n in agg.BIO_METRICS if n not in absent]
    batch = [n for n in agg.BATCH_METRICS if n not in absent]
    missing = ", ".join(n for n in (*bio, *batch) if n in reasons)
    totals: dict[str, float] = {}
    if not any(n in reasons for n in bio):
        totals[agg.SCIB_BIO_CONSERVATION.name] = float(np.mean([values[n] for n in bio]))
    else:
        context.skip_metric(agg.SCIB_BIO_CONSERVATION.name, f"{missing} not defined on these data")
    if not any(n in reasons for n in batch):
        totals[agg.SCIB_BATCH_CORRECTION.name] = float(np.mean([values[n] for n in batch]))
    else:
        context.skip_metric(agg.SCIB_BATCH_CORRECTION.name, f"{missing} not defined on these data")
    if len(totals) == 2:
        totals = agg.scib_scores(bio=[values[n] for n in bio], batch=[values[n] for n in batch])
    else:
        context.skip_metric(agg.SCIB_OVERALL.name, f"{missing} not defined on these data")
    params = dict(params or {})
    batch_params = {**params, "without": ",".join(sorted(absent))} if absent else params
    return [
        MetricValue(name, value, batch_params if name != agg.SCIB_BIO_CONSERVATION.name else params)
        for name, value in totals.items()
    ]
