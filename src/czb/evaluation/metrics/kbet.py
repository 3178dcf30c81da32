"""kBET per cell type on diffusion neighbourhoods (scib-metrics' ``kbet_per_label``).

For each label, the cells' subgraph of the shared UMAP connectivities is embedded
with a multiscale diffusion map, each cell's ``k0`` nearest cells in that embedding
form its neighbourhood, and a chi-square test asks whether the neighbourhood's batch
composition matches the label's. The score is the share of cells whose test is not
rejected, averaged over labels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse import linalg as sparse_linalg
from scipy.special import gammaincc

from czb.evaluation.estimates import SAMPLE_SIZE
from czb.evaluation.neighbors import exact_sorted, umap_connectivities
from czb.evaluation.registry import MetricInfo, register_metric

KBET_PER_LABEL = register_metric(
    MetricInfo(
        name="kbet_per_label",
        description="kBET acceptance rate (chi-square test of each cell's neighbourhood batch "
        "composition, alpha 0.05) per cell type, on diffusion-map neighbourhoods of the type's "
        "subgraph of the 50-neighbour UMAP graph, averaged over types (scib-metrics' kbet_per_label).",
        reference="doi:10.1038/s41592-018-0254-1",
    )
)

#: Neighbours of the graph kBET reads (scib-metrics' Benchmarker passes its 50-neighbour graph).
KBET_NEIGHBORS = 50
#: Cells of the random subsample kBET is computed on where the dataset is larger than
#: :data:`czb.evaluation.metrics.mixing.EXACT_MAX_CELLS` (:func:`kbet_subsample`).
KBET_SAMPLE_SIZE = SAMPLE_SIZE
#: Diffusion components, as scib-metrics.
DIFFUSION_COMPONENTS = 100
#: Labels with fewer cells are not scored (scib-metrics' threshold).
MIN_CELLS = 10
#: A small component (fewer than 3 k0 cells) is left out; if they hold more than this
#: share of a label's cells, the label scores 0 (scib-metrics' rule).
MIN_SCORED_SHARE = 0.75
#: scib-metrics adds this to the (float32) eigenvalues before the multiscale weighting.
_EIGEN_EPS = np.float32(1e-8)


def kbet_acceptance(knn_indices: np.ndarray, batches: np.ndarray, *, alpha: float = 0.05) -> float:
    """kBET acceptance rate: the share of cells whose neighbourhood passes the test.

    Each row's batch counts among its neighbours (itself included) are compared with
    the counts expected from the batches' overall frequencies (Pearson chi-square,
    ``n_batches - 1`` degrees of freedom); a row is accepted when ``p >= alpha``.

    Parameters
    ----------
    knn_indices
        ``(n_cells, k)`` neighbours of every cell (row indices into ``batches``).
    batches
        ``(n_cells,)`` batch labels.

    References
    ----------
    Büttner et al. (2019), doi:10.1038/s41592-018-0254-1.
    """
    codes, uniques = pd.factorize(np.asarray(batches))
    n_batches = len(uniques)
    expected = np.bincount(codes, minlength=n_batches) / len(codes) * knn_indices.shape[1]
    n, k = knn_indices.shape
    flat = (np.arange(n)[:, None] * n_batches + codes[knn_indices]).ravel()
    observed = np.bincount(flat, minlength=n * n_batches).reshape(n, n_batches)
    statistic = ((observed - expected) ** 2 / expected).sum(axis=1)
    p_values = gammaincc((n_batches - 1) / 2, statistic / 2)  # chi-square survival function
    return float(np.mean(p_values >= alpha))


def exact_neighbors(X: np.ndarray, k: int, *, distances: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Every row's ``k`` nearest rows (itself included), exhaustively: faiss' flat
    (brute-force) float32 search on centred rows; with ``distances``, recomputed in float64
    and sorted (ties by index, each row first in its own list). For the small graphs kBET
    builds, 2-3x faster than the tiled search of :func:`~czb.evaluation.neighbors.exact_knn`,
    which is built for graphs of 10^4-10^5 cells.

    Returns
    -------
    ``(indices, distances)``; ``distances`` is ``None`` (and the rows unsorted) without ``distances``.
    """
    import faiss

    X = np.asarray(X, dtype=np.float64)
    k = min(k, len(X))
    centred = np.ascontiguousarray(X - X.mean(axis=0), dtype=np.float32)  # centring keeps float32 accurate
    index = faiss.IndexFlatL2(centred.shape[1])
    index.add(centred)
    _, found = index.search(centred, k)
    if not distances:
        return found, None
    return exact_sorted(X, X, found.astype(np.int64), own=np.arange(len(X)))


