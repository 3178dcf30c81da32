"""Cell embeddings: where they come from, and the checks every one of them goes through.

An :class:`EmbeddingSource` turns a :class:`~czb.runner.datasets.Dataset` into an
:class:`Embedding`. Three kinds of source exist or are planned:

``in-process``
    Baselines computed here (:data:`BASELINES`: ``pca``, ``pca_raw``, ``random``),
    built from a model spec with :func:`source_for_model`.
``file``
    Embeddings computed elsewhere and brought as a ``.npy``, ``.npz``, ``.parquet`` or
    ``.h5ad`` file, read by :func:`source_for_file` and aligned to the dataset by cell ID.
``docker``
    Foundation models run in their own image under the container contract
    (:mod:`czb.runner.containers`).

Every source passes its values through :func:`check_embedding`, so all embeddings that
reach the tasks are 2-D, finite, float32 and C-contiguous.
"""

from __future__ import annotations

import hashlib
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from czb.errors import EmbeddingError, EmbeddingWarning, SpecError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from czb.runner.datasets import Dataset
    from czb.runner.specs import ModelSpec

#: File suffixes :func:`source_for_file` reads.
FILE_FORMATS = (".npy", ".npz", ".parquet", ".h5ad")
#: Names of the array (``.npz``) or column (``.parquet``) that may hold cell IDs.
CELL_ID_NAMES = ("cell_ids", "cell_id", "obs_names")

# How many offending rows / IDs an error message shows.
_SHOW = 5
# Rows per block when scanning values for NaN/inf, so the scan needs little extra memory.
_BLOCK_ROWS = 65_536

#: An embedding in which more than this share of the rows repeat an earlier row is
#: refused: identical rows tie in every neighbour search, so their neighbours (and the
#: clusters built on them) follow row order, which often follows the labels.
MAX_DUPLICATE_ROW_SHARE = 0.1
#: Above this share of repeated rows (and up to the maximum) czb warns.
WARN_DUPLICATE_ROW_SHARE = 0.01
#: Total variance (sum of the per-dimension variances) below which the rows are one
#: point: 10^12 times above where float32 squared distances underflow.
MIN_TOTAL_VARIANCE = 1e-12
#: Spread (root total variance) below this fraction of the rows' RMS norm: the
#: differences between rows are within ~100 float32 rounding steps of their values.
MIN_RELATIVE_SPREAD = 1e-5
#: Largest squared distance the float32 neighbour and silhouette kernels may meet
#: (``4 · dim · max|x|²`` bounds it): a million times below float32's 3.4e38, so norms,
#: GEMM partial sums and their differences neither overflow nor lose the distances.
MAX_SQUARED_DISTANCE = 1e32

#: The PCA baselines stream (:mod:`czb.runner.streaming_pca`) when the expression matrix
#: stores more values than this (non-zeros; every entry of a dense matrix): 100M values
#: are ~0.8 GB as float32 CSR, and scanpy's path holds several copies. At or below it
#: they run scanpy's exact path (ARPACK) on an in-memory copy.
STREAMED_PCA_MIN_VALUES = 100_000_000
#: Randomized PCA of the streamed path: test vectors beyond n_comps, and power
#: iterations (each costs two passes over the matrix; 2 * 3 + 2 = 8 passes in all).
STREAMED_PCA_OVERSAMPLES = 20
STREAMED_PCA_POWER_ITERATIONS = 3


@dataclass
class Embedding:
    """Cell embeddings of one dataset by one model.

    Attributes
    ----------
    values
        Array of shape ``(n_kept_cells, dim)``; float32, C-contiguous, finite.
    model
        Name of the model or source, e.g. ``"pca"`` or ``"file:emb.npy"``.
    kind
        ``"in-process"``, ``"file"`` or ``"docker"``.
    cell_index
        Integer array of shape ``(n_kept_cells,)``: the dataset cells that the rows of
        ``values`` belong to, strictly increasing (dataset order). ``None`` means every
        cell of the dataset, in dataset order.
    info
        Provenance: parameters, ``n_dropped_cells``, file path and sha256, warnings...
    """

    values: np.ndarray
    model: str
    kind: str
    cell_index: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Cheap structural checks only; check_embedding() does the full scan.
        v = self.values
        if not isinstance(v, np.ndarray) or v.ndim != 2 or v.dtype != np.float32:
            msg = f"{self.model}: Embedding.values must be a 2-D float32 array; see check_embedding"
            raise EmbeddingError(msg)
        if self.cell_index is not None:
            idx = np.asarray(self.cell_index)
            if idx.ndim != 1 or idx.dtype.kind not in "iu" or len(idx) != len(v):
                msg = (
                    f"{self.model}: cell_index must be a 1-D integer array with one entry "
                    f"per row of values ({len(v)})"
                )
                raise EmbeddingError(msg)
            if len(idx) and (idx[0] < 0 or np.any(np.diff(idx) <= 0)):
                msg = f"{self.model}: cell_index must be non-negative and strictly increasing"
                raise EmbeddingError(msg)
            self.cell_index = idx

    @property
    def n_cells(self) -> int:
        """Number of embedded cells (rows of ``values``)."""
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        """Number of dimensions (columns of ``values``)."""
        return self.values.shape[1]

    def take(self, per_cell: np.ndarray) -> np.ndarray:
        """Select the entries of a per-dataset-cell array that match the rows of ``values``.

        Parameters
        ----------
        per_cell
            Array of shape ``(n_cells_in_dataset, ...)``, e.g. ``dataset.labels``.

        Returns
        -------
        Array of shape ``(n_kept_cells, ...)``, aligned with ``values``.
        """
        return per_cell if self.cell_index is None else per_cell[self.cell_index]


