"""Sequential alignment: do an embedding's nearest neighbours share a cell's time point?

cz-benchmarks' ``sequential_alignment`` (0.15.1, ``czbenchmarks.metrics.utils``),
computed from czb's shared exact kNN graph instead of a fresh search, and with a
seeded random baseline (cz-benchmarks draws it from numpy's global random state,
so repeated calls on the same input disagree).

Definition, for time points ``t`` (numbers, ordered) and ``k`` neighbours::

    D = mean_i  mean_{j in N_k(i)} |t_i - t_j|        (N_k(i): the k nearest cells, i excluded)
    B = mean over S draws of  mean_{j in R(i)} |t_i - t_j|,
        i uniform over cells, R(i) k distinct cells other than i, uniform;
        S = min(10_000, 10 n)
    sequential_alignment = clip(1 - D / B, 0, 1)       (1 when B = 0)

and 1 when every cell has the same time point. ``B`` estimates the mean absolute
time difference between two distinct cells, ``E = 2 / (n (n - 1)) * sum_{i<j} |t_i - t_j|``,
whatever ``k``; :func:`expected_random_distance` computes ``E`` exactly, and
``baseline="exact"`` uses it in place of the draws.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from czb.evaluation.registry import MetricInfo, register_metric

SEQUENTIAL_ALIGNMENT = register_metric(
    MetricInfo(
        name="sequential_alignment",
        description="1 - (mean |time difference| between each cell and its k = 15 nearest neighbours) / "
        "(the same for k random other cells, seeded Monte Carlo), clipped to [0, 1]; 1 = neighbours "
        "share time points, 0 = no better than random (cz-benchmarks' definition).",
        reference="https://github.com/chanzuckerberg/cz-benchmarks",
        range=(0.0, 1.0),
        higher_is_better=True,
        stochastic=True,
    )
)

#: cz-benchmarks' cap on the number of random draws of the baseline.
MAX_BASELINE_SAMPLES = 10_000
#: Rows of the baseline drawn at once (bounds the temporaries to a few MB).
_BASELINE_BLOCK = 4096
#: Cells per block of the neighbour distances (bounds the temporaries to ~25 MB at k = 50).
_ROW_BLOCK = 65_536


def _check_knn(knn_indices: np.ndarray, n: int, columns: int) -> np.ndarray:
    knn_indices = np.asarray(knn_indices)
    if knn_indices.ndim != 2 or knn_indices.shape[0] != n:
        msg = f"knn_indices must have shape ({n}, k + 1); got {knn_indices.shape}"
        raise ValueError(msg)
    if knn_indices.shape[1] < columns:
        msg = f"the kNN graph has {knn_indices.shape[1]} columns; {columns} needed (self + neighbours)"
        raise ValueError(msg)
    if not (knn_indices[:, 0] == np.arange(n)).all():
        msg = "knn_indices must hold each cell itself in column 0 (czb's neighbour-graph convention)"
        raise ValueError(msg)
    return knn_indices


def neighbor_time_distance(
    knn_indices: np.ndarray, time_points: np.ndarray, k: int | np.ndarray
) -> float:
    """Mean over cells of the mean ``|t_i - t_j|`` over each cell's nearest neighbours.

    Parameters
    ----------
    knn_indices
        ``(n_cells, >= k_max + 1)`` neighbour indices sorted by distance, the cell
        itself in column 0 (as :func:`czb.evaluation.neighbors.exact_knn` returns).
    time_points
        ``(n_cells,)`` numeric time points.
    k
        Neighbours per cell, self excluded: one int, or an ``(n_cells,)`` int array
        (adaptive neighbourhoods).

    Returns
    -------
    The unnormalised score ``D`` (same unit as the time points; lower is better).
    """
    t = np.asarray(time_points, dtype=np.float64)
    n = t.shape[0]
    k_cell = np.broadcast_to(np.asarray(k, dtype=np.int64), (n,))
    if (k_cell < 1).any():
        msg = "k must be at least 1"
        raise ValueError(msg)
    k_max = int(k_cell.max())
    idx = _check_knn(knn_indices, n, k_max + 1)[:, 1 : k_max + 1]
    per_cell = np.empty(n)
    columns = np.arange(1, k_max + 1)
    for start in range(0, n, _ROW_BLOCK):
        rows = slice(start, min(start + _ROW_BLOCK, n))
        diffs = np.abs(t[rows, None] - t[idx[rows]])
        inside = columns[None, :] <= k_cell[rows, None]
        per_cell[rows] = np.where(inside, diffs, 0.0).sum(axis=1) / k_cell[rows]
    return float(per_cell.mean())


def adaptive_neighbors(knn_distances: np.ndarray, base_k: int) -> np.ndarray:
    """cz-benchmarks' density-adapted neighbourhood sizes (``adaptive_k=True``).

    Density is the inverse distance to the ``d``-th nearest cell, counting the cell
    itself, with ``d = max(2, min(30, max(2, 3 base_k, n // 4), n - 1))``. Densities
    are scaled to [0, 1] between their 10th and 90th percentiles (clipped), and a cell
    of scaled density ``rho`` gets ``round(base_k * (0.5 + 1.5 (1 - rho)))``
    neighbours, clipped to ``[3, min(50, n // 2)]`` (all 3 when that range is empty).

    Parameters
    ----------
    knn_distances
        ``(n_cells, >= d)`` sorted neighbour distances, self (0) in column 0.
    base_k
        The task's ``k``.

    Returns
    -------
    ``(n_cells,)`` int64 neighbours per cell, self excluded.
    """
    dist = np.asarray(knn_distances, dtype=np.float64)
    n = dist.shape[0]
    density_k = max(2, int(min(30, max(2, base_k * 3, n // 4), max(1, n - 1))))
    if dist.shape[1] < density_k:
        msg = f"the kNN graph has {dist.shape[1]} columns; adaptive k needs {density_k}"
        raise ValueError(msg)
    density = 1.0 / (dist[:, density_k - 1] + 1e-10)
    low, high = np.percentile(density, [10, 90])
    scaled = np.clip((density - low) / (high - low + 1e-10), 0.0, 1.0)
    k_values = np.round(base_k * (0.5 + 1.5 * (1.0 - scaled))).astype(np.int64)
    upper, lower = min(50, n // 2), 3
    if upper < lower:
        return np.full(n, lower, dtype=np.int64)
    return np.clip(k_values, lower, upper)


def adaptive_columns_needed(n_cells: int, base_k: int) -> int:
    """Columns of the kNN graph (self included) that ``adaptive_k=True`` may read."""
    density_k = max(2, int(min(30, max(2, base_k * 3, n_cells // 4), max(1, n_cells - 1))))
    upper = min(50, n_cells // 2)
    return max(density_k, (upper if upper >= 3 else 3) + 1)


def _distinct_draws(rng: np.random.Generator, rows: int, pool: int, k: int) -> np.ndarray:
    """``(rows, k)`` draws, each row ``k`` distinct integers of ``[0, pool)``, uniformly
    among k-subsets (Floyd's algorithm, vectorised over rows; O(rows k^2))."""
    out = np.empty((rows, k), dtype=np.int64)
    for col, top in enumerate(range(pool - k, pool)):
        pick = rng.integers(0, top + 1, size=rows)
        taken = (out[:, :col] == pick[:, None]).any(axis=1)
        out[:, col] = np.where(taken, top, pick)
    return out


def random_baseline(
    time_points: np.ndarray, k: int, *, seed: int, n_samples: int | None = None
) -> float:
    """cz-benchmarks' random baseline ``B``, drawn from ``numpy.random.default_rng(seed)``.

    Each of ``n_samples`` draws picks a cell ``i`` uniformly and ``min(k, n - 1)``
    distinct other cells uniformly, and takes the mean ``|t_i - t_j|`` over them;
    ``B`` is the mean over draws. Same seed, same value.

    Parameters
    ----------
    time_points
        ``(n_cells,)`` numeric time points.
    k
        Random neighbours per draw (the task's ``k``).
    seed
        Seed of the generator.
    n_samples
        Draws; default ``min(10_000, 10 n)`` as cz-benchmarks.

    Returns
    -------
    ``B``; its expectation is :func:`expected_random_distance`.
    """
    t = np.asarray(time_points, dtype=np.float64)
    n = t.shape[0]
    if n < 2:
        return 0.0
    k = max(1, min(int(k), n - 1))
    n_samples = min(MAX_BASELINE_SAMPLES, 10 * n) if n_samples is None else int(n_samples)
    rng = np.random.default_rng(seed)
    total = 0.0
    for start in range(0, n_samples, _BASELINE_BLOCK):
        rows = min(_BASELINE_BLOCK, n_samples - start)
        cells = rng.integers(0, n, size=rows)
        others = _distinct_draws(rng, rows, n - 1, k)
        others += others >= cells[:, None]  # skip the cell itself
        total += np.abs(t[cells, None] - t[others]).mean(axis=1).sum()
    return float(total / n_samples)


def expected_random_distance(time_points: np.ndarray) -> float:
    """Exact mean ``|t_i - t_j|`` over ordered pairs of distinct cells, in O(n log n).

    This is the expectation of :func:`random_baseline` for every ``k``: with the values
    sorted, ``sum_{i<j} |t_i - t_j| = sum_r t_(r) (2 r - n + 1)`` (``r`` from 0).
    """
    t = np.asarray(time_points, dtype=np.float64)
    n = t.shape[0]
    if n < 2:
        return 0.0
    s = np.sort(t - t.mean())
    pair_sum = float(s @ (2.0 * np.arange(n) - (n - 1)))
    return 2.0 * pair_sum / (n * (n - 1))


def normalized_alignment(distance: float, baseline: float) -> float:
    """``clip(1 - distance / baseline, 0, 1)``; 1 when the baseline is 0."""
    if baseline <= 0:
        return 1.0
    return float(np.clip(1.0 - distance / baseline, 0.0, 1.0))


def sequential_alignment(
    knn_indices: np.ndarray,
    time_points: np.ndarray,
    k: int = 15,
    *,
    seed: int = 0,
    normalize: bool = True,
    adaptive_k: bool = False,
    knn_distances: np.ndarray | None = None,
    baseline: Literal["sampled", "exact"] = "sampled",
    n_baseline_samples: int | None = None,
) -> float:
    """cz-benchmarks' ``sequential_alignment`` on a precomputed kNN graph.

    Parameters
    ----------
    knn_indices
        ``(n_cells, >= k + 1)`` neighbour indices sorted by distance, each cell itself
        in column 0 (czb's shared graph; cz-benchmarks queries ``k + 1`` neighbours
        with scikit-learn and drops the first).
    time_points
        ``(n_cells,)`` numeric time points, order meaningful (ranks of ordered labels).
    k
        Neighbours per cell, self excluded (cz-benchmarks' task default: 15).
    seed
        Seed of the random baseline.
    normalize
        ``True``: the score in [0, 1] (1 = neighbours share time points, 0 = random or
        worse). ``False``: the unnormalised mean neighbour time distance ``D``.
    adaptive_k
        Density-adapted neighbourhood sizes (:func:`adaptive_neighbors`); needs
        ``knn_distances``. The baseline still uses ``k``, as in cz-benchmarks.
    knn_distances
        ``(n_cells, >= d)`` distances matching ``knn_indices`` (``adaptive_k`` only).
    baseline
        ``"sampled"``: cz-benchmarks' Monte Carlo baseline, seeded.
        ``"exact"``: its expectation, :func:`expected_random_distance` (no randomness).
    n_baseline_samples
        Draws of the sampled baseline; default ``min(10_000, 10 n)``.

    Returns
    -------
    The score (``normalize=True``) or ``D``.
    """
    t = np.asarray(time_points, dtype=np.float64)
    n = t.shape[0]
    if n < k + 1:
        msg = f"need at least {k + 1} cells for k = {k}; got {n}"
        raise ValueError(msg)
    if np.unique(t).size == 1:
        return 1.0 if normalize else 0.0
    if adaptive_k:
        if knn_distances is None:
            msg = "adaptive_k needs knn_distances"
            raise ValueError(msg)
        k_cell: int | np.ndarray = adaptive_neighbors(knn_distances, k)
    else:
        k_cell = k
    distance = neighbor_time_distance(knn_indices, t, k_cell)
    if not normalize:
        return distance
    if baseline == "exact":
        base = expected_random_distance(t)
    elif baseline == "sampled":
        base = random_baseline(t, k, seed=seed, n_samples=n_baseline_samples)
    else:
        msg = f"baseline must be 'sampled' or 'exact'; got {baseline!r}"
        raise ValueError(msg)
    return normalized_alignment(distance, base)