def diffusion_embedding(connectivities: sparse.spmatrix, n_components: int) -> np.ndarray:
    """Multiscale diffusion map of a connected (or all-large-components) graph, as
    scib-metrics' ``diffusion_nn`` builds it (after scanpy's diffusion map).

    The kernel is density-normalised (``K = D^-1 W D^-1``), made symmetric
    (``T = Z^-1/2 K Z^-1/2``, ``Z`` its row sums), and its ``n_components``
    largest-magnitude eigenvectors are each scaled by ``λ / (1 - λ)`` (the sum over all
    diffusion times), or by 1 where ``λ`` is 1 in float32.

    Raises
    ------
    ValueError
        When the eigendecomposition fails (scib-metrics then scores the label 0).
    """
    W = sparse.csr_matrix(connectivities, dtype=np.float64)
    n = W.shape[0]
    q = np.asarray(W.sum(axis=0)).ravel()
    K = sparse.diags(1.0 / q) @ W @ sparse.diags(1.0 / q)
    z = np.sqrt(np.asarray(K.sum(axis=0)).ravel())
    T = sparse.diags(1.0 / z) @ K @ sparse.diags(1.0 / z)
    k = min(n - 1, n_components)
    # A fixed start vector: ARPACK otherwise draws one from a process-wide stream.
    v0 = np.random.default_rng(0).uniform(-1.0, 1.0, n)
    try:
        values, vectors = sparse_linalg.eigsh(T, k=k, which="LM", v0=v0)
    except sparse_linalg.ArpackError as e:
        raise ValueError(str(e)) from None
    # scib-metrics keeps float32 eigenvalues: one within float32 rounding of 1 is the
    # stationary direction and weighs 1, not λ / (1 - λ) ≈ 10^7.
    values = values.astype(np.float32) + _EIGEN_EPS
    with np.errstate(divide="ignore"):
        weights = np.where(values == 1, values, values / (1 - values)).astype(np.float64)
    return vectors * weights


def _label_score(connectivities: sparse.csr_matrix, batches: np.ndarray, *, alpha: float, n_components: int) -> float:
    """kBET of one label's cells: ``connectivities`` is their subgraph, ``batches`` theirs."""
    n = len(batches)
    codes, uniques = pd.factorize(batches)
    if n < MIN_CELLS or len(uniques) == 1:
        return float("nan")
    k0 = int(min(70, max(10, np.floor(n / len(uniques) / 4))))
    n_comp, component = csgraph.connected_components(connectivities, connection="strong")
    keep = np.arange(n)
    if n_comp > 1:
        sizes = np.bincount(component)
        keep = np.flatnonzero(sizes[component] >= 3 * k0)
        if len(keep) / n < MIN_SCORED_SHARE:
            return 0.0
        connectivities = connectivities[keep][:, keep]
    try:
        embedding = diffusion_embedding(connectivities, min(n_components, len(keep) - 1))
    except ValueError:
        return 0.0
    # A label of 10 cells has no 11 neighbours: all 10 form each neighbourhood (scib-metrics
    # pads with an index of -1, i.e. counts its last cell twice).
    idx, _ = exact_neighbors(embedding, k0 + 1, distances=False)  # kBET reads the set only
    return kbet_acceptance(idx, codes[keep], alpha=alpha)


