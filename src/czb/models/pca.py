"""PCA of an expression matrix for the PCA baselines: scanpy's exact path, or a streamed one.

:func:`sparse_pca` runs scanpy's ARPACK PCA on an in-memory matrix without densifying it;
:func:`streamed_pca` reads a large matrix (in memory or backed) in row chunks
(:mod:`czb.models.streaming_pca`), normalising and selecting genes on the way.
:func:`should_stream` decides which one a matrix gets (:data:`STREAMED_PCA_MIN_VALUES`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from czb.core.errors import EmbeddingError
from czb.models.embedding import record_warning

#: The PCA baselines stream (:mod:`czb.models.streaming_pca`) when the expression matrix
#: stores more values than this (non-zeros; every entry of a dense matrix): 100M values
#: are ~0.8 GB as float32 CSR, and scanpy's path holds several copies. At or below it
#: they run scanpy's exact path (ARPACK) on an in-memory copy.
STREAMED_PCA_MIN_VALUES = 100_000_000
#: Randomized PCA of the streamed path: test vectors beyond n_comps, and power
#: iterations (each costs two passes over the matrix; 2 * 3 + 2 = 8 passes in all).
STREAMED_PCA_OVERSAMPLES = 20
STREAMED_PCA_POWER_ITERATIONS = 3


def sparse_pca(
    x: Any, n_comps: int, *, seed: int, name: str, info: dict[str, Any], warn: bool = True
) -> np.ndarray:
    """Zero-centred PCA that never densifies a sparse ``x``.

    ``sc.pp.pca`` hands CSR input to scikit-learn's ``PCA(svd_solver="arpack")``, which
    centres implicitly through a ``LinearOperator`` (scikit-learn >= 1.4), so memory
    stays O(nnz + (n_cells + n_genes) * n_comps).

    Parameters
    ----------
    x
        Matrix of shape ``(n_cells, n_genes)``, sparse or dense.
    n_comps
        Requested number of components; capped to ``min(n_cells, n_genes) - 1`` (ARPACK
        cannot compute more), with a warning if ``warn``; ``info['n_comps']`` is the
        number computed.

    Returns
    -------
    Array of shape ``(n_cells, n_comps)``.
    """
    import scanpy as sc

    n_cells, n_genes = x.shape
    n_comps = _cap_n_comps(n_comps, n_cells, n_genes, name=name, info=info, warn=warn)
    x_pca, _, variance_ratio, _ = sc.pp.pca(
        x,
        n_comps=n_comps,
        zero_center=True,
        svd_solver="arpack",
        random_state=seed,
        return_info=True,
    )
    info["n_comps"] = n_comps
    info["explained_variance_ratio"] = float(np.sum(variance_ratio))
    info["solver"] = "arpack"
    return x_pca


def _cap_n_comps(
    n_comps: int, n_cells: int, n_genes: int, *, name: str, info: dict[str, Any], warn: bool
) -> int:
    """``n_comps`` capped to ``min(n_cells, n_genes) - 1`` (as ARPACK needs), with a
    warning if ``warn``."""
    most = min(n_cells, n_genes) - 1
    if most < 1:
        msg = f"{name}: PCA needs at least 2 cells and 2 genes, got {n_cells} × {n_genes}"
        raise EmbeddingError(msg)
    if n_comps > most:
        if warn:
            record_warning(info, f"{name}: n_comps={n_comps} capped to {most} (min(n_cells, n_genes) - 1)")
        n_comps = most
    return n_comps


def should_stream(x: Any) -> bool:
    """Whether a PCA baseline streams ``x`` rather than copying it (see STREAMED_PCA_MIN_VALUES)."""
    from czb.data.matrix import stored_values

    return stored_values(x) > STREAMED_PCA_MIN_VALUES


def _float64_block(block: Any, cols: np.ndarray | None = None) -> Any:
    """A row block as a fresh float64 CSR matrix (columns ``cols`` only when given)."""
    import scipy.sparse as sp

    if not sp.issparse(block):
        block = sp.csr_matrix(np.asarray(block))
    block = block.tocsr()
    if cols is not None:
        block = block[:, cols]
    return sp.csr_matrix(
        (block.data.astype(np.float64), block.indices, block.indptr), shape=block.shape
    )


def streamed_pca(
    x: Any,
    *,
    n_comps: int,
    seed: int,
    name: str,
    info: dict[str, Any],
    normalize: bool = False,
    n_top_genes: int | None = None,
    warn: bool = True,
) -> tuple[np.ndarray, int]:
    """PCA of ``x`` (cells × genes; in memory or a backed matrix) in passes over row chunks.

    With ``normalize``, each chunk is scaled to the median cell total and ``log1p``-ed
    as it is read (``sc.pp.normalize_total`` + ``sc.pp.log1p``); the cell totals are one
    pass. With ``n_top_genes``, one pass collects per-gene moments of the normalised
    values and of their logarithm, :func:`~czb.models.streaming_pca.highly_variable_seurat`
    selects the genes, and the PCA reads those columns only. The PCA itself is
    :func:`~czb.models.streaming_pca.randomized_pca` (implicitly centred,
    ``2 * STREAMED_PCA_POWER_ITERATIONS + 2`` passes). ``n_comps`` is capped as
    :func:`sparse_pca` caps it (a warning if ``warn``).

    Returns
    -------
    The embedding, ``(n_cells, n_comps)`` float32, and the number of genes used.
    """
    from czb.data.matrix import default_chunk_rows, iter_row_chunks, row_sums
    from czb.models.streaming_pca import ColumnMoments, highly_variable_seurat, randomized_pca

    n_cells, n_genes = x.shape
    chunk_rows = default_chunk_rows(x)
    passes = 0
    scale = None
    if normalize:
        totals = row_sums(x, chunk_rows=chunk_rows)
        passes += 1
        target = float(np.median(totals))
        scale = np.divide(target, totals, out=np.zeros_like(totals), where=totals > 0)

    def scaled(start: int, block: Any, cols: np.ndarray | None = None) -> Any:
        block = _float64_block(block, cols)
        if scale is not None:
            block.data *= np.repeat(scale[start : start + block.shape[0]], np.diff(block.indptr))
        return block

    def transformed(start: int, block: Any, cols: np.ndarray | None = None) -> Any:
        block = scaled(start, block, cols)
        if scale is not None:
            np.log1p(block.data, out=block.data)
        return block

    if n_top_genes is not None:
        # Gene moments of the log values (centering, total variance) and of the values
        # before the log (what the seurat flavor's dispersions use), in one pass.
        raw_moments, log_moments = ColumnMoments(n_genes), ColumnMoments(n_genes)
        for start, block in iter_row_chunks(x, chunk_rows=chunk_rows):
            block = scaled(start, block)
            if scale is not None:
                raw_moments.add(block)
                np.log1p(block.data, out=block.data)
                log_moments.add(block)
            else:  # log-normalised input: scanpy takes expm1 of it
                log_moments.add(block)
                block.data = np.expm1(block.data)
                raw_moments.add(block)
        passes += 1
        hvg, _ = highly_variable_seurat(raw_moments.mean, raw_moments.var, n_top_genes)
        cols = np.flatnonzero(hvg)
        if cols.size == 0:
            msg = f"{name}: no gene has a defined dispersion (is any gene detected?)"
            raise EmbeddingError(msg)
        mean, variance = log_moments.mean[cols], log_moments.var[cols]
    else:
        moments = ColumnMoments(n_genes)
        for start, block in iter_row_chunks(x, chunk_rows=chunk_rows):
            moments.add(transformed(start, block))
        passes += 1
        cols = None
        mean, variance = moments.mean, moments.var

    n_used = n_genes if cols is None else int(cols.size)
    n_comps = _cap_n_comps(n_comps, n_cells, n_used, name=name, info=info, warn=warn)

    def blocks() -> Any:
        for start, block in iter_row_chunks(x, chunk_rows=chunk_rows):
            yield start, transformed(start, block, cols)

    result = randomized_pca(
        blocks,
        n_rows=n_cells,
        n_cols=n_used,
        mean=mean,
        n_comps=n_comps,
        seed=seed,
        n_oversamples=STREAMED_PCA_OVERSAMPLES,
        n_power_iterations=STREAMED_PCA_POWER_ITERATIONS,
        total_variance=float(np.sum(variance)),
    )
    info["n_comps"] = n_comps
    info["explained_variance_ratio"] = float(np.sum(result.explained_variance_ratio))
    info["solver"] = "streamed_randomized"
    info["streaming"] = {
        "chunk_rows": chunk_rows,
        "n_passes": passes + result.n_passes,
        "n_oversamples": STREAMED_PCA_OVERSAMPLES,
        "n_power_iterations": STREAMED_PCA_POWER_ITERATIONS,
    }
    return result.scores, n_used
