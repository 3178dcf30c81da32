"""A screen's expression matrix: scanpy's log-normalisation, mean profiles per condition,
and chunked log-normalised access (:class:`Expression`) that never copies the matrix."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp


def log_normalize(counts, target_sum: float = 1e4):
    """``log1p(counts / total * target_sum)`` per cell (scanpy's ``normalize_total`` + ``log1p``).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, sparse or dense.
    target_sum
        Total every cell is scaled to.

    Returns
    -------
    ``float64`` matrix of the same shape (CSR if the input is sparse); cells with no
    counts stay zero.
    """
    if sp.issparse(counts):
        X = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        totals = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X.data *= np.repeat(scale, np.diff(X.indptr))
        np.log1p(X.data, out=X.data)
        return X
    X = np.asarray(counts, dtype=np.float64)
    totals = X.sum(axis=1)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(X * scale[:, None])


def condition_means(
    X, conditions: np.ndarray, categories: Sequence | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean expression profile of every condition.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` expression, sparse or dense.
    conditions
        ``(n_cells,)`` condition labels.
    categories
        Conditions to return, in this order (default: sorted unique labels).

    Returns
    -------
    ``(categories, means)``: ``(n_conditions,)`` labels and ``(n_conditions, n_genes)``
    ``float64`` means (NaN rows for conditions without cells).
    """
    conditions = np.asarray(conditions).astype(str)
    cats = np.unique(conditions) if categories is None else np.asarray(categories).astype(str)
    codes = pd.Categorical(conditions, categories=cats).codes
    keep = codes >= 0
    sizes = np.bincount(codes[keep], minlength=len(cats)).astype(np.float64)
    indicator = sp.csr_matrix(
        (np.ones(keep.sum()), (codes[keep], np.flatnonzero(keep))), shape=(len(cats), len(conditions))
    )
    sums = indicator @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cats, sums / sizes[:, None]


@dataclass
class Expression:
    """The screen's expression matrix, read in row chunks, log-normalised on the fly.

    Never copies the whole matrix: row blocks are normalised as they are read
    (``log1p`` of counts per 10,000 for raw counts; as stored for log-normalised data).

    Attributes
    ----------
    X
        ``(n_cells, n_genes)`` sparse (CSR) or dense matrix, rows aligned with the embedding.
    gene_symbols
        ``(n_genes,)`` gene symbols (to find perturbed genes), or ``None``.
    kind
        ``raw_counts`` or ``log_normalized``.
    """

    X: Any
    gene_symbols: np.ndarray | None
    kind: str = "raw_counts"
    target_sum: float = 1e4
    chunk_rows: int = 4096

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    def rows(self, index: np.ndarray) -> sp.csr_matrix:
        """Log-normalised rows ``index`` as a float64 CSR matrix."""
        block = sp.csr_matrix(self.X[index])
        if self.kind == "raw_counts":
            return log_normalize(block, self.target_sum)
        return block.astype(np.float64)

    def iter_rows(self, index: np.ndarray) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """``(row indices, log-normalised block)`` over ``index`` in chunks."""
        for start in range(0, len(index), self.chunk_rows):
            chunk = index[start:start + self.chunk_rows]
            yield chunk, self.rows(chunk)

    def gene_means(self, index: np.ndarray | None = None) -> np.ndarray:
        """Mean log-normalised expression of every gene over ``index`` (default: all cells)."""
        index = np.arange(self.X.shape[0]) if index is None else index
        total = np.zeros(self.n_genes)
        for _, block in self.iter_rows(index):
            total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
        return total / max(len(index), 1)
