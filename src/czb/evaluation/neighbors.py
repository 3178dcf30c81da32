"""One nearest-neighbour graph per embedding, shared by every task.

The graph is computed once with the largest ``k`` any task of the run needs;
tasks take the first ``k`` columns they want. Connectivities follow UMAP's fuzzy
simplicial set exactly as scanpy's ``pp.neighbors`` computes them, so Leiden sees
the same graph as in scanpy/cz-benchmarks, without importing umap or numba.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from czb.evaluation import distances
from czb.evaluation.distances import squared_norms  # noqa: F401 - re-exported

#: Up to this many cells the graph is exact (tiled brute force); above, approximate.
EXACT_MAX_CELLS = 50_000
#: Cells whose exact neighbours are computed to measure an approximate graph's recall.
RECALL_SAMPLE = 1000
#: Inverted lists of the approximate search (≈ 2√n of ≈ √n/2 cells each), k-means
#: iterations and training cells per list, and the lists each query scans: ~16√n
#: candidates per query (7,200 at 2×10^5 cells). On benchmarks/heldout_data.py's
#: embedding at 2×10^5 cells, 16 lists found 98.6% of the 15 nearest neighbours in 11.0 s,
#: 32 lists 99.8% in 14.2 s and 48 lists 99.9% in 17.3 s (2 cores); cz-benchmarks'
#: pynndescent graph finds ~98%.
#: Every graph records its own measured recall.
IVF_LISTS_PER_SQRT_N = 2.0
IVF_NPROBE = 32
IVF_TRAIN_ITERATIONS = 10
IVF_TRAIN_PER_LIST = 40


def exact_knn(
    X: np.ndarray, n_neighbors: int, *, queries: np.ndarray | None = None, n_jobs: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by tiled brute force, self in column 0.

    Candidates are chosen on float32 GEMM distances (on centred data, which keeps the
    ``‖x‖² + ‖y‖² − 2x·y`` expansion accurate), then the chosen neighbours' distances
    are recomputed in float64 and sorted, so values and order are float64-exact up to
    near-ties at the k-th neighbour.

    Parameters
    ----------
    X
        Reference points, shape ``(n_cells, n_dims)``.
    n_neighbors
        Neighbours per query, counting the query itself in a self-join.
    queries
        Query points ``(n_queries, n_dims)``; ``None``: every row of ``X`` (self-join,
        each cell first in its own list even when it has duplicates).
    n_jobs
        Worker threads (default: all cores).

    Returns
    -------
    indices
        ``(n_queries, k)`` int64 row indices of ``X``, nearest first, ``k = min(n_neighbors, n_cells)``.
    distances
        ``(n_queries, k)`` float64 Euclidean distances.
    """
    X64 = np.asarray(X, dtype=np.float64)
    self_join = queries is None
    Q64 = X64 if self_join else np.asarray(queries, dtype=np.float64)
    n = X64.shape[0]
    k = min(n_neighbors, n)
    if k == 0:
        return np.empty((len(Q64), 0), dtype=np.int64), np.empty((len(Q64), 0))
    # Candidates are chosen in float32, where near-ties at the k-th neighbour may come out
    # in either order; a margin of extra candidates, re-sorted in float64, makes the first
    # k the same whatever k was asked (a 15-neighbour graph equals the first 15 columns of
    # a 200-neighbour one, so a task's value does not depend on the other tasks of a run).
    k_search = min(n, k + tie_margin(k))
    centre = X64.mean(axis=0)
    # The reference in a seeded random order: every column tile is then a random sample
    # of the cells, so after the first tiles few candidates beat each row's k-th best.
    perm = np.random.default_rng(0).permutation(n)
    # Each tile's GEMM gives ‖q − r‖² − ‖q‖²; ‖q‖² moves to the threshold side.
    centred = distances.as_float32(Q64 - centre)
    q_norms = distances.squared_norms(centred)
    Q, R = distances.distance_operands(centred, X64[perm] - centre, query_norms=False)
    del centred
    own_column = np.argsort(perm) if self_join else None  # where each query sits in R
    indices = np.empty((Q.shape[0], k_search), dtype=np.int64)
    cutoff = np.empty(Q.shape[0], dtype=np.float64)  # each row's largest kept float32 value

    def work(rows: np.ndarray) -> None:
        r0, r1 = rows[0], rows[-1] + 1
        nearest = NearestSoFar(r1 - r0, k_search, offset=q_norms[r0:r1])
        for tile in distances.column_tiles(n):
            g = Q[r0:r1] @ R[tile].T
            if self_join:  # self goes first even when duplicates of the cell exist
                col = own_column[r0:r1] - tile.start
                inside = np.flatnonzero((col >= 0) & (col < g.shape[1]))
                g[inside, col[inside]] = -np.inf
            nearest.offer(g, perm[tile])
        indices[r0:r1] = nearest.indices
        cutoff[r0:r1] = nearest.values.max(axis=1)

    distances.map_row_blocks(work, np.arange(Q.shape[0]), n_jobs=n_jobs)
    own = np.arange(n) if self_join else None
    indices, dist = exact_sorted(X64, Q64, indices, own=own)
    if k_search == k:
        return indices, dist
    indices, dist = np.ascontiguousarray(indices[:, :k]), np.ascontiguousarray(dist[:, :k])
    # A row is settled when no cell left out can be nearer than its k-th neighbour: every
    # left-out cell's float32 value is at least the row's cutoff, wrong by at most the
    # float32 rounding bound of the expansion. Rows that are not settled (ties within
    # rounding) are searched again in float64 over every cell.
    # A cell nearer than the k-th lies within ‖q‖ + d_k of the centre, which bounds the
    # rounding of its value: γ·(‖q‖² + 2‖r‖²) for the d + 2 products of the expansion.
    q_len = np.sqrt(q_norms.astype(np.float64))
    kth = dist[:, k - 1]
    slack = 2 * (Q64.shape[1] + 4) * np.finfo(np.float32).eps * (q_len**2 + 2 * (q_len + kth) ** 2)
    unsettled = np.flatnonzero(kth**2 >= cutoff - slack)
    if len(unsettled):
        R64 = X64 - centre
        r_norms = np.einsum("ij,ij->i", R64, R64)
        chosen = distances.float64_candidates(X64, R64, r_norms, Q64[unsettled] - centre, Q64[unsettled], k,
                                     own=None if own is None else own[unsettled])
        again, again_dist = exact_sorted(X64, Q64[unsettled], chosen, own=None if own is None else own[unsettled])
        indices[unsettled], dist[unsettled] = again[:, :k], again_dist[:, :k]
    return indices, dist


