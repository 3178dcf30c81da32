"""Chunked access to an expression matrix, sparse or dense, in memory or on disk.

Row-chunk helpers (:func:`iter_row_chunks`, :func:`row_sums`, :func:`to_memory`...)
and :class:`BackedMatrix`, the matrix of a large .h5ad file left on disk and read in
row blocks on demand.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from czb.core.errors import DatasetError
from czb.data.messages import unreadable

__all__ = [
    "BackedMatrix",
    "default_chunk_rows",
    "iter_row_chunks",
    "row_sums",
    "stored_values",
    "to_memory",
]

#: Rows per chunk when a caller asks for a fixed number (kept for callers that pass it).
DEFAULT_CHUNK_ROWS = 2048
#: Stored values per chunk when the rows per chunk are left to :func:`default_chunk_rows`:
#: 4M values are 32 MB as float64, whatever the number of genes.
CHUNK_VALUES = 1 << 22
# Requested rows further apart than this many stored values are read separately.
_GAP_VALUES = 1 << 16


def stored_values(X: Any) -> int:
    """Values a matrix stores: non-zeros of a sparse (or backed sparse) matrix, every
    entry of a dense one."""
    nnz = getattr(X, "nnz", None)
    if nnz is not None:
        return int(nnz)
    return int(X.shape[0]) * int(X.shape[1])


def default_chunk_rows(X: Any, *, values: int | None = None) -> int:
    """Rows per chunk so that a chunk stores about ``values`` values (default
    :data:`CHUNK_VALUES`; at least 1 row).

    Depends only on the matrix's shape and number of stored values, so a matrix in
    memory and the same matrix on disk are cut into the same chunks.
    """
    values = values or CHUNK_VALUES
    n_rows = max(int(X.shape[0]), 1)
    per_row = max(stored_values(X) / n_rows, 1.0)
    return int(max(1, min(n_rows, values // per_row)))


def iter_row_chunks(X: Any, *, chunk_rows: int | None = None) -> Iterator[tuple[int, Any]]:
    """Yield ``(start, block)`` for consecutive row blocks of ``X``.

    Parameters
    ----------
    X
        Matrix of shape ``(n_rows, n_cols)``: dense array, ``scipy.sparse`` matrix,
        a :class:`BackedMatrix` (read with one open file handle for the whole
        iteration; blocks come back as CSR), or an h5py dataset.
    chunk_rows
        Rows per block (default: :func:`default_chunk_rows`).

    Yields
    ------
    start
        Index of the block's first row.
    block
        ``X[start:start + chunk_rows]``, same kind as ``X`` (CSR for a backed matrix).
    """
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(X)
    if isinstance(X, BackedMatrix):
        yield from X.iter_rows(chunk_rows)
        return
    n = X.shape[0]
    for start in range(0, n, chunk_rows):
        yield start, X[start : start + chunk_rows]


def row_sums(X: Any, *, chunk_rows: int | None = None) -> np.ndarray:
    """Sum of each row of a sparse or dense matrix, without densifying it.

    Parameters
    ----------
    X
        Matrix of shape ``(n_rows, n_cols)``: ``scipy.sparse`` (CSR is fastest),
        dense array, or a :class:`BackedMatrix` / row-sliceable on-disk dataset (read
        in chunks).
    chunk_rows
        Rows per chunk for dense and on-disk input (default:
        :func:`default_chunk_rows`), so at most a chunk of values is converted to
        float64 at once.

    Returns
    -------
    ``float64`` array of shape ``(n_rows,)``.
    """
    import scipy.sparse as sp

    if sp.issparse(X):
        # Sparse sums touch only the stored values: no chunking needed.
        return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    out = np.empty(X.shape[0], dtype=np.float64)
    for start, block in iter_row_chunks(X, chunk_rows=chunk_rows):
        if sp.issparse(block):
            sums = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        else:
            sums = np.asarray(block).sum(axis=1, dtype=np.float64)
        out[start : start + block.shape[0]] = sums
    return out


def to_memory(X: Any) -> Any:
    """``X`` as an in-memory matrix: a :class:`BackedMatrix` is read whole (as CSR),
    anything else is returned as it is."""
    return X.to_memory() if isinstance(X, BackedMatrix) else X


class BackedMatrix:
    """An expression matrix left in its .h5ad file and read in row blocks on demand.

    What :func:`~czb.data.reading.load_dataset` puts in ``Dataset.adata.X`` for large
    files (see :class:`~czb.data.dataset.Dataset`). The file is opened for each read
    (about 0.3 ms) and closed right after, or once for a whole :meth:`iter_rows` pass,
    so no file handle outlives a read; the object holds the path, the shape, and the
    row pointers (``indptr``, ``n_rows + 1`` int64, read on first use).

    Row blocks always come back as ``scipy.sparse`` CSR matrices of the file's dtype,
    whatever the storage: a CSR group is sliced (``data``/``indices`` between two row
    pointers), a dense dataset's rows are read and sparsified block by block. Reading
    errors (a corrupt or truncated file) raise :class:`~czb.core.errors.DatasetError`.

    AnnData accepts it as ``X`` (it is registered as an ``anndata.abc.CSRDataset``);
    like anndata's own backed matrices it supports ``shape``, ``dtype``, row indexing
    (``X[i]``, ``X[a:b]``, ``X[index_array]``, ``X[bool_mask]``, optionally with a
    column index ``X[rows, cols]``), and :meth:`to_memory`. It refuses ``np.asarray``.

    Parameters
    ----------
    path
        The .h5ad file.
    element
        Path of the matrix inside the file: ``"X"``, ``"raw/X"`` or ``"layers/NAME"``.
    dataset
        Name of the dataset, for error messages.
    shape, dtype
        The matrix's shape ``(n_cells, n_genes)`` and value dtype.
    storage
        ``"csr"`` (a CSR group) or ``"dense"`` (a 2-D dataset).
    nnz
        Stored values: non-zeros for CSR, ``n_cells * n_genes`` for dense.
    """

    format = "csr"
    backend = "hdf5"
    ndim = 2

    def __init__(
        self,
        path: Path,
        element: str,
        *,
        dataset: str,
        shape: tuple[int, int],
        dtype: Any,
        storage: str,
        nnz: int,
    ):
        if storage not in ("csr", "dense"):
            msg = f"BackedMatrix: storage must be 'csr' or 'dense', not {storage!r}"
            raise ValueError(msg)
        self.path = Path(path)
        self.element = element
        self.dataset = dataset
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = np.dtype(dtype)
        self.storage = storage
        self.nnz = int(nnz)
        self._indptr: np.ndarray | None = None
        _register_with_anndata()

    def __repr__(self) -> str:
        return (
            f"BackedMatrix({str(self.path)!r}, {self.element!r}, shape={self.shape}, "
            f"dtype={self.dtype}, storage={self.storage!r}, nnz={self.nnz})"
        )

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        msg = (
            f"dataset {self.dataset!r}: the expression matrix is on disk ({self.path}); read "
            "row blocks (czb.data.matrix.iter_row_chunks, X[rows]) or call to_memory()"
        )
        raise TypeError(msg)

    def copy(self) -> BackedMatrix:
        """Another handle on the same (read-only) matrix; nothing is read."""
        other = BackedMatrix(
            self.path, self.element, dataset=self.dataset, shape=self.shape,
            dtype=self.dtype, storage=self.storage, nnz=self.nnz,
        )
        other._indptr = self._indptr
        return other

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        """The matrix's h5py group or dataset, in a file open for this block only."""
        import h5py

        try:
            with h5py.File(self.path, "r") as f:
                yield f[self.element]
        except (DatasetError, MemoryError):
            raise
        except Exception as e:  # h5py raises OSError, KeyError, ValueError... on bad files
            raise unreadable(self.dataset, self.path, e) from e

    @property
    def indptr(self) -> np.ndarray:
        """Row pointers (``n_rows + 1`` int64; for dense storage ``i * n_cols``), read once."""
        if self._indptr is None:
            if self.storage == "csr":
                with self._open() as group:
                    self._indptr = np.asarray(group["indptr"][:], dtype=np.int64)
            else:  # dense rows: n_cols values each
                self._indptr = np.arange(self.shape[0] + 1, dtype=np.int64) * self.shape[1]
        return self._indptr

    # -- reading ------------------------------------------------------------

    def _span(self, node: Any, start: int, stop: int) -> Any:
        """Rows ``start:stop`` (``0 <= start <= stop <= n_rows``) as CSR, from an open node."""
        import scipy.sparse as sp

        n_cols = self.shape[1]
        if self.storage == "dense":
            if stop <= start:
                return sp.csr_matrix((0, n_cols), dtype=self.dtype)
            return sp.csr_matrix(np.asarray(node[start:stop]))
        indptr = self.indptr
        lo, hi = int(indptr[start]), int(indptr[stop])
        data = node["data"][lo:hi]
        indices = node["indices"][lo:hi]
        self._check_indices(indices, start, stop)
        return sp.csr_matrix(
            (data, indices, indptr[start : stop + 1] - lo), shape=(stop - start, n_cols)
        )

    def _check_indices(self, indices: np.ndarray, start: int, stop: int) -> None:
        """Column indices of rows ``start:stop`` within ``[0, n_cols)``.

        scipy does not check them, and one out of range makes later reads crash the
        process. Checking each block as it is read costs a min and a max per block, and
        :func:`~czb.data.validation.validate_dataset` reads every block before any heavy work.
        """
        if indices.size and (indices.min() < 0 or indices.max() >= self.shape[1]):
            msg = (
                f"dataset {self.dataset!r}: {self.path} holds a malformed sparse matrix at "
                f"{self.element!r} (column indices outside [0, {self.shape[1]}) in rows "
                f"{start}-{stop - 1}); the file may be corrupt"
            )
            raise DatasetError(msg)

    def iter_rows(self, chunk_rows: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(start, CSR block)`` over all rows, with one file handle for the pass.

        The file is closed when the iteration ends or the generator is closed.
        """
        if chunk_rows is None:
            chunk_rows = default_chunk_rows(self)
        n = self.shape[0]
        if self.storage == "csr":
            self.indptr  # noqa: B018 - read before the pass opens the file
        with self._open() as node:
            for start in range(0, n, chunk_rows):
                yield start, self._span(node, start, min(start + chunk_rows, n))

    def _row_positions(self, rows: Any) -> np.ndarray | slice:
        """``rows`` (int, slice, int array or bool mask) as a slice of step 1 or int64 positions."""
        n = self.shape[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return slice(start, max(start, stop))
            return np.arange(start, stop, step, dtype=np.int64)
        if isinstance(rows, (int, np.integer)):
            row = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= row < n:
                msg = f"row {rows} out of range for {n} rows"
                raise IndexError(msg)
            return slice(row, row + 1)
        index = np.asarray(rows)
        if index.dtype == bool:
            if index.shape != (n,):
                msg = f"boolean row mask of shape {index.shape} for {n} rows"
                raise IndexError(msg)
            return np.flatnonzero(index)
        if index.dtype.kind not in "iu" and index.size:
            msg = f"rows must be integers, a slice or a boolean mask, not {index.dtype}"
            raise IndexError(msg)
        index = index.astype(np.int64, copy=False).ravel()
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            msg = f"row index out of range for {n} rows"
            raise IndexError(msg)
        return index

    def _read_rows(self, rows: Any) -> Any:
        import scipy.sparse as sp

        positions = self._row_positions(rows)
        if isinstance(positions, slice):
            with self._open() as node:
                return self._span(node, positions.start, positions.stop)
        if positions.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=self.dtype)
        unique, inverse = np.unique(positions, return_inverse=True)
        # Runs of requested rows with little in between are read in one go.
        indptr = self.indptr
        skipped = indptr[unique[1:]] - indptr[unique[:-1] + 1]
        breaks = np.flatnonzero(skipped > _GAP_VALUES) + 1
        parts = []
        with self._open() as node:
            for run in np.split(unique, breaks):
                first, last = int(run[0]), int(run[-1])
                span = self._span(node, first, last + 1)
                parts.append(span if run.size == last - first + 1 else span[run - first])
        block = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
        if unique.size != positions.size or np.any(unique != positions):
            block = block[inverse.ravel()]
        return block

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple):
            if len(index) != 2:
                msg = f"a matrix takes at most 2 indices, got {len(index)}"
                raise IndexError(msg)
            rows, cols = index
        else:
            rows, cols = index, slice(None)
        block = self._read_rows(rows)
        if not (isinstance(cols, slice) and cols == slice(None)):
            block = block[:, cols]
        return block

    def to_memory(self) -> Any:
        """The whole matrix in memory as ``scipy.sparse`` CSR."""
        import scipy.sparse as sp

        if self.storage == "dense":
            parts = [block for _, block in self.iter_rows()]
            return sp.vstack(parts, format="csr") if parts else sp.csr_matrix(self.shape)
        indptr = self.indptr
        with self._open() as group:
            data, indices = group["data"][:], group["indices"][:]
        self._check_indices(indices, 0, self.shape[0])
        return sp.csr_matrix((data, indices, indptr), shape=self.shape)


def _register_with_anndata() -> None:
    """Let AnnData accept :class:`BackedMatrix` as ``X`` (a virtual ``CSRDataset``)."""
    try:
        from anndata.abc import CSRDataset  # anndata >= 0.11
    except ImportError:  # pragma: no cover - anndata 0.10
        from anndata.experimental import CSRDataset
    if not issubclass(BackedMatrix, CSRDataset):
        CSRDataset.register(BackedMatrix)
