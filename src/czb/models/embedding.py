"""Cell embeddings: the :class:`Embedding` type, the :class:`EmbeddingSource` protocol, and the
checks every embedding goes through.

An :class:`EmbeddingSource` turns a :class:`~czb.data.dataset.Dataset` into an
:class:`Embedding`. Three kinds of source exist or are planned:

``in-process``
    Baselines computed here (:data:`~czb.models.baselines.BASELINES`: ``pca``, ``pca_raw``,
    ``random``), built from a model spec with :func:`~czb.models.sources.source_for_model`.
``file``
    Embeddings computed elsewhere and brought as a ``.npy``, ``.npz``, ``.parquet`` or
    ``.h5ad`` file, read by :func:`~czb.models.sources.source_for_file` and aligned to the
    dataset by cell ID (:func:`align_to_dataset`).
``docker``
    Foundation models run in their own image under the container contract
    (:mod:`czb.models.docker.source`).

Every source passes its values through :func:`check_embedding`, so all embeddings that
reach the tasks are 2-D, finite, float32 and C-contiguous.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from czb.core.errors import EmbeddingError, EmbeddingWarning

if TYPE_CHECKING:
    from collections.abc import Sequence

    from czb.data.dataset import Dataset

#: How many offending rows / IDs an error message shows.
MAX_SHOWN = 5
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
        shown = ", ".join(repr(str(row_names[i])) for i in bad[:MAX_SHOWN])
        where = f"cell IDs {shown}"
    else:
        where = f"row indices {', '.join(str(i) for i in bad[:MAX_SHOWN])}"
    more = ", ..." if len(bad) > MAX_SHOWN else ""
    msg = f"{name}: {len(bad)} of {values.shape[0]} rows have {what} ({where}{more})"
    raise EmbeddingError(msg)


def record_warning(info: dict[str, Any], message: str) -> None:
    """Warn, and keep the message in the embedding's provenance."""
    info.setdefault("warnings", []).append(message)
    warnings.warn(message, EmbeddingWarning, stacklevel=3)


def show_items(items: Any) -> str:
    """The first :data:`MAX_SHOWN` of ``items``, quoted, for an error message."""
    items = list(items)
    shown = ", ".join(repr(str(i)) for i in items[:MAX_SHOWN])
    return shown + (", ..." if len(items) > MAX_SHOWN else "")


# --------------------------------------------------------------------------- alignment


def align_to_dataset(
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
        msg = f"{name}: {int(dup.sum())} duplicated cell IDs (e.g. {show_items(pd.unique(ids[dup]))})"
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
            f"(file has e.g. {show_items(ids[:3])}; dataset has e.g. {show_items(obs_names[:3])}); "
            f"are these the same cells?"
        )
        raise EmbeddingError(msg)
    if missing.any():
        msg = (
            f"{name}: {int(missing.sum())} of {len(ids)} cell IDs are not in dataset "
            f"{dataset.name} (e.g. {show_items(ids[missing])})"
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
        record_warning(info, msg)
    values = np.ascontiguousarray(values[order])
    return values, (None if n_dropped == 0 else position[order].astype(np.int64))