@runtime_checkable
class EmbeddingSource(Protocol):
    """Anything that turns a dataset into an :class:`Embedding`."""

    name: str
    kind: str

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed the cells of ``dataset``."""
        ...

    def describe(self) -> dict[str, Any]:
        """The ``model`` section of a result file: name, kind, image, parameters."""
        ...


# --------------------------------------------------------------------------- checks


def check_embedding(
    values: Any,
    *,
    name: str,
    row_names: Sequence[str] | np.ndarray | None = None,
) -> np.ndarray:
    """Check an embedding matrix and return it as float32, C-contiguous.

    Every source (in-process, file, docker) passes its output through here.

    Parameters
    ----------
    values
        Array-like of shape ``(n_cells, dim)`` with a numeric dtype.
    name
        What the values came from (a model name or file path); starts every error message.
    row_names
        Cell IDs of the rows, used to name offending rows in messages (row numbers otherwise).

    Returns
    -------
    Array of shape ``(n_cells, dim)``, dtype float32, C-contiguous (``values`` itself when
    it already is one).

    Raises
    ------
    EmbeddingError
        When ``values`` is not 2-D, has no rows or columns, is not numeric, or holds NaN or
        infinite values (also after conversion to float32); or when it is degenerate
        (:func:`_check_spread`): fewer than 2 rows, values so large that float32
        squared distances overflow (:data:`MAX_SQUARED_DISTANCE`), every row the same, more
        than :data:`MAX_DUPLICATE_ROW_SHARE` of the rows repeating another, or a total variance
        below :data:`MIN_TOTAL_VARIANCE` or below :data:`MIN_RELATIVE_SPREAD` squared times
        the rows' mean squared norm. Such embeddings give neighbour graphs decided by
        ties, and scores that look like structure where there is none.
    """
    if hasattr(values, "toarray") and hasattr(values, "nnz"):  # scipy sparse
        msg = f"{name}: embedding is a sparse matrix; expected a dense array"
        raise EmbeddingError(msg)
    try:
        values = np.asarray(values)
    except (TypeError, ValueError) as e:  # ragged nested lists and the like
        msg = f"{name}: embedding cannot be read as an array ({type(e).__name__}: ragged or mixed values)"
        raise EmbeddingError(msg) from None
    if values.ndim != 2:
        msg = f"{name}: embedding must be 2-D (cells × dims), got shape {values.shape}"
        raise EmbeddingError(msg)
    # Booleans and complex numbers are "numeric" to numpy but not meaningful coordinates.
    if values.dtype.kind not in "iuf":
        msg = f"{name}: embedding has non-numeric dtype {values.dtype}; expected integers or floats"
        raise EmbeddingError(msg)
    if values.shape[1] == 0:
        msg = f"{name}: embedding has zero columns (shape {values.shape})"
        raise EmbeddingError(msg)
    if values.shape[0] == 0:
        msg = f"{name}: embedding has zero rows (shape {values.shape})"
        raise EmbeddingError(msg)
    _check_finite(values, name=name, row_names=row_names, what="NaN or infinite values")
    if values.dtype != np.float32:
        with np.errstate(over="ignore"):
            values = values.astype(np.float32, order="C")
        # Finite float64 values beyond ±3.4e38 become inf in float32.
        _check_finite(values, name=name, row_names=row_names, what="values too large for float32")
    values = np.ascontiguousarray(values)
    _check_spread(values, name=name)
    return values


def _check_spread(values: np.ndarray, *, name: str) -> None:
    """Refuse an embedding whose rows are (numerically) one point, or largely repeats.

    One pass over row blocks of the float32 values: per-dimension sums and sums of
    squares in float64 (shifted by the first row, so constant columns come out exactly
    0), and a 64-bit hash of every row; distinct rows are counted on the hashes (a hash
    table, no sort). ~0.6 s at 10^6 × 50.
    """
    import pandas as pd

    n, dim = values.shape
    if n < 2:
        msg = f"{name}: the embedding has {n} row; scoring needs at least 2 cells"
        raise EmbeddingError(msg)
    first = values[0].astype(np.float64)
    sums = np.zeros(dim)
    squares = np.zeros(dim)
    hashes = np.empty(n, dtype=np.uint64)
    largest = 0.0
    for start in range(0, n, _BLOCK_ROWS):
        block = values[start : start + _BLOCK_ROWS]
        largest = max(largest, float(np.abs(block).max()))
        shifted = block.astype(np.float64) - first
        sums += shifted.sum(axis=0)
        squares += np.einsum("ij,ij->j", shifted, shifted)
        # + 0.0 turns -0.0 into 0.0, so equal values hash alike.
        frame = pd.DataFrame(block + np.float32(0.0), copy=False)
        hashes[start : start + len(block)] = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    mean_shift = sums / n
    total_variance = float(np.clip(squares / n - mean_shift**2, 0.0, None).sum())
    mean_square_norm = total_variance + float(np.sum((first + mean_shift) ** 2))
    n_distinct = len(pd.unique(hashes))
    if 4.0 * dim * largest**2 > MAX_SQUARED_DISTANCE:
        msg = (
            f"{name}: the embedding's values reach {largest:.3g}; squared distances between its "
            f"{dim}-dimensional rows would reach {4.0 * dim * largest**2:.2g}, beyond what float32 "
            f"distance kernels compute reliably ({MAX_SQUARED_DISTANCE:g}); rescale it (e.g. divide "
            "by its standard deviation)"
        )
        raise EmbeddingError(msg)
    if n_distinct == 1 or total_variance == 0.0:
        msg = (
            f"{name}: all {n} rows of the embedding are the same vector (a constant embedding); "
            f"no metric is meaningful on it"
        )
        raise EmbeddingError(msg)
    n_repeats = n - n_distinct
    if n_repeats > MAX_DUPLICATE_ROW_SHARE * n:
        msg = (
            f"{name}: {n_repeats} of {n} rows ({n_repeats / n:.0%}) repeat another row (only "
            f"{n_distinct} distinct rows; at most {MAX_DUPLICATE_ROW_SHARE:.0%} may repeat): identical "
            f"rows tie in every neighbour search, so graphs and clusters built on them are arbitrary"
        )
        raise EmbeddingError(msg)
    if total_variance < MIN_TOTAL_VARIANCE:
        msg = (
            f"{name}: the embedding's total variance is {total_variance:.3g}, below "
            f"{MIN_TOTAL_VARIANCE:g}: its rows are numerically one point"
        )
        raise EmbeddingError(msg)
    if total_variance < MIN_RELATIVE_SPREAD**2 * mean_square_norm:
        msg = (
            f"{name}: the rows' spread (root total variance {np.sqrt(total_variance):.3g}) is below "
            f"{MIN_RELATIVE_SPREAD:g} of their RMS norm ({np.sqrt(mean_square_norm):.3g}): at float32 "
            f"precision they are one point"
        )
        raise EmbeddingError(msg)
    if n_repeats > WARN_DUPLICATE_ROW_SHARE * n:
        message = (
            f"{name}: {n_repeats} of {n} rows ({n_repeats / n:.1%}) repeat another row; identical rows "
            f"tie in neighbour searches"
        )
        warnings.warn(message, EmbeddingWarning, stacklevel=3)


def _check_finite(
    values: np.ndarray, *, name: str, row_names: Any, what: str
) -> None:
    if values.dtype.kind != "f":
        return
    bad_blocks = []
    for start in range(0, values.shape[0], _BLOCK_ROWS):
        block = values[start : start + _BLOCK_ROWS]
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        if len(bad):
            bad_blocks.append(bad + start)
    if not bad_blocks:
        return
    bad = np.concatenate(bad_blocks)
    if row_names is not None:
        shown = ", ".join(repr(str(row_names[i])) for i in bad[:_SHOW])
        where = f"cell IDs {shown}"
    else:
        where = f"row indices {', '.join(str(i) for i in bad[:_SHOW])}"
    more = ", ..." if len(bad) > _SHOW else ""
    msg = f"{name}: {len(bad)} of {values.shape[0]} rows have {what} ({where}{more})"
    raise EmbeddingError(msg)


def _warn(info: dict[str, Any], message: str) -> None:
    """Warn, and keep the message in the embedding's provenance."""
    info.setdefault("warnings", []).append(message)
    warnings.warn(message, EmbeddingWarning, stacklevel=3)


