"""Silhouette widths: label silhouette (bio conservation) and batch silhouette (mixing).

Exact, in tiles (:mod:`czb.evaluation.distances`): cells are sorted by label once, so
each tile of distances reduces to per-label sums with one ``add.reduceat`` pass, and
memory stays O(tile) on all cores. Above :data:`EXACT_MAX_CELLS` cells the mean is
estimated from a label-stratified sample of cells, each cell's silhouette still exact
against every cell, with a 95% confidence interval (``exact=True`` forces the full sum).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from czb.evaluation import distances
from czb.evaluation.estimates import MIN_PER_STRATUM, Estimate, stratified_mean, stratified_sample  # noqa: F401
from czb.evaluation.registry import MetricInfo, register_metric

#: Up to this many cells silhouettes are exact (10^5 cells: ~25 s on 2 cores; the
#: cost grows with n², so 2×10^5 would take ~100 s where the estimate takes ~10 s).
EXACT_MAX_CELLS = 100_000
#: Cells sampled by the estimator: its 95% CI is typically ±0.003 on the [-1, 1] scale.
SAMPLE_SIZE = 20_000

SILHOUETTE_SCORE = register_metric(
    MetricInfo(
        name="silhouette_score",
        description="Mean silhouette width of cell labels, rescaled to [0, 1] as (s + 1) / 2 "
        "(scib-metrics' silhouette_label).",
        reference="doi:10.1038/s41592-021-01336-8",
    )
)
BATCH_SILHOUETTE = register_metric(
    MetricInfo(
        name="batch_silhouette",
        description="Per cell type, 1 - |silhouette of batch labels|, averaged over cells of the "
        "type then over types (scib-metrics' silhouette_batch); 1 = batches fully mixed.",
        reference="doi:10.1038/s41592-021-01336-8",
    )
)


def _label_distance_sums(X: np.ndarray, codes: np.ndarray, n_labels: int, rows: np.ndarray,
                         *, n_jobs: int | None = None) -> np.ndarray:
    """Sum of Euclidean distances from each of ``rows`` to all cells of each label.

    Returns
    -------
    ``(len(rows), n_labels)`` float64.
    """
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    X32 = distances.as_float32(X - X.mean(axis=0))  # centring keeps float32 expansion accurate
    cells = X32[order]
    starts = np.searchsorted(sorted_codes, np.arange(n_labels))  # every label has a cell
    queries = X32[rows]
    # Where each query sits among the sorted cells: its distance to itself is set to 0
    # (the float32 expansion leaves ~sqrt(eps)·‖x‖ there, a bias on every intra sum).
    position = np.empty(len(codes), dtype=np.int64)
    position[order] = np.arange(len(codes))
    query_position = position[rows]
    cell_norms, query_norms = distances.squared_norms(cells), distances.squared_norms(queries)
    out = np.zeros((len(rows), n_labels))

    def work(block: np.ndarray) -> None:
        r0, r1 = block[0], block[-1] + 1
        acc = out[r0:r1]
        own = query_position[r0:r1]
        for tile in distances.column_tiles(len(cells)):
            d = distances.squared_distances(queries[r0:r1], cells[tile], query_norms[r0:r1], cell_norms[tile])
            inside = np.flatnonzero((own >= tile.start) & (own < tile.stop))
            d[inside, own[inside] - tile.start] = 0.0
            np.sqrt(d, out=d)
            first = np.searchsorted(starts, tile.start, side="right") - 1
            stop = np.searchsorted(starts, tile.stop, side="left")
            bounds = np.concatenate([[0], starts[first + 1 : stop] - tile.start])
            acc[:, first:stop] += np.add.reduceat(d, bounds, axis=1, dtype=np.float64)

    distances.map_row_blocks(work, np.arange(len(rows)), n_jobs=n_jobs)
    return out


def silhouette_samples(
    X: np.ndarray, labels: np.ndarray, *, rows: np.ndarray | None = None, n_jobs: int | None = None
) -> np.ndarray:
    """Silhouette coefficient of cells (Euclidean), as scikit-learn defines it.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` labels of any hashable type.
    rows
        Cells to score (each against all cells); default all.
    n_jobs
        Worker threads (default: all cores).

    Returns
    -------
    ``(len(rows),)`` values in [-1, 1]; cells alone in their label get 0.

    References
    ----------
    Rousseeuw (1987), doi:10.1016/0377-0427(87)90125-7.
    """
    X = np.asarray(X, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(labels))
    n_labels = len(uniques)
    rows = np.arange(len(codes)) if rows is None else np.asarray(rows)
    counts = np.bincount(codes, minlength=n_labels).astype(np.float64)
    sums = _label_distance_sums(X, codes, n_labels, rows, n_jobs=n_jobs)
    own = codes[rows]
    at = np.arange(len(rows))
    intra = sums[at, own]
    if n_labels > 1:
        means = sums / counts
        means[at, own] = np.inf
        inter = means.min(axis=1)
    else:
        inter = np.full(len(rows), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        intra /= counts[own] - 1
        s = (inter - intra) / np.maximum(intra, inter)
    return np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def _use_exact(n_cells: int, exact: bool | None) -> bool:
    return n_cells <= EXACT_MAX_CELLS if exact is None else exact


def silhouette_label(
    X: np.ndarray,
    labels: np.ndarray,
    *,
    rescale: bool = True,
    exact: bool | None = None,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    n_jobs: int | None = None,
) -> Estimate:
    """Mean silhouette of ``labels``, rescaled to [0, 1] by (s + 1) / 2 unless ``rescale=False``.

    Exact up to :data:`EXACT_MAX_CELLS` cells (or when ``exact``); above, estimated from
    ``sample_size`` cells stratified by label (proportional allocation), each scored
    exactly against all cells.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` labels.
    """
    codes, _ = pd.factorize(np.asarray(labels))
    n = len(codes)
    if _use_exact(n, exact):
        result = Estimate(float(np.mean(silhouette_samples(X, codes, n_jobs=n_jobs))), None, n)
    else:
        picked = stratified_sample(codes, sample_size, seed=seed)
        s = silhouette_samples(X, codes, rows=np.concatenate(picked), n_jobs=n_jobs)
        bounds = np.cumsum([len(p) for p in picked])[:-1]
        totals = np.bincount(codes).astype(np.float64)
        result = stratified_mean(np.split(s, bounds), totals, totals / n)
    return result.map(lambda s: (s + 1.0) / 2.0) if rescale else result


def silhouette_batch(
    X: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    *,
    exact: bool | None = None,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    n_jobs: int | None = None,
) -> Estimate:
    """Batch silhouette within each label (scIB's definition, scib-metrics' defaults).

    For every label with at least two batches (and not one batch per cell), the
    silhouette of batch labels is computed among the cells of that label; each cell
    scores ``1 - |s|``; cell scores are averaged per label, then over labels. Above
    :data:`EXACT_MAX_CELLS` cells (unless ``exact``), each label's mean is estimated from
    a random sample of its cells (``sample_size`` in all, proportional to label size, at
    least :data:`MIN_PER_STRATUM` per label).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels, batches
        ``(n_cells,)`` cell-type and batch labels.
    """
    X = np.asarray(X)
    codes, _ = pd.factorize(np.asarray(labels))
    batches = np.asarray(batches)
    use_exact = _use_exact(len(codes), exact)
    picked = None if use_exact else stratified_sample(codes, sample_size, seed=seed)
    scores, totals = [], []
    for code in range(int(codes.max()) + 1 if len(codes) else 0):
        members = np.flatnonzero(codes == code)
        n_batches = len(pd.unique(batches[members]))
        if n_batches == 1 or n_batches == len(members):
            continue
        rows = None if use_exact else np.searchsorted(members, picked[code])
        s = silhouette_samples(X[members], batches[members], rows=rows, n_jobs=n_jobs)
        scores.append(1.0 - np.abs(s))
        totals.append(len(members))
    if not scores:
        return Estimate(float("nan"), None, 0)
    if use_exact:
        return Estimate(float(np.mean([v.mean() for v in scores])), None, int(sum(totals)))
    return stratified_mean(scores, np.asarray(totals, dtype=np.float64), np.full(len(scores), 1 / len(scores)))
