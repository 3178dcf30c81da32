"""Metrics of level 6 of the perturbation-analysis hierarchy (Bendidi et al. 2024,
arXiv:2410.13956): per-gene Spearman correlation of decoded and true expression (never
densifying sparse truth) and the structural integrity of the perturbation effects.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from czb.evaluation.distances import map_row_blocks
from czb.evaluation.registry import MetricInfo, register_metric

_PAPER = "arXiv:2410.13956"

RECONSTRUCTION_SPEARMAN = register_metric(MetricInfo(
    name="reconstruction_spearman",
    description="Mean over genes of the Spearman correlation across test2 cells (held-out batches and "
    "perturbations, controls included) between log-normalised expression and a ridge decoder's "
    "prediction from the embedding, trained on train; genes constant in test2 are left out.",
    reference=_PAPER, range=(-1.0, 1.0),
))
STRUCTURAL_INTEGRITY = register_metric(MetricInfo(
    name="structural_integrity",
    description="1 - mean_b ||P_b - T_b||_F / n_b / (2 mean_b ||T_b||_F / n_b) over test2 batches b, "
    "with predicted (P) and true (T) expression each centred on the batch's own controls; 1 = the "
    "perturbation effects are reconstructed exactly, 0.5 = predicting no effect.",
    reference=_PAPER, range=(None, 1.0),
))


def _column_ranks(A: np.ndarray, *, n_jobs: int | None = None, block: int = 32) -> np.ndarray:
    """Average ranks of each column (ties share their mean rank, 1-based), as
    ``scipy.stats.rankdata(A, axis=0)``; columns sorted in parallel threads."""
    A = np.asarray(A, dtype=np.float64)
    n, n_cols = A.shape
    out = np.empty((n, n_cols))
    if n == 0:
        return out

    def ranks(block_cols: np.ndarray) -> None:
        cols = slice(block_cols[0], block_cols[-1] + 1)
        B = np.ascontiguousarray(A[:, cols].T)  # one column per row: contiguous sorts
        order = np.argsort(B, axis=1)
        v = np.take_along_axis(B, order, axis=1)
        first = np.ones(v.shape, dtype=bool)
        first[:, 1:] = v[:, 1:] != v[:, :-1]
        last = np.ones(v.shape, dtype=bool)
        last[:, :-1] = first[:, 1:]
        pos = np.arange(n)
        start_pos = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
        end_pos = np.minimum.accumulate(np.where(last, pos, n)[:, ::-1], axis=1)[:, ::-1]
        R = np.empty(v.shape)
        np.put_along_axis(R, order, (start_pos + end_pos) / 2.0 + 1.0, axis=1)
        out[:, cols] = R.T

    map_row_blocks(ranks, np.arange(n_cols), n_jobs=n_jobs, block=block)
    return out


def per_gene_spearman(pred: np.ndarray, truth) -> np.ndarray:
    """Spearman correlation of each column of ``pred`` with the same column of ``truth``.

    Parameters
    ----------
    pred
        ``(n, n_genes)`` dense predictions.
    truth
        ``(n, n_genes)`` dense, or sparse: then its ranks are computed from the stored
        entries (:func:`sparse_column_ranks`) and it is never densified.

    Returns
    -------
    ``(n_genes,)``; NaN where either column is constant (no ranking to compare).
    """
    if sp.issparse(truth):
        return _spearman_sparse_truth(pred, truth)
    rp = _column_ranks(pred)
    rt = _column_ranks(truth)
    rp -= rp.mean(axis=0)
    rt -= rt.mean(axis=0)
    num = (rp * rt).sum(axis=0)
    den = np.sqrt((rp * rp).sum(axis=0) * (rt * rt).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def sparse_column_ranks(T) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """Per-column average ranks (``scipy.stats.rankdata``, 1-based) of a sparse matrix
    whose unstored entries are zeros, from one sort of the stored values.

    Returns
    -------
    T
        The matrix as CSC without stored zeros.
    ranks
        ``(nnz,)`` rank of each stored entry, aligned with ``T.data``.
    zero_rank
        ``(n_genes,)`` the rank every zero of the column shares.
    """
    T = sp.csc_matrix(T, dtype=np.float64, copy=True)
    T.eliminate_zeros()
    n, n_cols = T.shape
    stored = np.diff(T.indptr)
    col = np.repeat(np.arange(n_cols), stored)
    order = np.lexsort((T.data, col))
    v, c = T.data[order], col[order]
    pos = np.arange(len(v)) - T.indptr[c]  # 0-based place among the column's stored values
    starts = np.ones(len(v), dtype=bool)
    starts[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
    group = np.cumsum(starts) - 1
    first = pos[starts]
    last = np.append(pos[np.flatnonzero(starts)[1:] - 1], pos[-1:]) if len(v) else first
    rank = (first + last)[group] / 2.0 + 1.0
    zeros = n - stored
    negative = np.bincount(c[v < 0], minlength=n_cols)
    rank = np.where(v > 0, rank + zeros[c], rank)  # zeros rank between negatives and positives
    ranks = np.empty(len(v))
    ranks[order] = rank
    return T, ranks, negative + (zeros + 1) / 2.0


def _spearman_sparse_truth(pred: np.ndarray, truth) -> np.ndarray:
    """:func:`per_gene_spearman` with sparse ``truth``: Pearson of the rank columns,
    using that every zero of a truth column shares one rank."""
    n = pred.shape[0]
    T, ranks, zero_rank = sparse_column_ranks(truth)
    rp = _column_ranks(pred)
    mean = (n + 1) / 2.0  # average ranks always sum to n (n + 1) / 2
    stored = np.diff(T.indptr)
    col = np.repeat(np.arange(T.shape[1]), stored)
    cross = zero_rank * rp.sum(axis=0) + np.bincount(
        col, weights=rp[T.indices, col] * (ranks - zero_rank[col]), minlength=T.shape[1])
    cov = cross - n * mean * mean
    var_t = (n - stored) * zero_rank**2 + np.bincount(col, weights=ranks**2, minlength=T.shape[1]) - n * mean**2
    var_p = np.einsum("ij,ij->j", rp, rp) - n * mean**2
    den = np.sqrt(np.maximum(var_p, 0.0) * np.maximum(var_t, 0.0))
    # Rank variances are integers/4 or more: below 0.1 they are zero up to rounding.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((var_p > 0.1) & (var_t > 0.1), cov / den, np.nan)


def centred_distance_terms(P: np.ndarray, T, rows: np.ndarray, controls: np.ndarray) -> tuple[float, float]:
    """``||P~ - T~||_F^2`` and ``||T~||_F^2`` over ``rows``, with ``P~``, ``T~`` the rows
    of ``P`` (dense) and ``T`` (dense or sparse CSR, never densified) minus the mean of
    their ``controls`` rows (structural integrity's per-batch terms)."""
    Pc = P[rows] - P[controls].mean(axis=0)
    if not sp.issparse(T):
        Tc = T[rows] - T[controls].mean(axis=0)
        return float(np.sum((Pc - Tc) ** 2)), float(np.sum(Tc**2))
    T = sp.csr_matrix(T)
    mu = np.asarray(T[controls].mean(axis=0)).ravel()
    Tr = T[rows].tocoo()
    col_sum = np.asarray(Tr.sum(axis=0)).ravel()
    # <Pc, Tr - 1 mu'> and ||Tr - 1 mu'||^2 from the stored entries and column sums.
    inner = float(np.dot(Pc[Tr.row, Tr.col], Tr.data) - mu @ Pc.sum(axis=0))
    truth_sq = float(np.dot(Tr.data, Tr.data) - 2.0 * mu @ col_sum + len(rows) * mu @ mu)
    return float(np.sum(Pc * Pc)) - 2.0 * inner + truth_sq, truth_sq


def structural_integrity(distance_per_batch: np.ndarray, truth_norm_per_batch: np.ndarray) -> float:
    """``1 - mean_b(d_b) / (2 mean_b(m_b))`` from per-batch ``d_b = ||P~ - T~||_F / n_b`` and
    ``m_b = ||T~||_F / n_b``."""
    d = np.asarray(distance_per_batch, dtype=np.float64)
    m = np.asarray(truth_norm_per_batch, dtype=np.float64)
    if len(d) == 0 or m.mean() == 0:
        return float("nan")
    return float(1.0 - d.mean() / (2.0 * m.mean()))