# --------------------------------------------------------------------------- baselines


class _Baseline:
    """Shared parameter handling of the in-process baselines."""

    implementation: ClassVar[str]
    #: Parameter names and defaults; every parameter is a positive integer.
    defaults: ClassVar[dict[str, int]]
    kind = "in-process"

    def __init__(self, *, name: str | None = None, **parameters: Any):
        unknown = sorted(set(parameters) - set(self.defaults))
        if unknown:
            msg = (
                f"baseline {self.implementation!r}: unknown parameter(s) "
                f"{', '.join(unknown)}; accepted: {', '.join(sorted(self.defaults))}"
            )
            raise SpecError(msg)
        for key, value in parameters.items():
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                msg = (
                    f"baseline {self.implementation!r}: parameter {key} must be a positive "
                    f"integer, got {value!r}"
                )
                raise SpecError(msg)
        self.name = name or self.implementation
        self.parameters: dict[str, int] = {
            k: int(parameters.get(k, v)) for k, v in self.defaults.items()
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": "in-process",
            "implementation": self.implementation,
            "parameters": dict(self.parameters),
        }

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.parameters.items())
        return f"{type(self).__name__}(name={self.name!r}, {params})"

    def _embedding(self, values: np.ndarray, info: dict[str, Any]) -> Embedding:
        values = check_embedding(values, name=self.name)
        info = {"parameters": dict(self.parameters), "n_dropped_cells": 0, **info}
        return Embedding(values=values, model=self.name, kind=self.kind, info=info)


def _float_copy(x: Any) -> Any:
    """Copy of an expression matrix that normalisation may change in place.

    Integer counts become float32, as ``sc.pp.normalize_total`` would make them; sparse
    stays sparse.
    """
    dtype = np.float32 if x.dtype.kind in "iub" else x.dtype
    return x.astype(dtype, copy=True)


