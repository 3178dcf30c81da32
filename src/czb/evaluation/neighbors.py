"""One nearest-neighbour graph per embedding, shared by every task.

The graph is computed once with the largest ``k`` any task of the run needs;
tasks take the first ``k`` columns they want. Connectivities follow UMAP's fuzzy
simplicial set exactly as scanpy's ``pp.neighbors`` computes them, so Leiden sees
the same graph as in scanpy/cz-benchmarks, without importing umap or numba.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

# Rows per block of the brute-force search: a (block × n) float64 distance block
# stays near 256 MiB at n = 250k, and the BLAS call is large enough to be efficient.
_TARGET_BLOCK_BYTES = 256 * 2**20


def _block_rows(n: int) -> int:
    return int(max(16, min(4096, _TARGET_BLOCK_BYTES // (8 * max(n, 1)))))


def squared_norms(X: np.ndarray) -> np.ndarray:
    """Row-wise squared Euclidean norms, shape ``(n,)``."""
    return np.einsum("ij,ij->i", X, X)


def euclidean_block(X_block: np.ndarray, X: np.ndarray, norms_block, norms) -> np.ndarray:
    """Euclidean distances from the rows of ``X_block`` to all rows of ``X`` via one GEMM."""
    d2 = norms_block[:, None] + norms[None, :] - 2.0 * (X_block @ X.T)
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2)


def exact_knn(X: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by blocked brute force (BLAS), self in column 0.

    Parameters
    ----------
    X
        Embedding, shape ``(n_cells, n_dims)``.
    n_neighbors
        Neighbours per cell, counting the cell itself.

    Returns
    -------
    indices
        ``(n_cells, n_neighbors)`` int64, sorted by distance, ``indices[:, 0] == arange(n)``.
    distances
        ``(n_cells, n_neighbors)`` float64 Euclidean distances (``distances[:, 0] == 0``).
    """
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[0]
    k = min(n_neighbors, n)
    norms = squared_norms(X)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    step = _block_rows(n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        d = euclidean_block(X[start:stop], X, norms[start:stop], norms)
        rows = np.arange(stop - start)
        # Self goes first even when duplicates of the cell exist.
        d[rows, rows + start] = -1.0
        if k < n:
            part = np.argpartition(d, k - 1, axis=1)[:, :k]
        else:
            part = np.broadcast_to(np.arange(n), (stop - start, n)).copy()
        part_d = np.take_along_axis(d, part, axis=1)
        order = np.argsort(part_d, axis=1, kind="stable")
        indices[start:stop] = np.take_along_axis(part, order, axis=1)
        distances[start:stop] = np.take_along_axis(part_d, order, axis=1)
    distances[:, 0] = 0.0
    return indices, distances


def _smooth_knn_sigmas(distances: np.ndarray, n_iter: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's ``smooth_knn_dist`` (local_connectivity=1, bandwidth=1), vectorised over cells.

    Returns ``(sigmas, rhos)``, each of shape ``(n_cells,)``.
    """
    n, k = distances.shape
    target = np.log2(k)
    positive = np.where(distances > 0, distances, np.inf)
    rhos = positive.min(axis=1)
    rhos[~np.isfinite(rhos)] = 0.0
    d = distances[:, 1:] - rhos[:, None]  # UMAP skips column 0 (self)
    lo = np.zeros(n)
    hi = np.full(n, np.inf)
    mid = np.ones(n)
    active = np.ones(n, dtype=bool)
    for _ in range(n_iter):
        if not active.any():
            break
        a = np.flatnonzero(active)
        da = d[a]
        # exp(-max(d, 0) / sigma): 1 where d <= 0, never overflowing for tiny sigma.
        psum = np.exp(-np.maximum(da, 0.0) / mid[a, None]).sum(axis=1)
        converged = np.abs(psum - target) < 1e-5
        too_big = (psum > target) & ~converged
        too_small = ~too_big & ~converged
        hi[a[too_big]] = mid[a[too_big]]
        mid[a[too_big]] = (lo[a[too_big]] + hi[a[too_big]]) / 2.0
        s = a[too_small]
        lo[s] = mid[s]
        mid[s] = np.where(np.isinf(hi[s]), mid[s] * 2.0, (lo[s] + hi[s]) / 2.0)
        active[a[converged]] = False
    sigmas = mid
    mean_all = distances.mean()
    mean_row = distances.mean(axis=1)
    floor = np.where(rhos > 0, 1e-3 * mean_row, 1e-3 * mean_all)
    sigmas = np.maximum(sigmas, floor)
    return sigmas, rhos


def umap_connectivities(indices: np.ndarray, distances: np.ndarray) -> sparse.csr_matrix:
    """Symmetric fuzzy-union connectivities of a kNN graph, as scanpy's ``pp.neighbors``.

    Parameters
    ----------
    indices, distances
        ``(n_cells, k)`` kNN graph including self in column 0.

    Returns
    -------
    ``(n_cells, n_cells)`` CSR matrix with weights in (0, 1].

    References
    ----------
    McInnes, Healy & Melville (2018), UMAP, arXiv:1802.03426.
    """
    n, k = indices.shape
    sigmas, rhos = _smooth_knn_sigmas(distances)
    excess = distances - rhos[:, None]
    weights = np.exp(-np.maximum(excess, 0.0) / sigmas[:, None])  # 1 where excess <= 0
    weights[indices == np.arange(n)[:, None]] = 0.0
    rows = np.repeat(np.arange(n), k)
    A = sparse.csr_matrix((weights.ravel(), (rows, indices.ravel())), shape=(n, n))
    A.eliminate_zeros()
    At = A.T.tocsr()
    union = A + At - A.multiply(At)
    union = union.tocsr()
    union.eliminate_zeros()
    union.sort_indices()
    return union


@dataclass
class NeighborGraph:
    """kNN graph of one embedding: indices and distances with self in column 0.

    Attributes
    ----------
    indices
        ``(n_cells, k)`` neighbour indices sorted by distance.
    distances
        ``(n_cells, k)`` Euclidean distances.
    method
        How it was computed (``"exact"``).
    """

    indices: np.ndarray
    distances: np.ndarray
    method: str = "exact"
    _connectivities: dict[int, sparse.csr_matrix] = field(default_factory=dict, repr=False)

    @property
    def n_cells(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def knn(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` neighbours (self included), as views."""
        if k > self.k:
            msg = f"graph has {self.k} neighbours per cell, {k} were asked for"
            raise ValueError(msg)
        return self.indices[:, :k], self.distances[:, :k]

    def connectivities(self, k: int = 15) -> sparse.csr_matrix:
        """UMAP connectivities of the ``k``-neighbour graph (cached per ``k``)."""
        k = min(k, self.k)
        if k not in self._connectivities:
            self._connectivities[k] = umap_connectivities(*self.knn(k))
        return self._connectivities[k]


def compute_neighbors(X: np.ndarray, n_neighbors: int) -> NeighborGraph:
    """Build the shared graph of an embedding.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    n_neighbors
        Largest neighbourhood (self included) any task needs; capped at ``n_cells``.
    """
    indices, distances = exact_knn(X, n_neighbors)
    return NeighborGraph(indices=indices, distances=distances, method="exact")