def kbet_label_scores(
    connectivities: sparse.spmatrix,
    batches: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float = 0.05,
    n_components: int = DIFFUSION_COMPONENTS,
) -> dict:
    """kBET acceptance of every label (NaN where it is not scored), as
    :func:`kbet_per_label` computes them, by label in sorted order."""
    connectivities = sparse.csr_matrix(connectivities)
    labels = np.asarray(labels)
    batches = np.asarray(batches)
    codes, uniques = pd.factorize(labels, sort=True)
    scores = {}
    for code, label in enumerate(uniques):
        members = np.flatnonzero(codes == code)
        sub = connectivities[members][:, members]
        sub.sort_indices()
        scores[label] = _label_score(sub, batches[members], alpha=alpha, n_components=n_components)
    return scores


def kbet_per_label(
    connectivities: sparse.spmatrix,
    batches: np.ndarray,
    labels: np.ndarray,
    *,
    alpha: float = 0.05,
    n_components: int = DIFFUSION_COMPONENTS,
) -> float:
    """scib-metrics' ``kbet_per_label`` on the shared graph.

    Per label with at least :data:`MIN_CELLS` cells in two or more batches: ``k0 =
    clip(floor(mean cells per batch / 4), 10, 70)``; the label's subgraph of
    ``connectivities`` is embedded by :func:`diffusion_embedding` (connected
    components smaller than ``3 k0`` dropped; if they hold over a quarter of the
    cells the label scores 0), and :func:`kbet_acceptance` of each cell's ``k0 + 1``
    exact nearest cells (itself included) in that embedding is the label's score.

    Three differences from scib-metrics 0.5.10, in its numerics and bookkeeping rather
    than its definition: neighbours are exact where it uses approximate ones
    (pynndescent); each label gets ``min(100, cells - 1)`` diffusion components, where
    scib-metrics carries a smaller label's count over to every label scored after it (in
    sorted order); and the stationary eigenvector always weighs 1. scib-metrics computes
    the diffusion operator in float32, so for some labels (about one in a hundred on test
    data) its top eigenvalue comes out as 0.99999994 instead of 1 and gets weight
    λ / (1 - λ) ≈ 1.7e7: the embedding then collapses onto that one vector (the square
    root of each cell's degree), and the label's score onto whatever degree-alike
    neighbours give.

    Parameters
    ----------
    connectivities
        ``(n_cells, n_cells)`` symmetric UMAP connectivities of the 50-neighbour graph.
    batches, labels
        ``(n_cells,)`` batch and cell-type labels.

    Returns
    -------
    Mean over scored labels in [0, 1]; NaN when no label can be scored.
    """
    scores = np.array(list(kbet_label_scores(connectivities, batches, labels, alpha=alpha,
                                             n_components=n_components).values()))
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def kbet_subsample(
    X: np.ndarray,
    batches: np.ndarray,
    labels: np.ndarray,
    *,
    k: int = KBET_NEIGHBORS,
    sample_size: int = KBET_SAMPLE_SIZE,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, int]:
    """:func:`kbet_per_label` of a simple random subsample of cells, on the UMAP
    connectivities of the subsample's own exact ``k``-neighbour graph.

    At atlas scale the full computation costs one 100-component eigendecomposition per
    label of up to 10^5 cells (over a minute at 2x10^5 cells on 2 cores); this costs that
    of a ``sample_size``-cell dataset. It is kBET of a smaller dataset drawn from the
    same cells, not an estimate of the full one's with a known error: neighbourhoods of
    ``k0`` cells span more of the embedding in a sparser sample.

    Returns
    -------
    ``(score, n_sampled)``.
    """
    n = len(batches)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample_size, n), replace=False))
    idx, dist = exact_neighbors(np.asarray(X)[rows], k)
    connectivities = umap_connectivities(idx, dist)
    score = kbet_per_label(connectivities, np.asarray(batches)[rows], np.asarray(labels)[rows], alpha=alpha)
    return score, len(rows)
