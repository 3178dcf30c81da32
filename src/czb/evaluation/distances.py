"""Blocked Euclidean distance work on all cores: O(n²) without O(n²) memory.

Every all-pairs computation in czb (exact neighbours, silhouettes) walks the distance
matrix in tiles of ``ROW_BLOCK × COL_BLOCK`` cells: one float32 GEMM per tile (the
``‖x‖² + ‖y‖² − 2 x·y`` expansion), reduced at once by the caller, so memory stays
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


def squared_distances(
    A: np.ndarray, B: np.ndarray, norms_a: np.ndarray, norms_b: np.ndarray
) -> np.ndarray:
    """Squared Euclidean distances between the rows of ``A`` and ``B``, ``(len(A), len(B))``.

    One GEMM; negative round-off is clipped to 0. ``norms_*`` are :func:`squared_norms`.
    """
    d2 = A @ B.T
    d2 *= -2.0
    d2 += norms_a[:, None]
    d2 += norms_b[None, :]
    np.maximum(d2, 0.0, out=d2)
    return d2


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
