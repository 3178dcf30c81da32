"""Blocked Euclidean distance work on all cores: O(n²) without O(n²) memory.

Every all-pairs computation in czb (exact neighbours, silhouettes) walks the distance
matrix in tiles of ``ROW_BLOCK × COL_BLOCK`` cells: one float32 GEMM per tile (the
``‖x‖² + ‖y‖² − 2 x·y`` expansion, folded into the GEMM by :func:`distance_operands`),
reduced at once by the caller, so memory stays
O(tile) and the work is BLAS-bound. Row blocks run in a thread pool with one BLAS
thread per worker, because numpy's element-wise passes (add, sqrt, selection) are
single-threaded and would otherwise leave all but one core idle.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Rows per work item; with COL_BLOCK columns a float32 tile is 8 MiB, near cache size.
ROW_BLOCK = 256
COL_BLOCK = 8192


def default_n_jobs() -> int:
    """Worker threads for distance work: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def as_float32(X: np.ndarray) -> np.ndarray:
    """``X`` as a C-contiguous float32 array (no copy when it already is one)."""
    return np.ascontiguousarray(X, dtype=np.float32)


def squared_norms(X: np.ndarray) -> np.ndarray:
    """Row-wise squared Euclidean norms, shape ``(n,)``, in ``X``'s precision."""
    return np.einsum("ij,ij->i", X, X)


def distance_operands(Q: np.ndarray, R: np.ndarray, *, query_norms: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Augmented float32 operands whose product is the squared distance matrix.

    ``[−2q, ‖q‖², 1] · [r, 1, ‖r‖²] = ‖q − r‖²``, so one GEMM of a row block of the first
    with a column tile of the second gives the tile's squared distances with no
    element-wise pass (each pass over a tile costs about a third of its GEMM). Scaling
    by −2 is exact, so the rounding is that of the plain expansion. Centre the data
    first: the expansion loses ``eps·‖x‖²`` to cancellation.

    Parameters
    ----------
    Q, R
        ``(n_q, d)`` and ``(n_r, d)`` points.
    query_norms
        ``False``: leave ``‖q‖²`` out (``[−2q, 1] · [r, ‖r‖²] = ‖q − r‖² − ‖q‖²``), which
        ranks each query's candidates the same, for a nearest-neighbour search.

    Returns
    -------
    ``(n_q, d + 2)`` and ``(n_r, d + 2)`` C-contiguous float32 arrays (``d + 1`` columns
    without query norms).
    """
    Q, R = as_float32(Q), as_float32(R)
    extra = 2 if query_norms else 1
    left = np.empty((len(Q), Q.shape[1] + extra), dtype=np.float32)
    np.multiply(Q, -2.0, out=left[:, : Q.shape[1]])
    if query_norms:
        left[:, -2] = squared_norms(Q)
    left[:, -1] = 1.0
    right = np.empty((len(R), R.shape[1] + extra), dtype=np.float32)
    right[:, : R.shape[1]] = R
    if query_norms:
        right[:, -2] = 1.0
    right[:, -1] = squared_norms(R)
    return left, right


def column_tiles(n: int, step: int = COL_BLOCK) -> Iterator[slice]:
    """Consecutive column slices of at most ``step`` columns."""
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def map_row_blocks(
    work: Callable[[np.ndarray], None],
    rows: np.ndarray,
    *,
    n_jobs: int | None = None,
    block: int = ROW_BLOCK,
) -> None:
    """Call ``work(row_block)`` for consecutive blocks of ``rows``, in parallel threads.

    ``work`` writes its results into preallocated arrays (disjoint rows per block), so
    no result passes back through Python. BLAS is held to one thread per worker while
    the pool runs.

    Parameters
    ----------
    work
        Function of one ``(≤ block,)`` int array of row indices.
    rows
        Row indices to process, shape ``(n,)``.
    n_jobs
        Worker threads (default: :func:`default_n_jobs`).
    """
    from threadpoolctl import threadpool_limits

    blocks = [rows[i : i + block] for i in range(0, len(rows), block)]
    n_jobs = min(n_jobs or default_n_jobs(), max(len(blocks), 1))
    if n_jobs == 1:
        for b in blocks:
            work(b)
        return
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(n_jobs) as pool:
        # list() re-raises the first exception of any block.
        list(pool.map(work, blocks))


def float64_candidates(
    X: np.ndarray, R: np.ndarray, r_norms: np.ndarray, Q: np.ndarray, Q_raw: np.ndarray, k: int,
    *, own: np.ndarray | None,
) -> np.ndarray:
    """``(n_queries, k)`` rows of ``X`` nearest to each query, ties broken by index.

    Candidates are the rows within float64 rounding of the k-th smallest GEMM value
    (``R``, ``Q``: centred points); their distances are then computed as
    ``czb.evaluation.neighbors.exact_sorted`` computes them, so cells at exactly the same distance are told
    apart by index alone (``own``: each query's own row, first)."""
    chosen = np.empty((len(Q), k), dtype=np.int64)
    step = max(1, 2**22 // max(len(R), 1))
    tolerance = 64 * np.finfo(np.float64).eps * (np.einsum("ij,ij->i", Q, Q) + 2 * r_norms.max())
    for start in range(0, len(Q), step):
        d2 = r_norms[None, :] - 2.0 * (Q[start : start + step] @ R.T)
        if own is not None:
            d2[np.arange(d2.shape[0]), own[start : start + step]] = -np.inf
        kth = np.partition(d2, k - 1, axis=1)[:, k - 1] + tolerance[start : start + step]
        for i, (row, limit) in enumerate(zip(d2, kth)):
            query = start + i
            near = np.flatnonzero(row <= limit)
            diff = (X[near] - Q_raw[query])[None]
            key = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))[0]  # exact_sorted's formula
            if own is not None:
                key[near == own[query]] = -1.0
            chosen[query] = near[np.lexsort((near, key))[:k]]
    return chosen
