"""scIB's integration metrics that cz-benchmarks lacks, as scib-metrics defines them:
isolated labels, cLISI, graph connectivity, PCR comparison and k-means NMI/ARI.

kBET per label is in :mod:`czb.evaluation.metrics.kbet`; iLISI, the silhouettes and the
Leiden NMI/ARI in their own modules.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse import csgraph

from czb.core.sampling import stratified_sample
from czb.evaluation.estimates import Estimate, bootstrap_mean, median_estimate, stratified_mean
from czb.evaluation.metrics import clustering as clu
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import MetricInfo, register_metric

SCIB = "doi:10.1038/s41592-021-01336-8"

ISOLATED_LABELS = register_metric(
    MetricInfo(
        name="isolated_labels",
        description="Over the labels present in the fewest batches, the mean of each label's mean "
        "label silhouette, rescaled to [0, 1] as (s + 1) / 2 (scib-metrics' isolated_labels).",
        reference=SCIB,
        per_cell_mean=True,
    )
)
CLISI_NORMALIZED = register_metric(
    MetricInfo(
        name="clisi_normalized",
        description="Median cell-type LISI (inverse Simpson index of labels, perplexity-calibrated "
        "Gaussian kernel over 90 neighbours, perplexity 30), scaled to [0, 1] as "
        "(#labels - cLISI) / (#labels - 1) (scib-metrics' clisi_knn); 1 = neighbourhoods of one label.",
        reference="doi:10.1038/s41592-019-0619-0",
    )
)
GRAPH_CONNECTIVITY = register_metric(
    MetricInfo(
        name="graph_connectivity",
        description="Per label, the share of its cells in the largest strongly connected component "
        "of its subgraph of the 15-neighbour graph, averaged over labels (scib-metrics' "
        "graph_connectivity); 1 = every label one connected piece across batches.",
        reference=SCIB,
    )
)
PCR_COMPARISON = register_metric(
    MetricInfo(
        name="pcr_comparison",
        description="(PCR before - PCR after) / PCR before, 0 if negative, where PCR is the "
        "variance-weighted R^2 of principal components regressed on the batch and 'before' is the "
        "pre-integration PCA (scib-metrics' pcr_comparison); 1 = batch variance removed.",
        reference="doi:10.1038/s41592-018-0254-1",
    )
)
NMI_KMEANS = register_metric(
    MetricInfo(
        name="nmi_kmeans",
        description="NMI (arithmetic mean) between labels and k-means clusters, k = #labels "
        "(k-means++, one initialisation, seeded; scib-metrics' nmi_ari_cluster_labels_kmeans).",
        reference=SCIB,
        stochastic=True,
    )
)
ARI_KMEANS = register_metric(
    MetricInfo(
        name="ari_kmeans",
        description="ARI between labels and k-means clusters, k = #labels (k-means++, one "
        "initialisation, seeded; scib-metrics' nmi_ari_cluster_labels_kmeans).",
        reference=SCIB,
        range=(-0.5, 1.0),
        stochastic=True,
    )
)

#: Cells sampled for isolated labels above :data:`czb.evaluation.metrics.silhouette.EXACT_MAX_CELLS`
#: (each scored exactly against all cells): 95% CIs of about ±0.002 at 2×10^5 cells, at an
#: eighth of the cost of the label silhouette's sample.
ISOLATED_SAMPLE_SIZE = 2_500


def isolated_label_set(labels: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """The labels present in the fewest batches (scib-metrics' default threshold)."""
    pairs = pd.DataFrame({"label": np.asarray(labels), "batch": np.asarray(batches)}).drop_duplicates()
    per_label = pairs.groupby("label", sort=True)["batch"].count()
    return per_label.index[per_label == per_label.min()].to_numpy()


def isolated_labels(
    X: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    *,
    exact: bool | None = None,
    sample_size: int = ISOLATED_SAMPLE_SIZE,
    seed: int = 0,
    n_jobs: int | None = None,
    silhouettes: np.ndarray | None = None,
) -> Estimate:
    """scib-metrics' ``isolated_labels`` (silhouette-based, rescaled).

    Each cell's silhouette uses all labels; a label's score is the mean of ``(s + 1) / 2``
    over its cells, and the result the mean over :func:`isolated_label_set`. Exact up to
    :data:`~czb.evaluation.metrics.silhouette.EXACT_MAX_CELLS` cells (or when ``exact``);
    above, each isolated label's mean is estimated from a random sample of its cells
    (``sample_size`` in all, proportional, at least
    :data:`~czb.core.sampling.MIN_PER_STRATUM` per label), with a 95% CI. Either way with
    the bootstrap CI over the cells scored (resampled within labels).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels, batches
        ``(n_cells,)`` cell-type and batch labels.
    silhouettes
        ``(n_cells,)`` every cell's silhouette of ``labels``, when already computed (the
        label silhouette's exact scan): read instead of scanning again. Used only on the
        exact path.
    """
    labels = np.asarray(labels)
    codes, uniques = pd.factorize(labels)
    isolated = np.flatnonzero(np.isin(uniques, isolated_label_set(labels, batches)))
    members = [np.flatnonzero(codes == c) for c in isolated]
    if sil.is_exact(len(codes), exact):
        rows = members
    else:
        strata = np.full(len(codes), -1)
        for h, m in enumerate(members):
            strata[m] = h
        inside = np.flatnonzero(strata >= 0)
        picked = stratified_sample(strata[inside], sample_size, seed=seed)
        rows = [inside[p] for p in picked]
    scored = np.concatenate(rows)
    if rows is members and silhouettes is not None:
        s = np.asarray(silhouettes, dtype=np.float64)[scored]
    else:
        s = sil.silhouette_samples(X, codes, rows=scored, n_jobs=n_jobs)
    scores = np.split((s + 1.0) / 2.0, np.cumsum([len(r) for r in rows])[:-1])
    weights = np.full(len(scores), 1.0 / len(scores))
    if rows is members:
        return Estimate(float(np.mean([v.mean() for v in scores])), None, int(sum(len(r) for r in rows)),
                        bootstrap_mean(scores, weights, seed=seed))
    totals = np.array([len(m) for m in members], dtype=np.float64)
    return stratified_mean(scores, totals, weights, seed=seed)


def clisi_estimate(
    knn_indices: np.ndarray,
    knn_distances: np.ndarray,
    labels: np.ndarray,
    *,
    n_cells: int,
    rows: np.ndarray | None = None,
    cells: np.ndarray | None = None,
) -> Estimate:
    """scib-metrics' ``clisi_knn``: ``(n_labels - median cLISI) / (n_labels - 1)``.

    cLISI is :func:`~czb.evaluation.metrics.mixing.lisi` of the labels over the given
    neighbourhoods (of ``rows``, default all cells); exact when they are all ``n_cells``
    cells' (every one of ``cells``), else the sample median with its order-statistic 95% CI.

    Parameters
    ----------
    knn_indices, knn_distances
        ``(n_rows, k)`` neighbourhoods, self included.
    labels
        ``(n_cells,)`` labels of all cells; ``n_labels`` counts them all.
    cells
        Boolean ``(n_cells,)``: take the median over these cells only (default all).
    """
    n_labels = len(pd.unique(np.asarray(labels)))
    if n_labels < 2:
        return Estimate(float("nan"), None, 0)
    values = mix.lisi(knn_indices, knn_distances, labels, rows=rows)
    if cells is not None:
        keep = cells if rows is None else cells[rows]
        values, n_cells = values[keep], int(np.count_nonzero(cells))
    median = median_estimate(values, n_cells)
    scaled = median.map(lambda v: (n_labels - v) / (n_labels - 1))  # decreasing: bounds swap
    return Estimate(scaled.value, None if scaled.ci95 is None else tuple(sorted(scaled.ci95)), scaled.n_sampled)


def graph_connectivity(knn_indices: np.ndarray, labels: np.ndarray, *, cells: np.ndarray | None = None) -> float:
    """scib-metrics' ``graph_connectivity``.

    Every neighbour of the directed kNN graph is an edge; per label, the largest
    strongly connected component of the label's subgraph holds some share of its
    cells, and the result is the mean share over labels.

    Parameters
    ----------
    knn_indices
        ``(n_cells, k)`` neighbours of every cell (self included or not).
    labels
        ``(n_cells,)`` labels.
    cells
        Boolean ``(n_cells,)``: only the labels of these cells (default all).
    """
    n, k = knn_indices.shape
    codes, uniques = pd.factorize(np.asarray(labels), sort=True)
    source = np.repeat(np.arange(n), k)
    target = np.asarray(knn_indices).ravel()
    within = codes[source] == codes[target]  # edges between labels are cut
    graph = sparse.csr_matrix(
        (np.ones(int(within.sum()), dtype=np.int8), (source[within], target[within])), shape=(n, n)
    )
    _, component = csgraph.connected_components(graph, connection="strong")
    scored = np.unique(codes if cells is None else codes[cells])
    shares = []
    for code in scored:
        sizes = np.unique(component[codes == code], return_counts=True)[1]
        shares.append(sizes.max() / sizes.sum())
    return float(np.mean(shares))


def principal_component_regression(X: np.ndarray, covariate: np.ndarray) -> float:
    """scib-metrics' ``principal_component_regression`` with a categorical covariate and
    all components.

    The variance-weighted mean over principal components of each component's R^2 on
    the one-hot covariate. With every component kept, this is the share of the total
    variance that lies between the covariate's groups,
    ``sum_b n_b |mean_b - mean|^2 / sum_i |x_i - mean|^2``, computed here in O(cells × dims).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` representation.
    covariate
        ``(n_cells,)`` group labels (batches).
    """
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(axis=0)
    codes, uniques = pd.factorize(np.asarray(covariate))
    one_hot = sparse.csr_matrix((np.ones(len(codes)), (codes, np.arange(len(codes)))), shape=(len(uniques), len(codes)))
    group_sums = np.asarray(one_hot @ centred)
    sizes = np.bincount(codes, minlength=len(uniques)).astype(np.float64)
    between = float(((group_sums**2).sum(axis=1) / sizes).sum())
    total = float(np.einsum("ij,ij->", centred, centred))
    return between / total if total > 0 else float("nan")


def pcr_comparison(pcr_pre: float, pcr_post: float) -> float:
    """scib-metrics' scaled ``pcr_comparison``: ``(pre - post) / pre``, 0 when negative
    (integration added batch variance); NaN when ``pre`` is 0 (no batch variance to remove)."""
    if not pcr_pre > 0:
        return float("nan")
    return max((pcr_pre - pcr_post) / pcr_pre, 0.0)


def kmeans_clusters(X: np.ndarray, n_clusters: int, *, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    """Lloyd's k-means from one k-means++ start (scikit-learn, seeded), run until no cell
    changes cluster: the fixed point scib-metrics' k-means (300 Lloyd steps) reaches from
    the same start. Its start is drawn from JAX's generator, so the two agree where their
    starts lead to the same fixed point (always, given the same ``init``: ``(n_clusters,
    n_dims)`` starting centroids).
    """
    from sklearn.cluster import KMeans  # 1.4 s to import: only when used

    model = KMeans(n_clusters=n_clusters, init="k-means++" if init is None else init, n_init=1, max_iter=300,
                   tol=0.0, random_state=seed)
    return model.fit_predict(np.asarray(X, dtype=np.float32))


def nmi_ari_kmeans(X: np.ndarray, labels: np.ndarray, *, seed: int) -> tuple[float, float]:
    """scib-metrics' ``nmi_ari_cluster_labels_kmeans``: NMI and ARI between ``labels`` and
    :func:`kmeans_clusters` with one cluster per label."""
    clusters = kmeans_clusters(X, len(pd.unique(np.asarray(labels))), seed=seed)
    return clu.normalized_mutual_info(labels, clusters), clu.adjusted_rand_index(labels, clusters)
