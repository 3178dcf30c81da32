"""Silhouette widths: label silhouette (bio conservation) and batch silhouette (mixing).

Exact, in tiles (:mod:`czb.evaluation.distances`): cells are sorted by label once, so
each tile of distances reduces to per-label sums with one ``add.reduceat`` pass, and
memory stays O(tile) on all cores. Above :data:`EXACT_MAX_CELLS` cells the mean is
estimated from sampled cells, each cell's silhouette still exact against every cell,
with a 95% confidence interval (``exact=True`` forces the full sum); the same pass can
find the sampled cells' exact neighbourhoods (:func:`scan_sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from czb.core.sampling import stratified_sample
from czb.evaluation import distances
from czb.evaluation.estimates import (
    SAMPLE_SIZE,
    Estimate,
    bootstrap_mean,
    mean_estimate,
    sample_cells,
    stratified_mean,
)
from czb.evaluation.neighbors import NearestSoFar, exact_sorted
from czb.evaluation.registry import MetricInfo, register_metric

#: Up to this many cells silhouettes are exact (10^5 cells: ~25 s on 2 cores; the
#: cost grows with n², so 2×10^5 would take ~100 s where the estimate takes ~10 s).
EXACT_MAX_CELLS = 100_000

SILHOUETTE_SCORE = register_metric(
    MetricInfo(
        name="silhouette_score",
        description="Mean silhouette width of cell labels, rescaled to [0, 1] as (s + 1) / 2 "
        "(scib-metrics' silhouette_label).",
        reference="doi:10.1038/s41592-021-01336-8",
        per_cell_mean=True,
    )
)
BATCH_SILHOUETTE = register_metric(
    MetricInfo(
        name="batch_silhouette",
        description="Per cell type, 1 - |silhouette of batch labels|, averaged over cells of the "
        "type then over types (scib-metrics' silhouette_batch); 1 = batches fully mixed.",
        reference="doi:10.1038/s41592-021-01336-8",
        per_cell_mean=True,
    )
)


def _scan(
    X: np.ndarray, codes: np.ndarray, n_labels: int, rows: np.ndarray, *,
    sums: bool = True, k: int = 0, n_jobs: int | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One tiled pass over the distances from ``rows`` to every cell.

    Cells are sorted by label, so each tile reduces to per-label distance sums with one
    ``add.reduceat``; the same tiles can feed a nearest-neighbour search, so sampled
    cells get their silhouettes and their exact neighbourhoods from one GEMM per tile.
    Queries are taken in label order and each row block starts at its own label's
    tile, where most of its neighbours are, so later tiles are pruned early.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` float64 embedding.
    codes
        ``(n_cells,)`` label codes ``0..n_labels-1``, every code present.
    rows
        Cells to scan from (distinct).
    sums
        Compute the per-label distance sums.
    k
        Also find each row's ``k`` nearest cells (0: no search).

    Returns
    -------
    sums
        ``(len(rows), n_labels)`` float64 sums of Euclidean distances to each label's
        cells, or ``None``.
    nearest
        ``(len(rows), k)`` int64 cell indices, unordered, each row's own cell among
        them, or ``None``.
    """
    n = len(codes)
    order = np.argsort(codes, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    by_label = np.argsort(position[rows], kind="stable")  # queries in the cells' order
    query_position = position[rows[by_label]]
    centred = X - X.mean(axis=0)  # centring keeps the float32 expansion accurate
    queries, cells = distances.distance_operands(centred[rows[by_label]], centred[order])
    del centred
    starts = np.searchsorted(codes[order], np.arange(n_labels))
    tiles = list(distances.column_tiles(n))
    tile_starts = np.array([t.start for t in tiles])
    label_sums = np.zeros((len(rows), n_labels)) if sums else None
    nearest = np.empty((len(rows), k), dtype=np.int64) if k else None

    def work(block: np.ndarray) -> None:
        r0, r1 = block[0], block[-1] + 1
        own = query_position[r0:r1]
        first = int(np.searchsorted(tile_starts, starts[codes[order[own[0]]]], side="right")) - 1
        search = NearestSoFar(r1 - r0, k) if k else None
        for tile in tiles[first:] + tiles[:first]:
            d = queries[r0:r1] @ cells[tile].T  # squared distances
            np.maximum(d, 0.0, out=d)
            inside = np.flatnonzero((own >= tile.start) & (own < tile.stop))
            at = own[inside] - tile.start
            if search is not None:
                d[inside, at] = -1.0  # the cell itself first, even among duplicates
                search.offer(d, order[tile])
            if not sums:
                continue
            # The float32 expansion leaves ~sqrt(eps)·‖x‖ at a cell's distance to itself.
            d[inside, at] = 0.0
            np.sqrt(d, out=d)
            lo = np.searchsorted(starts, tile.start, side="right") - 1
            hi = np.searchsorted(starts, tile.stop, side="left")
            bounds = np.concatenate([[0], starts[lo + 1 : hi] - tile.start])
            # Pairwise float32 sums within a tile (error ~1e-7, below the float32
            # distances' own), float64 across tiles; 4x faster than summing in float64.
            label_sums[r0:r1, lo:hi] += np.add.reduceat(d, bounds, axis=1)
        if search is not None:
            nearest[r0:r1] = search.indices

    distances.map_row_blocks(work, np.arange(len(rows)), n_jobs=n_jobs)
    back = np.argsort(by_label)  # to the caller's row order
    return (None if label_sums is None else label_sums[back]), (None if nearest is None else nearest[back])


def _silhouettes(sums: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Silhouette coefficients of ``rows`` from their per-label distance sums."""
    n_labels = sums.shape[1]
    counts = np.bincount(codes, minlength=n_labels).astype(np.float64)
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
    rows = np.arange(len(codes)) if rows is None else np.asarray(rows)
    sums, _ = _scan(X, codes, len(uniques), rows, n_jobs=n_jobs)
    return _silhouettes(sums, codes, rows)


def is_exact(n_cells: int, exact: bool | None) -> bool:
    """Whether silhouettes of ``n_cells`` cells are computed exactly (``exact`` overrides the size rule)."""
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
    clusters: np.ndarray | None = None,
) -> Estimate:
    """Mean silhouette of ``labels``, rescaled to [0, 1] by (s + 1) / 2 unless ``rescale=False``.

    Exact up to :data:`EXACT_MAX_CELLS` cells (or when ``exact``); above, estimated from
    a random sample of ``sample_size`` cells topped up to at least
    :data:`~czb.core.sampling.MIN_PER_STRATUM` per label (:func:`scan_sample`), each
    scored exactly against all cells, as a label-stratified mean with its 95% CI.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` labels.
    clusters
        ``(n_cells,)`` donor of each cell: the bootstrap CI is over donors, not cells.
    """
    codes, _ = pd.factorize(np.asarray(labels))
    if is_exact(len(codes), exact):
        result = mean_estimate(silhouette_samples(X, codes, n_jobs=n_jobs), clusters=clusters, seed=seed)
    else:
        result = scan_sample(X, codes, silhouette=True, sample_size=sample_size, seed=seed, n_jobs=n_jobs,
                             clusters=clusters).silhouette
    return result.map(lambda s: (s + 1.0) / 2.0) if rescale else result


@dataclass(frozen=True)
class SampledCells:
    """A sample of cells (:func:`~czb.evaluation.estimates.sample_cells`) scanned
    against every cell by :func:`scan_sample`.

    Attributes
    ----------
    rows
        ``(m,)`` the simple random part of the sample, sorted.
    silhouette
        Label silhouette on the [-1, 1] scale, estimated from the whole sample
        (stratified by label), or ``None`` if not computed.
    indices, distances
        ``(m, k)`` exact neighbours of ``rows`` (each cell first) and their float64
        distances, nearest first, or ``None`` if not searched.
    """

    rows: np.ndarray
    silhouette: Estimate | None = None
    indices: np.ndarray | None = None
    distances: np.ndarray | None = None

    @property
    def k(self) -> int:
        return 0 if self.indices is None else self.indices.shape[1]


def scan_sample(
    X: np.ndarray,
    labels: np.ndarray | None,
    *,
    silhouette: bool = True,
    k: int = 0,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    n_jobs: int | None = None,
    clusters: np.ndarray | None = None,
) -> SampledCells:
    """Silhouettes and exact ``k``-neighbourhoods of sampled cells, from one pass of
    distances (each sampled cell against every cell).

    The sample is a simple random one topped up to at least
    :data:`~czb.core.sampling.MIN_PER_STRATUM` cells per label; the label
    silhouette is its label-stratified mean (95% CI), the neighbourhoods are those of
    the simple random part (for entropy and iLISI). Both come out the same whether or
    not the other is computed.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` labels (``None``: one label; then no silhouette).
    silhouette
        Estimate the label silhouette.
    k
        Neighbours per sampled cell, itself included (0: none).
    clusters
        ``(n_cells,)`` donor of each cell: the silhouette's bootstrap CI is over donors.
    """
    X = np.asarray(X, dtype=np.float64)
    n = len(X)
    codes, uniques = pd.factorize(np.asarray(labels)) if labels is not None else (np.zeros(n, dtype=np.int64), [0])
    uniform, extra = sample_cells(codes, sample_size, seed=seed)
    rows = np.concatenate([uniform, extra])
    silhouette = silhouette and labels is not None
    k = min(k, n)
    sums, nearest = _scan(X, codes, len(uniques), rows, sums=silhouette, k=k, n_jobs=n_jobs)
    estimate = indices = dist = None
    if silhouette:
        s = _silhouettes(sums, codes, rows)
        strata = codes[rows]
        totals = np.bincount(codes).astype(np.float64)
        by_stratum = [strata == h for h in range(len(totals))]
        donors = None if clusters is None else [np.asarray(clusters)[rows][at] for at in by_stratum]
        estimate = stratified_mean([s[at] for at in by_stratum], totals, totals / n, clusters=donors, seed=seed)
    if k:
        indices, dist = exact_sorted(X, X[uniform], nearest[: len(uniform)], own=uniform)
    return SampledCells(uniform, estimate, indices, dist)


def silhouette_batch(
    X: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray,
    *,
    exact: bool | None = None,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    n_jobs: int | None = None,
    clusters: np.ndarray | None = None,
) -> Estimate:
    """Batch silhouette within each label (scIB's definition, scib-metrics' defaults).

    For every label with at least two batches (and not one batch per cell), the
    silhouette of batch labels is computed among the cells of that label; each cell
    scores ``1 - |s|``; cell scores are averaged per label, then over labels. Above
    :data:`EXACT_MAX_CELLS` cells (unless ``exact``), each label's mean is estimated from
    a random sample of its cells (``sample_size`` in all, proportional to label size, at
    least :data:`~czb.core.sampling.MIN_PER_STRATUM` per label).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels, batches
        ``(n_cells,)`` cell-type and batch labels.
    clusters
        ``(n_cells,)`` donor of each cell: the bootstrap CI is over donors, not cells.

    Returns
    -------
    The estimate, with the bootstrap CI of its cells' scores (resampled within labels).
    """
    X = np.asarray(X)
    codes, _ = pd.factorize(np.asarray(labels))
    batches = np.asarray(batches)
    use_exact = is_exact(len(codes), exact)
    picked = None if use_exact else stratified_sample(codes, sample_size, seed=seed)
    scores, totals, donors = [], [], []
    for code in range(int(codes.max()) + 1 if len(codes) else 0):
        members = np.flatnonzero(codes == code)
        n_batches = len(pd.unique(batches[members]))
        if n_batches == 1 or n_batches == len(members):
            continue
        rows = None if use_exact else np.searchsorted(members, picked[code])
        s = silhouette_samples(X[members], batches[members], rows=rows, n_jobs=n_jobs)
        scores.append(1.0 - np.abs(s))
        totals.append(len(members))
        if clusters is not None:
            donors.append(np.asarray(clusters)[members if rows is None else members[rows]])
    if not scores:
        return Estimate(float("nan"), None, 0)
    weights = np.full(len(scores), 1 / len(scores))
    if use_exact:
        bootstrap = bootstrap_mean(scores, weights, clusters=donors if clusters is not None else None, seed=seed)
        return Estimate(float(np.mean([v.mean() for v in scores])), None, int(sum(totals)), bootstrap)
    return stratified_mean(scores, np.asarray(totals, dtype=np.float64), weights,
                           clusters=donors if clusters is not None else None, seed=seed)