def _sparse_pca(
    x: Any, n_comps: int, *, seed: int, name: str, info: dict[str, Any]
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
        cannot compute more) with a warning.

    Returns
    -------
    Array of shape ``(n_cells, n_comps)``.
    """
    import scanpy as sc

    n_cells, n_genes = x.shape
    n_comps = _cap_n_comps(n_comps, n_cells, n_genes, name=name, info=info)
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
    n_comps: int, n_cells: int, n_genes: int, *, name: str, info: dict[str, Any]
) -> int:
    """``n_comps`` capped to ``min(n_cells, n_genes) - 1`` (as ARPACK needs), with a warning."""
    most = min(n_cells, n_genes) - 1
    if most < 1:
        msg = f"{name}: PCA needs at least 2 cells and 2 genes, got {n_cells} × {n_genes}"
        raise EmbeddingError(msg)
    if n_comps > most:
        _warn(info, f"{name}: n_comps={n_comps} capped to {most} (min(n_cells, n_genes) - 1)")
        n_comps = most
    return n_comps


def _streams(x: Any) -> bool:
    """Whether a PCA baseline streams ``x`` rather than copying it (see STREAMED_PCA_MIN_VALUES)."""
    from czb.runner.datasets import stored_values

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


def _streamed_pca(
    x: Any,
    *,
    n_comps: int,
    seed: int,
    name: str,
    info: dict[str, Any],
    normalize: bool = False,
    n_top_genes: int | None = None,
) -> tuple[np.ndarray, int]:
    """PCA of ``x`` (cells × genes; in memory or a backed matrix) in passes over row chunks.

    With ``normalize``, each chunk is scaled to the median cell total and ``log1p``-ed
    as it is read (``sc.pp.normalize_total`` + ``sc.pp.log1p``); the cell totals are one
    pass. With ``n_top_genes``, one pass collects per-gene moments of the normalised
    values and of their logarithm, :func:`~czb.runner.streaming_pca.highly_variable_seurat`
    selects the genes, and the PCA reads those columns only. The PCA itself is
    :func:`~czb.runner.streaming_pca.randomized_pca` (implicitly centred,
    ``2 * STREAMED_PCA_POWER_ITERATIONS + 2`` passes).

    Returns
    -------
    The embedding, ``(n_cells, n_comps)`` float32, and the number of genes used.
    """
    from czb.runner.datasets import default_chunk_rows, iter_row_chunks, row_sums
    from czb.runner.streaming_pca import ColumnMoments, highly_variable_seurat, randomized_pca

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
    n_comps = _cap_n_comps(n_comps, n_cells, n_used, name=name, info=info)

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


class PCABaseline(_Baseline):
    """PCA of highly variable genes of log-normalised expression.

    The standard scanpy workflow, as cz-benchmarks' ``run_standard_scrna_workflow`` runs
    it for its PCA baseline: ``sc.pp.normalize_total`` → ``sc.pp.log1p`` (both skipped
    when the dataset is already log-normalised) → ``sc.pp.highly_variable_genes``
    (``n_top_genes``, scanpy's default ``seurat`` flavor) → subset to those genes →
    ``sc.pp.pca`` (``n_comps``, zero-centred). Sparse input stays sparse throughout.

    Unlike cz-benchmarks, ``n_top_genes`` is capped to the number of genes (with an
    :class:`~czb.errors.EmbeddingWarning`) rather than failing on small gene panels.

    Matrices storing more than :data:`STREAMED_PCA_MIN_VALUES` values (in memory or on
    disk) are never copied: the same steps run streamed over row chunks
    (:mod:`czb.runner.streaming_pca`): cell totals (one pass), per-gene moments and the
    same ``seurat`` gene selection (one pass), then randomized PCA of the selected genes
    with implicit centering (Halko et al. 2011; 8 passes), with scikit-learn's sign
    convention. Memory: one chunk plus ``n_cells × (n_comps + 20)`` floats. The genes
    are scanpy's; the leading components agree with ARPACK's to |cosine| > 0.999,
    trailing ones among near-equal eigenvalues less (``info['solver']`` says which
    path ran).

    Parameters
    ----------
    name
        Model name (defaults to ``"pca"``).
    n_top_genes
        Number of highly variable genes (default 3000).
    n_comps
        Number of principal components (default 50).

    References
    ----------
    Wolf, Angerer & Theis (2018). SCANPY: large-scale single-cell gene expression data
    analysis. Genome Biology 19:15.

    Satija et al. (2015). Spatial reconstruction of single-cell gene expression data.
    Nature Biotechnology 33:495–502 (the ``seurat`` highly-variable-gene method).

    Chan Zuckerberg Initiative, cz-benchmarks:
    ``czbenchmarks.tasks.utils.run_standard_scrna_workflow``.
    """

    implementation = "pca"
    defaults: ClassVar[dict[str, int]] = {"n_top_genes": 3000, "n_comps": 50}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed the cells of ``dataset``; see the class docstring.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, n_comps)`` for all cells.
        """
        import anndata as ad
        import scanpy as sc

        info: dict[str, Any] = {}
        expression = dataset.spec.expression
        ds, n_genes = dataset.name, dataset.n_genes
        n_top = self.parameters["n_top_genes"]
        if n_top > n_genes:
            _warn(info, f"{self.name}: n_top_genes={n_top} capped to the {n_genes} genes of {ds}")
            n_top = n_genes
        if dataset.n_cells < 2 or n_genes < 2:
            msg = (
                f"{self.name}: {ds} has {dataset.n_cells} cells × {n_genes} genes; "
                f"PCA needs at least 2 of each"
            )
            raise EmbeddingError(msg)

        info.update(expression=expression, normalized=expression == "raw_counts")
        x = dataset.adata.X
        if _streams(x):
            values, n_used = _streamed_pca(
                x,
                n_comps=self.parameters["n_comps"],
                seed=seed,
                name=self.name,
                info=info,
                normalize=expression == "raw_counts",
                n_top_genes=n_top,
            )
            self._check_n_used(n_used, n_top, ds, info)
            info["n_genes_used"] = n_used
            info["effective_parameters"] = {"n_top_genes": n_top, "n_comps": info["n_comps"]}
            return self._embedding(values, info)

        from czb.runner.datasets import to_memory

        # A bare AnnData around a copy of X: normalisation works in place, and obs/var
        # (which may be large or have duplicated gene symbols) are not needed.
        adata = ad.AnnData(X=_float_copy(to_memory(x)))
        del x
        if expression == "raw_counts":
            sc.pp.normalize_total(adata)
            sc.pp.log1p(adata)
        with warnings.catch_warnings():
            # Genes without a defined dispersion (e.g. never detected) are never selected;
            # scanpy warns when that leaves fewer than n_top_genes. Reported below instead.
            warnings.filterwarnings("ignore", message="`n_top_genes` > number of normalized")
            sc.pp.highly_variable_genes(adata, n_top_genes=n_top)
        hvg = adata.var["highly_variable"].to_numpy()
        n_used = int(hvg.sum())
        self._check_n_used(n_used, n_top, ds, info)
        x = adata.X[:, hvg]
        del adata

        info["n_genes_used"] = n_used
        values = _sparse_pca(x, self.parameters["n_comps"], seed=seed, name=self.name, info=info)
        info["effective_parameters"] = {"n_top_genes": n_top, "n_comps": info["n_comps"]}
        return self._embedding(values, info)

    def _check_n_used(self, n_used: int, n_top: int, ds: str, info: dict[str, Any]) -> None:
        if n_used < n_top:
            msg = (
                f"{self.name}: only {n_used} genes of {ds} have a defined dispersion (are "
                f"detected); using those instead of n_top_genes={n_top}"
            )
            _warn(info, msg)


class RawPCABaseline(_Baseline):
    """PCA of the raw count matrix, without normalisation or gene selection.

    Zero-centred PCA of ``dataset.adata.X`` as given, computed sparse (the matrix is
    never densified or copied, except to turn integer counts into float32). Bendidi et al.
    found that this simple baseline is hard to beat on perturbation tasks. On a
    log-normalised dataset it is PCA of the log-normalised values. Above
    :data:`STREAMED_PCA_MIN_VALUES` stored values it is streamed over row chunks, as
    :class:`PCABaseline` is.

    Parameters
    ----------
    name
        Model name (defaults to ``"pca_raw"``).
    n_comps
        Number of principal components (default 50).

    References
    ----------
    Bendidi, I. et al. (2024). Benchmarking transcriptomics foundation models for
    perturbation analysis: one PCA still rules them all. arXiv:2410.13956.
    """

    implementation = "pca_raw"
    defaults: ClassVar[dict[str, int]] = {"n_comps": 50}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed the cells of ``dataset``; see the class docstring.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, n_comps)`` for all cells.
        """
        from czb.runner.datasets import to_memory

        x = dataset.adata.X
        info: dict[str, Any] = {"expression": dataset.spec.expression, "normalized": False}
        if _streams(x):
            values, _ = _streamed_pca(
                x, n_comps=self.parameters["n_comps"], seed=seed, name=self.name, info=info
            )
            info["effective_parameters"] = {"n_comps": info["n_comps"]}
            return self._embedding(values, info)
        x = to_memory(x)
        if x.dtype.kind in "iub":
            x = x.astype(np.float32)
        values = _sparse_pca(x, self.parameters["n_comps"], seed=seed, name=self.name, info=info)
        info["effective_parameters"] = {"n_comps": info["n_comps"]}
        return self._embedding(values, info)


class RandomBaseline(_Baseline):
    """Standard Gaussian noise, one row per cell: the chance-level reference.

    Any metric a real model scores should beat this one; one that does not is measuring
    something other than biology (e.g. label frequencies).

    Parameters
    ----------
    name
        Model name (defaults to ``"random"``).
    dim
        Number of dimensions (default 50).
    """

    implementation = "random"
    defaults: ClassVar[dict[str, int]] = {"dim": 50}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Draw ``(dataset.n_cells, dim)`` values from N(0, 1) with ``seed``.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, dim)`` for all cells.
        """
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((dataset.n_cells, self.parameters["dim"]), dtype=np.float32)
        return self._embedding(values, {"seed": seed})


