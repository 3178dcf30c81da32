"""Neighbourhood mixing of batch labels: cz-benchmarks' entropy and Harmony's LISI."""

from __future__ import annotations

import numpy as np
import pandas as pd

from czb.evaluation import neighbors
from czb.evaluation.estimates import Z95, Estimate, bootstrap_mean, median_estimate
from czb.evaluation.registry import MetricInfo, register_metric

ENTROPY_PER_CELL = register_metric(
    MetricInfo(
        name="entropy_per_cell",
        description="Mean over cells of the entropy of batch labels among the cell's k = 200 "
        "nearest neighbours (self included), divided by log(#batches) (cz-benchmarks' definition; "
        "falls with dataset size at fixed k).",
        reference="https://github.com/chanzuckerberg/cz-benchmarks",
        per_cell_mean=True,
    )
)
ILISI_NORMALIZED = register_metric(
    MetricInfo(
        name="ilisi_normalized",
        description="Median integration LISI (inverse Simpson index of batch labels, "
        "perplexity-calibrated Gaussian kernel over 90 neighbours, perplexity 30), scaled to "
        "[0, 1] as (iLISI - 1) / (#batches - 1) (scib-metrics' ilisi_knn); stable across "
        "dataset sizes.",
        reference="doi:10.1038/s41592-019-0619-0",
    )
)


#: Cells per chunk of the neighbourhood computations (memory O(chunk × k)).
CHUNK_ROWS = 65_536
#: Up to this many cells entropy and iLISI average every cell's neighbourhood from the
#: shared graph; above, the exact neighbourhoods of ``estimates.SAMPLE_SIZE`` random cells (95% CI
#: recorded). The same size as the graph's exact limit: where every cell's 200
#: neighbours would come from an approximate graph, 20,000 exact neighbourhoods are both
#: cheaper (a tenth of the distances at 2×10^5 cells, a fiftieth at 10^6) and free of
#: search error.
EXACT_MAX_CELLS = neighbors.EXACT_MAX_CELLS


