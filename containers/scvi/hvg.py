"""Batch-aware highly variable genes, the way scIB picks the genes scVI trains on.

scIB (Luecken et al. 2022, ``scib.preprocessing.hvg_batch``) selects 2,000 genes with
scanpy's ``highly_variable_genes(flavor="cell_ranger", n_bins=20, batch_key=...)`` on
log-normalised data: within each batch, genes expressed there are binned by mean (bin
edges at the 10th, 15th, ..., 100th percentile of the means), and a gene's dispersion
(variance over mean) is standardised within its bin by the median and the normal-scaled
median absolute deviation; the batch's top genes by standardised dispersion are its
highly variable genes. Genes are then ranked by the number of batches that call them
highly variable, ties broken by the mean standardised dispersion over batches (a batch
where the gene is not expressed counts as 0), and the first ``n_top_genes`` are kept.

Written here with numpy and scipy only (the image has no scanpy); the host's tests check
it selects the same genes as scanpy. Normalisation is to the median total count of the
cells, then ``log1p`` (scanpy's ``normalize_total`` default on sparse data; scIB's scran
size factors, which the image cannot run, also keep counts at a typical cell's scale).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp

#: Percentiles of the gene means that bound the mean-expression bins (cell_ranger flavor).
BIN_PERCENTILES = np.arange(10, 105, 5)
#: A normal's third quartile: MAD / this estimates the standard deviation.
NORMAL_Q3 = 0.6744897501960817
#: Cells normalised at a time, bounding the float64 copy.
CHUNK_CELLS = 20_000


def select_genes(counts, batches, n_top_genes: int) -> np.ndarray:
    """Column indices (ascending) of the ``n_top_genes`` genes scVI trains on.

    Parameters
    ----------
    counts
        Cells × genes raw counts (sparse or dense).
    batches
        One batch label per cell.
    n_top_genes
        Genes to keep; 0, or at least the number of genes, keeps every gene.
    """
    counts = sp.csr_matrix(counts)
    n_genes = counts.shape[1]
    if n_top_genes <= 0 or n_top_genes >= n_genes:
        return np.arange(n_genes)
    _, codes = np.unique(np.asarray(batches).astype(str), return_inverse=True)
    sums, squares, expressed, sizes = batch_moments(counts, codes)
    n_hvg = np.zeros(n_genes, dtype=np.int64)
    # An unexpressed gene scores 0 in its batch, as scanpy fills it.
    norms = np.zeros((len(sizes), n_genes))
    for b, n in enumerate(sizes):
        genes = expressed[b] > 0
        if not genes.any():
            continue
        mean = sums[b, genes] / n
        with np.errstate(divide="ignore", invalid="ignore"):
            var = (squares[b, genes] / n - mean**2) * (n / (n - 1))
            dispersion = var / mean
        norm = standardised_dispersion(mean, dispersion)
        n_hvg[np.flatnonzero(genes)[top(norm, n_top_genes)]] += 1
        norms[b, genes] = norm
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # a gene NaN in every batch
        score = np.nanmean(norms, axis=0)
    score = np.where(np.isnan(score), -np.inf, score)
    # Most batches first, then highest score; np.lexsort sorts by its last key first.
    order = np.lexsort((-score, -n_hvg))
    return np.sort(order[:n_top_genes])


def batch_moments(counts: sp.csr_matrix, codes: np.ndarray):
    """Per batch: sums and sums of squares of log-normalised values, cells expressing
    each gene, and cell counts."""
    n_cells, n_genes = counts.shape
    n_batches = int(codes.max()) + 1 if len(codes) else 0
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    # scanpy's normalize_total on sparse data: the median over all cells.
    target = float(np.median(totals)) if n_cells else 1.0
    if target <= 0:  # most cells empty: scale to the cells with counts instead
        positive = totals[totals > 0]
        target = float(np.median(positive)) if positive.size else 1.0
    scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)
    sums = np.zeros((n_batches, n_genes))
    squares = np.zeros((n_batches, n_genes))
    expressed = np.zeros((n_batches, n_genes))
    for start in range(0, n_cells, CHUNK_CELLS):
        stop = min(start + CHUNK_CELLS, n_cells)
        chunk = counts[start:stop].astype(np.float64)
        chunk = sp.diags(scale[start:stop]) @ chunk
        chunk.data = np.log1p(chunk.data)
        member = sp.csr_matrix(
            (np.ones(stop - start), (codes[start:stop], np.arange(stop - start))),
            shape=(n_batches, stop - start),
        )
        sums += (member @ chunk).toarray()
        squares += (member @ chunk.power(2)).toarray()
        expressed += (member @ (chunk > 0).astype(np.float64)).toarray()
    sizes = np.bincount(codes, minlength=n_batches).astype(np.float64)
    return sums, squares, expressed, sizes


def standardised_dispersion(mean: np.ndarray, dispersion: np.ndarray) -> np.ndarray:
    """Each gene's dispersion minus its mean bin's median, over the bin's scaled MAD."""
    edges = np.r_[-np.inf, np.percentile(mean, BIN_PERCENTILES), np.inf]
    # Bins are closed on the right, as pandas.cut makes them.
    bins = np.searchsorted(edges, mean, side="left")
    norm = np.full(mean.shape, np.nan)
    for b in np.unique(bins):
        members = bins == b
        values = dispersion[members]
        finite = values[~np.isnan(values)]
        if finite.size == 0:
            continue
        centre = np.median(finite)
        spread = np.median(np.abs(finite - centre)) / NORMAL_Q3
        with np.errstate(divide="ignore", invalid="ignore"):
            norm[members] = (values - centre) / spread
    return norm


def top(norm: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` highest standardised dispersions (ties at the cut all kept,
    NaN never)."""
    finite = norm[~np.isnan(norm)]
    if finite.size == 0:
        return np.zeros(0, dtype=np.int64)
    cut = np.sort(finite)[::-1][min(n, finite.size) - 1]
    return np.flatnonzero(norm >= cut)
