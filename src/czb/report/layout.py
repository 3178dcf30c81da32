"""2-D maps of embeddings for reports: UMAP's layout, computed with numpy.

The fuzzy graph is the one every task already uses
(:func:`czb.evaluation.neighbors.umap_connectivities` on the shared exact/approximate
kNN search), initialised spectrally and optimised by UMAP's cross-entropy with
negative sampling, so a report needs neither umap-learn nor a numba JIT.
Each epoch applies all its edge updates at once (as UMAP's parallel mode does,
without its races), which is deterministic for a seed.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

#: UMAP's defaults.
N_NEIGHBORS = 15
MIN_DIST = 0.1
NEGATIVE_SAMPLE_RATE = 5


def curve_parameters(min_dist: float = MIN_DIST, spread: float = 1.0) -> tuple[float, float]:
    """``a, b`` of the low-dimensional similarity ``1 / (1 + a d^(2b))`` that best fits
    1 up to ``min_dist`` and ``exp(-(d - min_dist) / spread)`` beyond (UMAP's ``find_ab_params``)."""
    from scipy.optimize import curve_fit

    d = np.linspace(0, spread * 3, 300)
    target = np.where(d < min_dist, 1.0, np.exp(-(d - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2 * b)), d, target)
    return float(a), float(b)


def _initial_layout(graph: sparse.csr_matrix, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Spectral layout (second and third eigenvectors of the normalised graph); the
    first two principal components when the graph is disconnected or eigsh fails."""
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import eigsh

    n = graph.shape[0]
    n_parts, _ = connected_components(graph, directed=False)
    layout = None
    if n_parts == 1 and n > 3:
        degree = np.asarray(graph.sum(axis=1)).ravel()
        scale = sparse.diags(1.0 / np.sqrt(degree))
        normalised = scale @ graph @ scale
        try:
            _, vectors = eigsh(normalised, k=3, which="LA", v0=np.ones(n), tol=1e-4, maxiter=n * 5)
            layout = vectors[:, np.argsort(-_)][:, 1:3]
        except (ArithmeticError, RuntimeError):  # ArpackNoConvergence is a RuntimeError
            layout = None
    if layout is None:
        centred = X - X.mean(axis=0)
        _, _, vt = np.linalg.svd(centred[:, : min(centred.shape[1], 50)], full_matrices=False)
        layout = centred[:, : vt.shape[1]] @ vt[:2].T if vt.shape[0] >= 2 else np.zeros((n, 2))
    layout = layout * (10.0 / max(np.abs(layout).max(), 1e-12))
    return layout + rng.normal(scale=1e-4, size=layout.shape)


def umap_layout(
    X: np.ndarray,
    *,
    n_neighbors: int = N_NEIGHBORS,
    min_dist: float = MIN_DIST,
    n_epochs: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """UMAP coordinates of the rows of ``X``.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding (a few thousand cells: a report samples them).
    n_neighbors, min_dist
        UMAP's parameters (its defaults).
    n_epochs
        Optimisation epochs (default 500 up to 10,000 cells, 200 above, as UMAP).
    seed
        Seeds the initial jitter and the negative samples.

    Returns
    -------
    ``(n_cells, 2)`` float64 coordinates.

    References
    ----------
    McInnes, Healy & Melville (2018), UMAP, arXiv:1802.03426.
    """
    from czb.evaluation.neighbors import knn_search, umap_connectivities

    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    if n < 3:
        return np.zeros((n, 2))
    rng = np.random.default_rng(seed)
    n_epochs = n_epochs or (500 if n <= 10_000 else 200)
    indices, distances = knn_search(X, None, min(n_neighbors, n), seed=seed)
    graph = umap_connectivities(np.asarray(indices, dtype=np.int64), np.asarray(distances, dtype=np.float64))
    Y = _initial_layout(graph, X, rng)
    Y = 10.0 * (Y - Y.min(axis=0)) / np.maximum(Y.max(axis=0) - Y.min(axis=0), 1e-12)

    coo = graph.tocoo()
    keep = coo.data >= coo.data.max() / n_epochs  # edges that would never be sampled
    heads, tails, weights = coo.row[keep], coo.col[keep], coo.data[keep]
    epochs_per_sample = weights.max() / weights  # the strongest edge every epoch
    next_sample = epochs_per_sample.copy()
    a, b = curve_parameters(min_dist)
    for epoch in range(n_epochs):
        alpha = 1.0 - epoch / n_epochs
        due = np.flatnonzero(next_sample <= epoch + 1)
        if len(due) == 0:
            continue
        next_sample[due] += epochs_per_sample[due]
        j, k = heads[due], tails[due]
        step = np.zeros_like(Y)
        # Attraction along sampled edges, both ends moved.
        diff = Y[j] - Y[k]
        d2 = np.einsum("ij,ij->i", diff, diff)
        with np.errstate(divide="ignore", invalid="ignore"):
            coeff = np.where(d2 > 0, -2.0 * a * b * d2 ** (b - 1.0) / (a * d2**b + 1.0), 0.0)
        grad = np.clip(coeff[:, None] * diff, -4.0, 4.0)
        np.add.at(step, j, grad)
        np.add.at(step, k, -grad)
        # Repulsion from random cells.
        heads_neg = np.repeat(j, NEGATIVE_SAMPLE_RATE)
        others = rng.integers(0, n, size=len(heads_neg))
        diff = Y[heads_neg] - Y[others]
        d2 = np.einsum("ij,ij->i", diff, diff)
        coeff = 2.0 * b / ((0.001 + d2) * (a * d2**b + 1.0))
        grad = np.where(d2[:, None] > 0, np.clip(coeff[:, None] * diff, -4.0, 4.0), 0.0)
        grad[others == heads_neg] = 0.0
        np.add.at(step, heads_neg, grad)
        Y += alpha * step
    return Y