def _per_row_label_sums(neighbour_codes: np.ndarray, n_labels: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Per row, the count (or summed ``weights``) of each label code among its neighbours.

    Parameters
    ----------
    neighbour_codes
        ``(n_rows, k)`` label codes of each row's neighbours.
    weights
        ``(n_rows, k)`` weights, or ``None`` for counts.

    Returns
    -------
    ``(n_rows, n_labels)`` float64.
    """
    n = neighbour_codes.shape[0]
    flat = (np.arange(n)[:, None] * n_labels + neighbour_codes).ravel()
    sums = np.bincount(flat, weights=None if weights is None else weights.ravel(), minlength=n * n_labels)
    return sums.reshape(n, n_labels).astype(np.float64, copy=False)


def entropy_per_cell(knn_indices: np.ndarray, batches: np.ndarray) -> float:
    """cz-benchmarks' ``entropy_per_cell``: normalised batch entropy of kNN neighbourhoods.

    Parameters
    ----------
    knn_indices
        ``(n_cells, k)`` neighbour indices including the cell itself (cz-benchmarks
        queries k = 200 neighbours of every cell, itself among them).
    batches
        ``(n_cells,)`` batch labels.

    Returns
    -------
    Mean over cells of ``H(batch | neighbourhood) / log(n_batches)``; 0 with one batch.
    """
    return float(np.mean(neighborhood_entropy(knn_indices, batches))) if len(knn_indices) else 0.0


def neighborhood_entropy(knn_indices: np.ndarray, batches: np.ndarray) -> np.ndarray:
    """Per row of ``knn_indices`` (any subset of cells' neighbourhoods, shape
    ``(n_rows, k)``), the entropy of batch labels among its ``k`` neighbours divided by
    ``log(n_batches)``; zeros with one batch. ``batches`` covers all cells."""
    codes, uniques = pd.factorize(np.asarray(batches))
    n_batches = len(uniques)
    n, k = knn_indices.shape
    out = np.zeros(n)
    if n_batches < 2:
        return out
    for start in range(0, n, CHUNK_ROWS):
        counts = _per_row_label_sums(codes[knn_indices[start : start + CHUNK_ROWS]], n_batches)
        p = counts / k
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0)
        out[start : start + CHUNK_ROWS] = -plogp.sum(axis=1) / np.log(n_batches)
    return out


def lisi(
    knn_indices: np.ndarray,
    knn_distances: np.ndarray,
    labels: np.ndarray,
    *,
    perplexity: float | None = None,
    tol: float = 1e-5,
    max_iter: int = 50,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Local inverse Simpson index of every cell (Korsunsky et al. 2019).

    Each cell's neighbours (self excluded) get Gaussian weights ``exp(-beta d)``,
    with ``beta`` found by bisection so the weights' entropy equals ``log(perplexity)``;
    LISI is ``1 / sum_b p_b^2`` where ``p_b`` is the weight on batch ``b``.

    Parameters
    ----------
    knn_indices, knn_distances
        ``(n_cells, k)`` neighbour graph; entries equal to the cell itself are ignored.
    labels
        ``(n_cells,)`` labels (batches for iLISI).
    perplexity
        Effective neighbourhood size; default ``floor(k / 3)`` as scib-metrics.
    rows
        The cells whose neighbourhoods ``knn_indices`` holds, when not all cells in
        order (``(n_rows,)``; used to recognise each cell itself among its neighbours).

    Returns
    -------
    ``(n_cells,)`` LISI values in [1, n_labels]; NaN where no weights could be set.
    """
    codes, uniques = pd.factorize(np.asarray(labels))
    n, k = knn_indices.shape
    if perplexity is None:
        perplexity = np.floor(k / 3)
    cells = np.arange(n) if rows is None else np.asarray(rows)
    out = np.empty(n)
    for start in range(0, n, CHUNK_ROWS):
        chunk = slice(start, min(start + CHUNK_ROWS, n))
        out[chunk] = _lisi_rows(
            knn_indices[chunk], np.asarray(knn_distances[chunk], dtype=np.float64), codes, len(uniques),
            cells=cells[chunk], log_perplexity=np.log(perplexity), tol=tol, max_iter=max_iter,
        )
    return out


def _lisi_rows(
    idx: np.ndarray, d: np.ndarray, codes: np.ndarray, n_labels: int, *,
    cells: np.ndarray, log_perplexity: float, tol: float, max_iter: int,
) -> np.ndarray:
    """:func:`lisi` of ``cells``, whose neighbourhoods are the rows of ``idx``."""
    n, k = idx.shape
    not_self = idx != cells[:, None]

    def entropy_and_p(beta: np.ndarray, rows: np.ndarray):
        P = np.where(not_self[rows], np.exp(-d[rows] * beta[:, None]), 0.0)
        sumP = P.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            H = np.where(sumP == 0, 0.0, np.log(sumP) + beta * (d[rows] * P).sum(axis=1) / sumP)
            P = np.where(sumP[:, None] == 0, 0.0, P / sumP[:, None])
        return H, P

    all_rows = np.arange(n)
    beta = np.ones(n)
    betamin = np.full(n, -np.inf)
    betamax = np.full(n, np.inf)
    H, P = entropy_and_p(beta, all_rows)
    Hdiff = H - log_perplexity
    active = np.abs(Hdiff) >= tol
    for _ in range(max_iter):
        if not active.any():
            break
        r = np.flatnonzero(active)
        up = Hdiff[r] > 0
        betamin[r] = np.where(up, beta[r], betamin[r])
        betamax[r] = np.where(up, betamax[r], beta[r])
        beta[r] = np.where(
            up,
            np.where(np.isinf(betamax[r]), beta[r] * 2, (beta[r] + betamax[r]) / 2),
            np.where(np.isinf(betamin[r]), beta[r] / 2, (beta[r] + betamin[r]) / 2),
        )
        H[r], P[r] = entropy_and_p(beta[r], r)
        Hdiff[r] = H[r] - log_perplexity
        active[r] = np.abs(Hdiff[r]) >= tol
    weight_per_label = _per_row_label_sums(codes[idx], n_labels, P)
    simpson = (weight_per_label**2).sum(axis=1)
    with np.errstate(divide="ignore"):
        return np.where(H == 0, np.nan, 1.0 / simpson)


def ilisi_normalized(knn_indices: np.ndarray, knn_distances: np.ndarray, batches: np.ndarray) -> float:
    """Median iLISI scaled to [0, 1]: ``(median - 1) / (n_batches - 1)`` (scib-metrics' ``ilisi_knn``)."""
    n_batches = len(pd.unique(np.asarray(batches)))
    if n_batches < 2:
        return float("nan")
    values = lisi(knn_indices, knn_distances, batches)
    return float((np.nanmedian(values) - 1.0) / (n_batches - 1))


def entropy_estimate(
    knn_indices: np.ndarray, batches: np.ndarray, *, n_cells: int,
    rows: np.ndarray | None = None, clusters: np.ndarray | None = None, seed: int = 0,
) -> Estimate:
    """:func:`entropy_per_cell` of the cells whose neighbourhoods ``knn_indices`` holds:
    exact when that is all ``n_cells`` cells, else the mean of a simple random sample
    with its 95% CI (finite-population corrected); either way with the bootstrap CI over
    those cells, or over their donors (``clusters``: each cell's donor, all cells;
    ``rows``: the cells ``knn_indices`` holds, default all in order)."""
    values = neighborhood_entropy(knn_indices, batches)
    m = len(values)
    value = float(values.mean()) if m else 0.0
    donors = None if clusters is None else [np.asarray(clusters) if rows is None else np.asarray(clusters)[rows]]
    bootstrap = bootstrap_mean([values], clusters=donors, seed=seed) if m else None
    if m >= n_cells or m < 2:
        return Estimate(value, None, m, bootstrap)
    half = Z95 * float(values.std(ddof=1)) * np.sqrt((1 - m / n_cells) / m)
    return Estimate(value, (value - half, value + half), m, bootstrap)


def ilisi_estimate(
    knn_indices: np.ndarray, knn_distances: np.ndarray, batches: np.ndarray, *,
    n_cells: int, rows: np.ndarray | None = None,
) -> Estimate:
    """:func:`ilisi_normalized` of the cells whose neighbourhoods are given (``rows``,
    default all): exact when that is all ``n_cells``, else the sample median with its
    order-statistic 95% CI, mapped to ``(median - 1) / (n_batches - 1)``."""
    n_batches = len(pd.unique(np.asarray(batches)))
    if n_batches < 2:
        return Estimate(float("nan"), None, 0)
    median = median_estimate(lisi(knn_indices, knn_distances, batches, rows=rows), n_cells)
    return median.map(lambda v: (v - 1.0) / (n_batches - 1))