#: In-process baselines by ``implementation`` name.
BASELINES: dict[str, type[_Baseline]] = {
    cls.implementation: cls for cls in (PCABaseline, RawPCABaseline, RandomBaseline)
}


def source_for_model(spec: ModelSpec, options: Any = None) -> EmbeddingSource:
    """The embedding source that runs a model spec.

    Parameters
    ----------
    spec
        A ``baseline`` spec names one of :data:`BASELINES` as ``implementation`` and may
        set its parameters; a ``docker`` spec runs its image
        (:class:`czb.runner.containers.DockerModelSource`).
    options
        :class:`czb.runner.containers.RunOptions` of docker models (GPUs, weights,
        limits, cache); ignored by baselines.

    Raises
    ------
    SpecError
        Unknown baseline implementation, or unknown / invalid parameters.
    """
    if spec.kind == "docker":
        from czb.runner.containers import DockerModelSource

        return DockerModelSource(spec, options)
    known = ", ".join(sorted(BASELINES))
    if spec.implementation is None:
        msg = f"model {spec.name!r} is a baseline but sets no implementation; known: {known}"
        raise SpecError(msg)
    if spec.implementation not in BASELINES:
        msg = (
            f"model {spec.name!r}: unknown baseline implementation "
            f"{spec.implementation!r}; known: {known}"
        )
        raise SpecError(msg)
    return BASELINES[spec.implementation](name=spec.name, **spec.parameters)


# --------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _show(items: Any) -> str:
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:_SHOW])
    return shown + (", ..." if len(items) > _SHOW else "")


@dataclass
class _Loaded:
    """Raw content of an embedding file, before checks and alignment."""

    values: Any
    cell_ids: np.ndarray | None = None
    #: Where the IDs came from, e.g. ``"cell_ids"`` or ``"index"``.
    id_source: str | None = None
    key: str | None = None
    #: Things to warn about once the embedding is built.
    notes: list[str] = field(default_factory=list)