def tie_margin(k: int) -> int:
    """Extra candidates a search keeps beyond ``k`` so that its first ``k`` do not depend
    on ``k`` (near-ties in float32 are resolved among them)."""
    return max(8, k // 8)


class NearestSoFar:
    """The ``k`` smallest values offered so far in each row, with their ids.

    A tiled exact search offers each tile of (squared) distances; after the first tiles
    few entries beat a row's current k-th best, so those are gathered and merged while
    the rest are dropped after one comparison.

    Parameters
    ----------
    n_rows, k
        Rows (queries) and values kept per row.
    offset
        ``(n_rows,)`` added to every offered value of a row before it is kept (e.g. the
        query's ``‖q‖²`` when tiles hold ``‖q − r‖² − ‖q‖²``), or ``None``.
    """

    def __init__(self, n_rows: int, k: int, *, offset: np.ndarray | None = None):
        self.values = np.full((n_rows, k), np.inf, dtype=np.float32)
        self.indices = np.zeros((n_rows, k), dtype=np.int64)
        self._offset = offset
        self._k = k

    def offer(self, tile: np.ndarray, ids: np.ndarray) -> None:
        """Keep the entries of ``tile`` (``(n_rows, n_cols)``, columns identified by
        ``ids``) that are among each row's ``k`` smallest so far."""
        limit = self.values.max(axis=1)  # inf until k candidates are held
        if self._offset is not None:
            limit -= self._offset
        below = tile < limit[:, None]
        n_hits = np.count_nonzero(below)
        if n_hits == 0:
            return
        if n_hits > below.size // 8:  # early tiles: merge the whole tile
            new_values = tile if self._offset is None else tile + self._offset[:, None]
            new_ids = np.broadcast_to(ids, tile.shape)
        else:  # ragged hits → a padded (rows, most hits) block
            hit_rows, hit_cols = np.divmod(np.flatnonzero(below), tile.shape[1])  # 8× faster than 2-D nonzero
            counts = np.bincount(hit_rows, minlength=len(tile))
            slot = np.arange(len(hit_rows)) - (np.cumsum(counts) - counts)[hit_rows]
            new_values = np.full((len(tile), counts.max()), np.inf, dtype=np.float32)
            new_ids = np.zeros(new_values.shape, dtype=np.int64)
            hit_values = tile[hit_rows, hit_cols]
            if self._offset is not None:
                hit_values += self._offset[hit_rows]
            new_values[hit_rows, slot] = hit_values
            new_ids[hit_rows, slot] = ids[hit_cols]
        values = np.concatenate([self.values, new_values], axis=1)
        indices = np.concatenate([self.indices, new_ids], axis=1)
        keep = np.argpartition(values, self._k - 1, axis=1)[:, : self._k]
        self.values = np.take_along_axis(values, keep, axis=1)
        self.indices = np.take_along_axis(indices, keep, axis=1)


def exact_sorted(
    X: np.ndarray, Q: np.ndarray, indices: np.ndarray, *, own: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 distances from each query to its chosen neighbours, rows sorted by them
    (ties by index).

    Parameters
    ----------
    X, Q
        ``(n_cells, d)`` reference and ``(n_queries, d)`` query points.
    indices
        ``(n_queries, k)`` chosen rows of ``X`` per query.
    own
        ``(n_queries,)`` row of ``X`` that each query is (kept first, at distance 0), or ``None``.
    """
    out_idx = np.empty_like(indices)
    dist = np.empty(indices.shape, dtype=np.float64)
    if not indices.size:
        return out_idx, dist

    def work(rows: np.ndarray) -> None:  # rows are independent: blocks run in threads
        rows = slice(rows[0], rows[-1] + 1)
        chosen = indices[rows]
        diff = X[chosen] - Q[rows, None, :]
        d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
        key = d.copy()
        if own is not None:
            key[chosen == own[rows, None]] = -1.0
        order = np.lexsort((chosen, key), axis=1)
        out_idx[rows] = np.take_along_axis(chosen, order, axis=1)
        dist[rows] = np.take_along_axis(d, order, axis=1)

    step = max(1, 2**22 // max(indices.shape[1] * X.shape[1], 1))
    distances.map_row_blocks(work, np.arange(len(indices)), block=step)
    if own is not None:
        dist[:, 0] = 0.0
    return out_idx, dist


def approximate_knn(
    X: np.ndarray,
    n_neighbors: int,
    *,
    queries: np.ndarray | None = None,
    nprobe: int = IVF_NPROBE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate k nearest neighbours with a faiss inverted-file index (IVF-Flat).

    The cells are split into ``≈ 2√n`` k-means lists (trained on a seeded sample of 40
    cells per list); each query scans its ``nprobe`` nearest lists exactly. Runs on all
    cores; the result is deterministic for a given ``seed``.

    Parameters
    ----------
    X
        Reference points, shape ``(n_cells, n_dims)``.
    n_neighbors
        Neighbours per query (self included in a self-join).
    queries
        ``(n_queries, n_dims)``; ``None``: self-join, each cell first in its own list.
    nprobe
        Lists scanned per query.
    seed
        Seeds the training sample and k-means.

    Returns
    -------
    ``(indices, distances)``, nearest first, as :func:`exact_knn` but int32 and float32
    (half the memory of a 10^6-cell graph). A query whose lists hold fewer than ``k``
    cells gets its nearest found neighbour repeated in the missing slots.

    References
    ----------
    Jégou, Douze & Schmid (2011), doi:10.1109/TPAMI.2010.57; Douze et al. (2024), The
    Faiss library, arXiv:2401.08281.
    """
    import faiss

    X = np.asarray(X)
    centre = X.mean(axis=0, dtype=np.float64)
    R = _centred_float32(X, centre)
    self_join = queries is None
    Q = R if self_join else _centred_float32(np.asarray(queries), centre)
    n, dim = R.shape
    k = min(n_neighbors, n)
    n_lists = ivf_lists(n)
    rng = np.random.default_rng(seed)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, n_lists)
    index.cp.seed = int(seed)
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.cp.min_points_per_centroid = 1  # the seeded sample is the training set: no warning
    index.train(R[np.sort(rng.choice(n, size=min(n, IVF_TRAIN_PER_LIST * n_lists), replace=False))])
    index.add(R)
    index.nprobe = min(nprobe, n_lists)
    # Queries in the order of their nearest list: consecutive queries then scan mostly
    # the same lists while they are in cache (same results, 1.8x faster at 2x10^5 cells).
    _, nearest_list = index.quantizer.search(Q, 1)
    order = np.argsort(nearest_list[:, 0], kind="stable")
    del nearest_list
    # As in exact_knn: a margin beyond k and ties broken by index, so the first k are the
    # same whatever k was asked.
    k_search = min(n, k + tie_margin(k))
    d2, found = index.search(Q[order], k_search)
    restore = np.empty_like(order)
    restore[order] = np.arange(len(order))
    d2, found = d2[restore], found[restore]
    del restore, order
    if k_search > k:
        keep = _first_k_by_value_then_index(d2, found, k)
        d2, found = np.take_along_axis(d2, keep, axis=1), np.take_along_axis(found, keep, axis=1)
        del keep
    # Compact types: at 10^6 cells × 200 neighbours these arrays are the run's largest.
    indices = found.astype(np.int32 if n < 2**31 else np.int64)
    del found
    missing = indices < 0
    if missing.any():
        indices = np.where(missing, indices[:, :1], indices)
        d2 = np.where(missing, d2[:, :1], d2)
    del missing
    np.maximum(d2, 0.0, out=d2)
    dist = np.sqrt(d2, out=d2)
    if self_join:
        _self_first(indices, dist)
    return indices, dist


def _centred_float32(X: np.ndarray, centre: np.ndarray, *, chunk: int = 65_536) -> np.ndarray:
    """``X − centre`` as float32, subtracted in float64 chunk by chunk (no float64 copy
    of ``X``: 1.6 GB at 4×10^6 cells × 50 dimensions)."""
    out = np.empty(X.shape, dtype=np.float32)
    for start in range(0, len(X), chunk):
        out[start : start + chunk] = np.asarray(X[start : start + chunk], dtype=np.float64) - centre
    return out


def _first_k_by_value_then_index(values: np.ndarray, ids: np.ndarray, k: int, *, chunk: int = 65_536) -> np.ndarray:
    """``(n_rows, k)`` column positions of each row's ``k`` smallest ``values``, ties by
    ``ids`` (missing ids, -1, last)."""
    keep = np.empty((len(values), k), dtype=np.int64)
    for start in range(0, len(values), chunk):
        v, i = values[start : start + chunk], ids[start : start + chunk]
        tie_key = np.where(i < 0, np.iinfo(np.int64).max, i)
        keep[start : start + chunk] = np.lexsort((tie_key, v), axis=1)[:, :k]
    return keep


def ivf_lists(n_cells: int) -> int:
    """Inverted lists of :func:`approximate_knn` for ``n_cells`` reference cells."""
    return int(np.clip(round(IVF_LISTS_PER_SQRT_N * np.sqrt(n_cells)), 1, max(n_cells // IVF_TRAIN_PER_LIST, 1)))


def _self_first(indices: np.ndarray, dist: np.ndarray, *, chunk: int = 65_536) -> None:
    """In place: each cell first in its own neighbour list (distance 0); the last
    neighbour drops when the search did not return the cell itself."""
    n, k = indices.shape
    for start in range(0, n, chunk):
        idx, d = indices[start : start + chunk], dist[start : start + chunk]
        own = np.arange(start, start + len(idx))[:, None]
        others = np.argsort(idx == own, axis=1, kind="stable")[:, : k - 1]  # non-self, in order
        idx[:, 1:] = np.take_along_axis(idx, others, axis=1)
        d[:, 1:] = np.take_along_axis(d, others, axis=1)
        idx[:, 0] = own[:, 0]
        d[:, 0] = 0.0


def knn_search(
    reference: np.ndarray,
    queries: np.ndarray | None,
    k: int,
    *,
    exact: bool | None = None,
    seed: int = 0,
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``reference`` for each query row (Euclidean).

    Exact (:func:`exact_knn`) up to :data:`EXACT_MAX_CELLS` reference rows, approximate
    (:func:`approximate_knn`) above, unless ``exact`` forces one or the other.

    Parameters
    ----------
    reference
        ``(n_reference, n_dims)``.
    queries
        ``(n_queries, n_dims)``, or ``None`` for a self-join (each row first in its own list).
    k
        Neighbours per query.

    Returns
    -------
    ``(indices, distances)``: ``(n_queries, min(k, n_reference))`` integer indices and float
    Euclidean distances, nearest first.
    """
    if exact is None:
        exact = len(reference) <= EXACT_MAX_CELLS
    if exact:
        return exact_knn(reference, k, queries=queries, n_jobs=n_jobs)
    return approximate_knn(reference, k, queries=queries, seed=seed)


def neighbor_recall(
    X: np.ndarray,
    indices: np.ndarray,
    *,
    ks: tuple[int, ...] | None = None,
    sample: int = RECALL_SAMPLE,
    seed: int = 0,
) -> dict[int, float]:
    """Share of the true k nearest neighbours an approximate graph found, on sampled cells.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding the graph was built on.
    indices
        ``(n_cells, k)`` approximate neighbour lists (self in column 0).
    ks
        Neighbourhood sizes to score (self included), each ≤ ``k``; default ``(k,)``.
    sample
        Cells whose exact neighbours are computed (``sample × n_cells`` distances).

    Returns
    -------
    For each size ``j``: mean over sampled cells of ``|found ∩ true| / (j - 1)`` among
    the first ``j`` neighbours, self excluded from both.
    """
    n, k = indices.shape
    ks = ks or (k,)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    X64 = np.asarray(X, dtype=np.float64)
    true_idx, _ = exact_knn(X64, k, queries=X64[rows])
    found = np.asarray(indices[rows], dtype=np.int64)
    out = {}
    for j in ks:
        if j < 2:
            out[j] = 1.0
            continue
        # Per true neighbour (distinct cells), whether the found list holds it: a set
        # intersection even where a short found list repeats a cell.
        hits = np.zeros(len(rows))
        for i in range(0, len(rows), 64):
            t, f = true_idx[i : i + 64, :j], found[i : i + 64, :j]
            held = (f[:, :, None] == t[:, None, :]).any(axis=1) & (t != rows[i : i + 64, None])
            hits[i : i + 64] = held.sum(axis=1)
        out[j] = float(np.mean(hits / (j - 1)))
    return out


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
    distances = np.asarray(distances, dtype=np.float64)
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
        ``"exact"`` or ``"faiss_ivf_flat"``.
    recall
        For an approximate graph, the measured share of true neighbours found among
        the first 15 and all ``k`` (:func:`neighbor_recall` on :data:`RECALL_SAMPLE`
        cells); ``None`` when exact.
    """

    indices: np.ndarray
    distances: np.ndarray
    method: str = "exact"
    recall: dict[int, float] | None = None
    _connectivities: dict[int, sparse.csr_matrix] = field(default_factory=dict, repr=False)

    @property
    def n_cells(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def exact(self) -> bool:
        return self.method == "exact"

    def describe(self) -> dict[str, Any]:
        """How the graph was computed, for result records."""
        out: dict[str, Any] = {"method": self.method, "k": self.k}
        if not self.exact:
            out.update(
                lists=ivf_lists(self.n_cells), nprobe=IVF_NPROBE,
                recall={str(j): r for j, r in (self.recall or {}).items()},
                recall_sample=min(RECALL_SAMPLE, self.n_cells),
            )
        return out

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


def compute_neighbors(X: np.ndarray, n_neighbors: int, *, exact: bool | None = None) -> NeighborGraph:
    """Build the shared graph of an embedding.

    Exact up to :data:`EXACT_MAX_CELLS` cells; above, approximate (:func:`approximate_knn`) with
    its recall measured against exact neighbours of :data:`RECALL_SAMPLE` cells.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    n_neighbors
        Largest neighbourhood (self included) any task needs; capped at ``n_cells``.
    exact
        Force exact (``True``) or approximate (``False``) search; ``None``: by size.
    """
    if exact is None:
        exact = X.shape[0] <= EXACT_MAX_CELLS
    if exact:
        indices, dist = exact_knn(X, n_neighbors)
        return NeighborGraph(indices=indices, distances=dist, method="exact")
    indices, dist = approximate_knn(X, n_neighbors)
    recall = neighbor_recall(X, indices, ks=tuple(sorted({min(15, indices.shape[1]), indices.shape[1]})))
    return NeighborGraph(indices=indices, distances=dist, method="faiss_ivf_flat", recall=recall)