class FileEmbeddingSource:
    """Embeddings precomputed elsewhere, read from a file and aligned to the dataset.

    Use :func:`source_for_file` to make one. Formats:

    ``.npy``
        One array of shape ``(n_cells, dim)`` in dataset order (no cell IDs).
    ``.npz``
        The array named ``key``, or the only array that is not cell IDs; cell IDs from an
        array named ``cell_ids``, ``cell_id`` or ``obs_names`` if there is one (as strings:
        object arrays are pickles, which are never loaded).
    ``.parquet``
        One row per cell. Cell IDs from a string index (as ``DataFrame.to_parquet`` writes
        it) or a ``cell_ids`` / ``cell_id`` / ``obs_names`` column; every other column is
        one numeric dimension, unless ``key`` names one list-valued column holding whole
        vectors (a file whose only column is list-valued needs no ``key``).
    ``.h5ad``
        ``obsm[key]`` (``key`` may be left out when ``obsm`` has one entry); cell IDs are the
        ``obs_names``. Only that entry and the cell IDs are read.

    With cell IDs, rows are matched to dataset cells by ID and put in dataset order; dataset
    cells missing from the file are dropped with an :class:`~czb.errors.EmbeddingWarning`
    (``info["n_dropped_cells"]``). Without IDs, the file must have one row per dataset cell.
    """

    kind = "file"

    def __init__(self, path: str | Path, *, key: str | None = None):
        self.path = Path(path)
        self.key = key
        self.format = self.path.suffix.lower()
        self.name = f"file:{self.path.name}"
        self._digest: tuple[tuple[int, int], str] | None = None

    def __repr__(self) -> str:
        return f"FileEmbeddingSource({str(self.path)!r}, key={self.key!r})"

    @property
    def sha256(self) -> str:
        """Checksum of the file (recomputed if the file changed)."""
        # Size and times alone can be put back after an edit; ctime and inode cannot.
        st = self.path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        if self._digest is None or self._digest[0] != stamp:
            self._digest = (stamp, _sha256(self.path))
        return self._digest[1]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": None,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "parameters": {"key": self.key},
        }

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Read the file and align its rows to the cells of ``dataset``.

        Parameters
        ----------
        dataset
            The dataset the embeddings were computed on.
        seed
            Ignored (the embeddings are already computed).

        Returns
        -------
        Embedding of shape ``(n_kept_cells, dim)``; ``cell_index`` is ``None`` when every
        dataset cell is present.

        Raises
        ------
        EmbeddingError
            Unreadable file, missing key, malformed values, or rows that do not line up
            with the dataset's cells.
        """
        where = str(self.path)
        if not self.path.is_file():
            msg = f"{where}: embedding file not found"
            raise EmbeddingError(msg)
        readers = {
            ".npy": self._read_npy,
            ".npz": self._read_npz,
            ".parquet": self._read_parquet,
            ".h5ad": self._read_h5ad,
        }
        loaded = readers[self.format]()
        n_rows = np.shape(loaded.values)[0] if np.ndim(loaded.values) else 0
        if loaded.cell_ids is not None and len(loaded.cell_ids) != n_rows:
            msg = f"{where}: {len(loaded.cell_ids)} cell IDs ({loaded.id_source}) for {n_rows} rows"
            raise EmbeddingError(msg)
        values = check_embedding(loaded.values, name=where, row_names=loaded.cell_ids)

        info: dict[str, Any] = {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "format": self.format.lstrip("."),
            "key": loaded.key,
            "cell_ids": loaded.id_source,
            "n_rows_in_file": int(values.shape[0]),
        }
        for note in loaded.notes:
            _warn(info, note)
        if loaded.cell_ids is None:
            if values.shape[0] != dataset.n_cells:
                msg = (
                    f"{where}: {values.shape[0]} rows but dataset {dataset.name} has "
                    f"{dataset.n_cells} cells; without cell IDs the rows must be the dataset's "
                    f"cells in order (add cell IDs to match by ID)"
                )
                raise EmbeddingError(msg)
            cell_index = None
            info["n_dropped_cells"] = 0
        else:
            values, cell_index = _align(values, loaded.cell_ids, dataset, name=where, info=info)
        return Embedding(values, model=self.name, kind=self.kind, cell_index=cell_index, info=info)

    # Parsers of untrusted files raise all sorts of exceptions on corrupt input (OSError,
    # ValueError, EOFError, BadZipFile, ArrowInvalid, KeyError from h5py...); each reader
    # turns those into one EmbeddingError naming the file. Our own checks come after.

    def _unreadable(self, error: Exception) -> EmbeddingError:
        # Never the parser's message itself: numpy, zipfile and h5py quote the file.
        from czb.runner.fetch import describe_content, expected_kind
        from czb.runner.hdf5_checks import read_error_cause

        what = describe_content(self.path, expected=expected_kind(self.path.name))
        if what is not None:
            return EmbeddingError(f"{self.path}: not a readable {self.format} file: it is {what}")
        return EmbeddingError(f"{self.path}: not a readable {self.format} file ({read_error_cause(error)})")

    def _read_npy(self) -> _Loaded:
        try:
            with self.path.open("rb") as f:
                shape, dtype, header_end = _npy_header(f)
            self._refuse_objects(dtype, "array")
            _check_npy_size(shape, dtype, self.path.stat().st_size - header_end, where=f"{self.path}")
            # Never unpickle: the file comes from outside.
            values = np.load(self.path, allow_pickle=False)
        except EmbeddingError:
            raise
        except Exception as e:
            raise self._unreadable(e) from e
        return _Loaded(values)

    def _read_npz(self) -> _Loaded:
        import zipfile

        try:
            with zipfile.ZipFile(self.path) as archive:
                members = {m[: -len(".npy")]: m for m in archive.namelist() if m.endswith(".npy")}
                names = list(members)
                id_names = [n for n in CELL_ID_NAMES if n in names]
                data_names = [n for n in names if n not in id_names]
                if len(id_names) > 1:
                    msg = f"{self.path}: several cell ID arrays ({_show(id_names)}); keep one"
                    raise EmbeddingError(msg)
                if {"data", "indices", "indptr", "format", "shape"} <= set(names) and self.key is None:
                    msg = (
                        f"{self.path}: holds a scipy.sparse matrix (scipy.sparse.save_npz), which "
                        "czb does not read as an embedding; save a dense array (np.savez / np.save)"
                    )
                    raise EmbeddingError(msg)
                key = self._pick_key(data_names, what="array", plural="arrays")
                for name in [key, *id_names]:
                    info = archive.getinfo(members[name])
                    with archive.open(info) as f:
                        shape, dtype, header_end = _npy_header(f)
                    self._refuse_objects(dtype, f"array {name!r}")
                    where = f"{self.path}: array {name!r}"
                    _check_npy_size(shape, dtype, info.file_size - header_end, where=where)
                    _check_inflation(info.file_size, info.compress_size, where=where)
            with np.load(self.path, allow_pickle=False) as npz:
                values = npz[key]
                ids = npz[id_names[0]] if id_names else None
        except EmbeddingError:
            raise
        except Exception as e:
            raise self._unreadable(e) from e
        cell_ids = self._ids(ids, id_names[0]) if id_names else None
        return _Loaded(values, cell_ids, id_names[0] if id_names else None, key)

    def _refuse_objects(self, dtype: np.dtype, what: str) -> None:
        # Object arrays are pickles, and unpickling a file can run arbitrary code.
        if dtype.hasobject:
            msg = (
                f"{self.path}: {what} holds Python objects (dtype object), which czb does not "
                f"unpickle; save numbers, and cell IDs as strings (np.asarray(ids, dtype=str))"
            )
            raise EmbeddingError(msg)

    def _read_parquet(self) -> _Loaded:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.path)
            meta = table.schema.pandas_metadata or {}
        except Exception as e:
            raise self._unreadable(e) from e
        # Index columns written by pandas; a RangeIndex is metadata only (not a column).
        index_cols = [c for c in meta.get("index_columns", []) if isinstance(c, str)]
        id_cols = [c for c in CELL_ID_NAMES if c in table.column_names and c not in index_cols]
        data_names = [c for c in table.column_names if c not in index_cols and c not in id_cols]
        n_rows = table.num_rows

        if len(id_cols) > 1:
            msg = f"{self.path}: several cell ID columns ({_show(id_cols)}); keep one"
            raise EmbeddingError(msg)
        ids, id_source, notes = None, None, []
        if len(index_cols) == 1 and _is_string(table.schema.field(index_cols[0]).type):
            ids, id_source = self._ids(table.column(index_cols[0]).to_numpy(), "index"), "index"
        elif index_cols and not id_cols:
            # Only a string index holds cell IDs. An integer index in another order than
            # 0..n-1 usually means shuffled rows, which we cannot put back.
            index = table.column(index_cols[0]).to_numpy()
            if len(index_cols) > 1 or not np.array_equal(index, np.arange(n_rows)):
                notes.append(
                    f"{self.path}: the index is not cell IDs (strings) and is ignored; rows "
                    f"are taken as the dataset's cells in file order"
                )
        if id_cols:
            col_ids = self._ids(table.column(id_cols[0]).to_numpy(), id_cols[0])
            if ids is not None and not np.array_equal(ids, col_ids):
                msg = (
                    f"{self.path}: the index and column {id_cols[0]!r} hold different "
                    f"cell IDs; keep one"
                )
                raise EmbeddingError(msg)
            ids, id_source = col_ids, id_source or id_cols[0]

        def is_list(name: str) -> bool:
            t = table.schema.field(name).type
            return (
                pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
            )

        key = self.key
        if key is None and len(data_names) == 1 and is_list(data_names[0]):
            key = data_names[0]  # one column of whole vectors: no need to name it
        if key is not None:
            if key not in data_names:
                msg = f"{self.path}: no column {key!r}; columns: {_show(data_names) or 'none'}"
                raise EmbeddingError(msg)
            column = table.column(key).combine_chunks()
            if not is_list(key):
                values = column.to_numpy(zero_copy_only=False)  # 1-D: check_embedding says so
            else:
                if column.null_count:
                    msg = f"{self.path}: column {key!r} has {column.null_count} empty (null) rows"
                    raise EmbeddingError(msg)
                lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
                if n_rows and lengths.min() != lengths.max():
                    msg = (
                        f"{self.path}: column {key!r} holds vectors of different lengths "
                        f"({lengths.min()} to {lengths.max()})"
                    )
                    raise EmbeddingError(msg)
                flat = pc.list_flatten(column)
                if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)):
                    msg = f"{self.path}: column {key!r} holds non-numeric values ({flat.type})"
                    raise EmbeddingError(msg)
                dim = int(lengths[0]) if n_rows else 0
                values = flat.to_numpy(zero_copy_only=False).reshape(n_rows, dim)
            return _Loaded(values, ids, id_source, key, notes)

        types = {c: table.schema.field(c).type for c in data_names}
        bad = [
            f"{c} ({t})"
            for c, t in types.items()
            if not (pa.types.is_integer(t) or pa.types.is_floating(t))
        ]
        if bad:
            msg = (
                f"{self.path}: non-numeric column(s) {', '.join(bad[:_SHOW])}; every column "
                f"other than the cell IDs must be one numeric dimension (or pass key= to "
                f"name a list column)"
            )
            raise EmbeddingError(msg)
        if not data_names:
            values = np.empty((n_rows, 0), dtype=np.float32)
        else:
            # Nulls come out as NaN and are reported by check_embedding.
            values = np.column_stack([table.column(c).to_numpy() for c in data_names])
        return _Loaded(values, ids, id_source, None, notes)

    def _read_h5ad(self) -> _Loaded:
        import h5py

        from czb.errors import DatasetError
        from czb.runner.hdf5_checks import check_h5ad_element

        try:
            read_elem = _anndata_read_elem()
            with h5py.File(self.path, "r") as f:
                obs, obsm = f.get("obs"), f.get("obsm")
                if not isinstance(obs, h5py.Group) or not isinstance(obsm, h5py.Group | None):
                    return self._read_h5ad_legacy()
                names = list(obsm.keys()) if obsm is not None else []
                key = self._pick_key(names, what="obsm entry", plural="obsm entries")
                # Sizes and sparse structure first: scipy trusts them, and crashes on bad ones.
                for element in ("obs", f"obsm/{key}"):
                    check_h5ad_element(f, element, path=self.path, name="embedding file")
                values = read_elem(obsm[key])
                ids = read_elem(obs[obs.attrs["_index"]])
        except EmbeddingError:
            raise
        except DatasetError as e:
            raise EmbeddingError(str(e)) from None
        except Exception as e:
            raise self._unreadable(e) from e
        ids = self._ids(ids, "obs_names")
        return _Loaded(_dense(values, self.path, key), ids, "obs_names", key)

    def _read_h5ad_legacy(self) -> _Loaded:
        # Files from anndata < 0.7 store obs as a compound dataset; let anndata read them,
        # once the whole file passed the checks that keep scipy from crashing.
        import anndata as ad

        from czb.errors import DatasetError
        from czb.runner.hdf5_checks import check_h5ad_structure

        try:
            check_h5ad_structure(self.path, name="embedding file")
        except DatasetError as e:
            raise EmbeddingError(str(e)) from None
        adata = ad.read_h5ad(self.path, backed="r")
        try:
            key = self._pick_key(list(adata.obsm.keys()), what="obsm entry", plural="obsm entries")
            values = _dense(adata.obsm[key], self.path, key)
            ids = self._ids(np.asarray(adata.obs_names), "obs_names")
            return _Loaded(values, ids, "obs_names", key)
        finally:
            adata.file.close()

    def _pick_key(self, names: list[str], *, what: str, plural: str) -> str:
        if self.key is not None:
            if self.key not in names:
                msg = f"{self.path}: no {what} {self.key!r}; available: {_show(names) or 'none'}"
                raise EmbeddingError(msg)
            return self.key
        if len(names) == 1:
            return names[0]
        if not names:
            msg = f"{self.path}: contains no {what}"
        else:
            msg = f"{self.path}: several {plural} ({_show(names)}); pass key= to choose one"
        raise EmbeddingError(msg)

    def _ids(self, ids: Any, source: str) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            msg = f"{self.path}: cell IDs ({source}) must be 1-D, got shape {ids.shape}"
            raise EmbeddingError(msg)
        if ids.dtype == object and any(i is None for i in ids):
            msg = f"{self.path}: some cell IDs ({source}) are missing (null)"
            raise EmbeddingError(msg)
        if ids.dtype.kind not in "USOiu":
            msg = f"{self.path}: cell IDs ({source}) must be strings, got dtype {ids.dtype}"
            raise EmbeddingError(msg)
        return ids.astype(str).astype(object)


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and where the data start, from the header of an open ``.npy`` file."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape), dtype, f.tell()


#: A stored array claiming more than this many times its compressed bytes is refused...
_MAX_INFLATION = 1000
#: ... when it claims at least this many bytes.
_INFLATION_MIN_BYTES = 64 << 20
#: Largest sparse embedding densified (rows × columns).
_MAX_DENSE_VALUES = 1 << 31


def _check_npy_size(shape: tuple[int, ...], dtype: np.dtype, available: int, *, where: str) -> None:
    """The data a ``.npy`` header claims fit in the bytes that follow it (else numpy would
    allocate the claimed size before finding out)."""
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > available:
        msg = (
            f"{where}: the header claims shape {shape} of {dtype} ({claimed} bytes), but only "
            f"{max(available, 0)} bytes follow; the file is truncated or forged"
        )
        raise EmbeddingError(msg)


def _check_inflation(size: int, compressed: int, *, where: str) -> None:
    if size >= _INFLATION_MIN_BYTES and size > max(compressed, 1) * _MAX_INFLATION:
        msg = (
            f"{where}: {size} bytes compressed into {compressed} (more than "
            f"{_MAX_INFLATION}-fold); refusing it as implausible"
        )
        raise EmbeddingError(msg)


def _is_string(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _anndata_read_elem() -> Any:
    try:
        from anndata.io import read_elem  # anndata >= 0.11
    except ImportError:  # pragma: no cover - anndata 0.10
        from anndata.experimental import read_elem
    return read_elem


def _dense(values: Any, path: Path, key: str) -> Any:
    """An obsm entry as an array: dense as is, sparse densified (embeddings are small)."""
    import pandas as pd

    if hasattr(values, "toarray"):
        n_values = int(values.shape[0]) * int(values.shape[1]) if len(values.shape) == 2 else 0
        if n_values > _MAX_DENSE_VALUES:
            msg = (
                f"{path}: obsm[{key!r}] is a sparse matrix of shape {tuple(values.shape)}, too "
                f"large to use as an embedding (more than {_MAX_DENSE_VALUES} values once dense)"
            )
            raise EmbeddingError(msg)
        return values.toarray()
    if isinstance(values, pd.DataFrame):
        bad = [c for c in values.columns if values[c].dtype.kind not in "iuf"]
        if bad:
            msg = f"{path}: obsm[{key!r}] has non-numeric column(s) {_show(bad)}"
            raise EmbeddingError(msg)
        return values.to_numpy()
    return values


def _align(
    values: np.ndarray, ids: np.ndarray, dataset: Dataset, *, name: str, info: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Put rows with cell IDs in dataset order.

    Returns
    -------
    The reordered values, shape ``(n_kept_cells, dim)``, and ``cell_index`` (``None`` when
    every dataset cell is present).
    """
    import pandas as pd

    ids_index = pd.Index(ids)
    dup = ids_index.duplicated()
    if dup.any():
        msg = f"{name}: {int(dup.sum())} duplicated cell IDs (e.g. {_show(pd.unique(ids[dup]))})"
        raise EmbeddingError(msg)
    obs_names = dataset.adata.obs_names
    if not obs_names.is_unique:
        msg = f"{name}: dataset {dataset.name} has duplicated cell IDs; cannot match rows by ID"
        raise EmbeddingError(msg)
    position = obs_names.get_indexer(ids_index)
    missing = position < 0
    if missing.all():
        msg = (
            f"{name}: 0 of {len(ids)} cell IDs match dataset {dataset.name} "
            f"(file has e.g. {_show(ids[:3])}; dataset has e.g. {_show(obs_names[:3])}); "
            f"are these the same cells?"
        )
        raise EmbeddingError(msg)
    if missing.any():
        msg = (
            f"{name}: {int(missing.sum())} of {len(ids)} cell IDs are not in dataset "
            f"{dataset.name} (e.g. {_show(ids[missing])})"
        )
        raise EmbeddingError(msg)

    n_dropped = dataset.n_cells - len(ids)
    info["n_dropped_cells"] = n_dropped
    if n_dropped == 0 and np.all(position == np.arange(len(position))):
        return values, None  # already every cell in dataset order: no copy
    order = np.argsort(position, kind="stable")
    if n_dropped:
        msg = (
            f"{name}: {n_dropped} of {dataset.n_cells} cells of {dataset.name} have no "
            f"embedding and are left out"
        )
        _warn(info, msg)
    values = np.ascontiguousarray(values[order])
    return values, (None if n_dropped == 0 else position[order].astype(np.int64))


def source_for_file(path: str | Path, *, key: str | None = None) -> EmbeddingSource:
    """An embedding source that reads precomputed embeddings from a file.

    Parameters
    ----------
    path
        A ``.npy``, ``.npz``, ``.parquet`` or ``.h5ad`` file; see
        :class:`FileEmbeddingSource` for what each must contain.
    key
        Which array (``.npz``), list-valued column (``.parquet``) or ``obsm`` entry
        (``.h5ad``) holds the embeddings; needed only when the file has several.

    Raises
    ------
    EmbeddingError
        Unknown file extension, or no such file. (The content is checked by ``embed``.)
    """
    path = Path(path)
    if path.suffix.lower() not in FILE_FORMATS:
        msg = (
            f"{path}: unknown embedding file extension {path.suffix!r}; "
            f"expected one of {', '.join(FILE_FORMATS)}"
        )
        raise EmbeddingError(msg)
    if not path.is_file():
        msg = f"{path}: embedding file not found"
        raise EmbeddingError(msg)
    return FileEmbeddingSource(path, key=key)
