"""Loading datasets from their specs, and checking them before any heavy work.

:func:`load_dataset` turns a :class:`~czb.runner.specs.DatasetSpec` into a
:class:`Dataset` whose ``adata.X`` is the expression matrix the spec names;
:func:`validate_dataset` checks that it fits its spec and raises a one-line
:class:`~czb.errors.DatasetError` naming the dataset, the key and what was found.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.errors import DatasetError, DatasetWarning
from czb.runner.hdf5_checks import (
    NUMERIC_KINDS,
    FileCheck,
    check_array,
    check_element,
    check_group,
    check_links,
    check_sparse_group,
    read_error_cause,
    sparse_format,
    unreadable_file,
)
from czb.runner.specs import ORGANISMS, DatasetSpec

if TYPE_CHECKING:
    import anndata
    import pandas as pd

__all__ = [
    "BACKED_MIN_VALUES",
    "BUILTINS",
    "BackedMatrix",
    "Dataset",
    "ensembl_share",
    "iter_row_chunks",
    "load_dataset",
    "row_sums",
    "stored_values",
    "to_memory",
    "validate_dataset",
]


@dataclass
class Dataset:
    """A dataset ready for a model and the tasks.

    What is in memory: ``obs`` and ``var`` always. The expression matrix is in memory
    for generated data and for files whose matrix stores at most
    :data:`BACKED_MIN_VALUES` values (20M: ~160 MB as CSR); larger ones (or any file
    loaded with ``backed=True``) stay on disk as a :class:`BackedMatrix`, which opens
    the file for each read and closes it after (no handle is held between reads, so
    nothing needs closing). Everything that reads it goes through row chunks
    (:func:`iter_row_chunks`, ``X[rows]``): validation, the PCA baselines (streamed
    above a size, see :mod:`czb.runner.embeddings`), model input files, task
    expression; only perturbation-prediction data (``perturbation_data``) and
    :meth:`BackedMatrix.to_memory` read the whole matrix. A CSR or dense matrix on
    disk is read as it is; a large CSC (column-major) matrix, whose rows cannot be
    read without reading all of it, is rewritten once as CSR into the cache with a
    :class:`~czb.errors.DatasetWarning` (small ones are read into memory and
    converted, as before).

    Attributes
    ----------
    spec
        The spec it was loaded from.
    adata
        ``AnnData`` whose ``X`` is the expression matrix of shape ``(n_cells, n_genes)``
        (sparse CSR where the file is sparse, never densified here; or a
        :class:`BackedMatrix`, see above), of the kind ``spec.expression`` says, with
        ``var_names`` the gene IDs of ``spec.gene_id_type`` and ``obs_names`` the cell IDs.
    path
        The local file it was read from (``None`` for generated data).
    sha256
        Checksum of that file as read (computed from its bytes, or remembered while its
        size, times and inode are unchanged; never copied from the spec), or of the
        generator's parameters for generated data.
    extras
        Notes from loading, e.g. ``gene_source`` (where the gene IDs came from:
        ``"var_names"`` or ``"var['<column>']"``) and ``layer``.
    """

    spec: DatasetSpec
    adata: anndata.AnnData
    path: Path | None = None
    sha256: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n_cells(self) -> int:
        return self.adata.n_obs

    @property
    def backed(self) -> bool:
        """Whether the expression matrix is on disk (a :class:`BackedMatrix`)."""
        return isinstance(self.adata.X, BackedMatrix)

    @property
    def n_genes(self) -> int:
        return self.adata.n_vars

    @cached_property
    def labels(self) -> np.ndarray:
        """Cell labels from ``obs[spec.label_key]``: ``(n_cells,)`` object array of
        strings, ``None`` for a cell without one (NaN, ``None``, empty text:
        :func:`~czb.evaluation.applicability.missing_mask`), never the text ``"nan"``."""
        return self._annotation([self.spec.label_key])

    @cached_property
    def batches(self) -> np.ndarray | None:
        """Batch labels (several batch columns joined with ``"|"``; ``None`` for a cell
        missing any of them), or ``None`` for a dataset without batches."""
        keys = self.spec.batch_keys
        return self._annotation(keys) if keys else None

    def _annotation(self, keys: list[str]) -> np.ndarray:
        from czb.evaluation.applicability import missing_mask

        missing = np.zeros(self.n_cells, dtype=bool)
        out = None
        for key in keys:
            column = self.adata.obs[key]
            missing |= missing_mask(column)
            text = column.astype(str).to_numpy().astype(object)
            out = text if out is None else out + "|" + text
        out[missing] = None
        return out

    @cached_property
    def controls(self) -> np.ndarray | None:
        """``(n_cells,)`` bool control flags of a perturbation screen, or ``None``.

        From ``obs[control_key]`` when the spec names it (bool, 0/1, or
        ``true``/``false`` strings in any case; anything else is an error), else cells
        whose label (``condition`` role when mapped, else ``label_key``) equals
        ``control_label``.
        """
        spec = self.spec
        if spec.control_key is not None:
            return parse_control_flags(self.adata.obs[spec.control_key], name=self.name, key=spec.control_key)
        if spec.control_label is not None:
            key = spec.extra_keys.get("condition", spec.label_key)
            return self.adata.obs[key].astype(str).to_numpy() == spec.control_label
        return None

    def gene_symbols(self) -> np.ndarray | None:
        """Gene symbols of the var axis: ``var_names`` for symbol datasets, else a symbol
        var column (:data:`czb.runner.genes.SYMBOL_COLUMNS`), else ``None``."""
        from czb.runner.genes import SYMBOL_COLUMNS

        if self.spec.gene_id_type == "symbol" and self.spec.gene_key is None:
            return self.adata.var_names.astype(str).to_numpy()
        for column in ((self.spec.gene_key,) if self.spec.gene_id_type == "symbol" else ()) + SYMBOL_COLUMNS:
            if column is not None and column in self.adata.var.columns:
                return self.adata.var[column].astype(str).to_numpy()
        return None

    def role(self, role: str) -> np.ndarray | None:
        """Values of an extra role (``time_point``, ``donor``, ``species``...) or ``None``.

        ``species`` falls back to the spec's organism for every cell when the spec
        maps no obs column to it (a dataset holds one species unless it says otherwise).
        A role with a declared ``label_order`` comes back as integer ranks in that order.
        """
        key = self.spec.extra_keys.get(role)
        if key is None:
            if role == "species":
                return np.full(self.n_cells, self.spec.organism, dtype=object)
            return None
        values = self.adata.obs[key].to_numpy()
        order = self.spec.label_order.get(role)
        if order is None:
            return values
        # Declared order: string labels become their rank (0, 1, ...), so ordered tasks
        # (sequential organization) can compare them.
        rank = {label: i for i, label in enumerate(order)}
        text = np.asarray(values).astype(str)
        unknown = sorted(str(t) for t in set(text) - set(rank))
        if unknown:
            msg = (
                f"dataset {self.name!r}: obs[{key!r}] has values {unknown[:5]} that are not in "
                f"label_order[{role!r}] ({', '.join(order)})"
            )
            raise DatasetError(msg)
        return np.array([rank[t] for t in text], dtype=np.int64)


_TRUE = {"true", "1", "yes", "t"}
_FALSE = {"false", "0", "no", "f"}


def parse_control_flags(column: pd.Series, *, name: str, key: str) -> np.ndarray:
    """A control-flag obs column as bool: real booleans, 0/1, or true/false strings.

    Strings are compared case-insensitively to both spellings, so a bool column is
    never compared to the string "true" (Tx-Evaluation's recall let every control
    through that way).
    """
    if column.isna().any():
        msg = f"dataset {name!r}: control_key {key!r} has {int(column.isna().sum())} missing values"
        raise DatasetError(msg)
    values = column.to_numpy()
    if values.dtype == bool:
        return values
    if np.issubdtype(values.dtype, np.number):
        bad = sorted(set(np.unique(values).tolist()) - {0, 1})
        if bad:
            msg = f"dataset {name!r}: control_key {key!r} must hold 0/1 or true/false; found {bad[:5]}"
            raise DatasetError(msg)
        return values.astype(bool)
    text = np.char.lower(values.astype(str))
    bad = sorted(set(np.unique(text).tolist()) - _TRUE - _FALSE)
    if bad:
        msg = f"dataset {name!r}: control_key {key!r} must hold booleans or true/false; found {bad[:5]}"
        raise DatasetError(msg)
    return np.isin(text, list(_TRUE))


# --------------------------------------------------------------------------- #
# Chunked access to an expression matrix (sparse or dense, in memory or on disk)
# --------------------------------------------------------------------------- #

#: Rows per chunk when a caller asks for a fixed number (kept for callers that pass it).
DEFAULT_CHUNK_ROWS = 2048
#: Stored values per chunk when the rows per chunk are left to :func:`default_chunk_rows`:
#: 4M values are 32 MB as float64, whatever the number of genes.
CHUNK_VALUES = 1 << 22
#: Matrices of files on disk storing more values than this (non-zeros of sparse matrices,
#: every entry of dense ones) are left on disk by :func:`load_dataset`: 20M values are
#: about 160 MB as float32 CSR in memory.
BACKED_MIN_VALUES = 20_000_000
#: Stored values per band when a column-major (CSC) file is rewritten row-major: the
#: conversion holds one band in memory (about 12 bytes per value) and reads the file
#: once per band.
CSC_BAND_VALUES = 1 << 26
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


def _unreadable(dataset: str, path: Path, e: BaseException) -> DatasetError:
    return unreadable_file(f"dataset {dataset!r}", path, e)


class BackedMatrix:
    """An expression matrix left in its .h5ad file and read in row blocks on demand.

    What :func:`load_dataset` puts in ``Dataset.adata.X`` for large files (see
    :class:`Dataset`). The file is opened for each read (about 0.3 ms) and closed right
    after, or once for a whole :meth:`iter_rows` pass, so no file handle outlives a
    read; the object holds the path, the shape, and the row pointers (``indptr``,
    ``n_rows + 1`` int64, read on first use).

    Row blocks always come back as ``scipy.sparse`` CSR matrices of the file's dtype,
    whatever the storage: a CSR group is sliced (``data``/``indices`` between two row
    pointers), a dense dataset's rows are read and sparsified block by block. Reading
    errors (a corrupt or truncated file) raise :class:`~czb.errors.DatasetError`.

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
            "row blocks (czb.runner.datasets.iter_row_chunks, X[rows]) or call to_memory()"
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
            raise _unreadable(self.dataset, self.path, e) from e

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
        :func:`validate_dataset` reads every block before any heavy work.
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


# --------------------------------------------------------------------------- #
# Gene identifiers
# --------------------------------------------------------------------------- #

# An Ensembl gene ID is its organism's prefix followed directly by digits (11 for
# vertebrates), optionally with a version. Requiring the digits matters: human
# 'ENSG' is also the start of gorilla 'ENSGGOG' and chicken 'ENSGALG' IDs.
_ANY_ENSEMBL = re.compile(r"^(?:ENS[A-Z]*G\d{6,}|FBgn\d{5,}|WBGene\d{5,})(?:\.\d+)?$")
_PREFIX_PATTERNS = {
    name: re.compile(rf"^{re.escape(o.ensembl_prefix)}\d{{5,}}(?:\.\d+)?$")
    for name, o in ORGANISMS.items()
}
#: Share of gene IDs that must fit the organism's Ensembl prefix.
MIN_ENSEMBL_SHARE = 0.9
#: Genes looked at when guessing what gene IDs are (enough for a stable share).
_GENE_SAMPLE = 5000


def _gene_sample(names: Iterable[str]) -> list[str]:
    names = list(names)
    if len(names) <= _GENE_SAMPLE:
        return names
    step = len(names) / _GENE_SAMPLE
    return [names[int(i * step)] for i in range(_GENE_SAMPLE)]


def _share(pattern: re.Pattern, names: list[str]) -> float:
    return sum(bool(pattern.match(n)) for n in names) / max(len(names), 1)


def ensembl_share(names: Iterable[str], organism: str) -> float:
    """Share of ``names`` that are Ensembl gene IDs of ``organism`` (``0..1``)."""
    return _share(_PREFIX_PATTERNS[organism], _gene_sample(str(n) for n in names))


def _examples(names: Iterable[str], k: int = 2) -> str:
    return ", ".join(repr(n) for n in list(names)[:k])


def _describe_gene_ids(names: list[str]) -> str:
    """What the gene IDs look like, for error messages ('mouse Ensembl IDs', ...)."""
    best, best_share = None, 0.0
    for organism, pattern in _PREFIX_PATTERNS.items():
        share = _share(pattern, names)
        if share > best_share:
            best, best_share = organism, share
    if best is not None and best_share >= 0.5:
        matching = [n for n in names if _PREFIX_PATTERNS[best].match(n)]
        prefix = ORGANISMS[best].ensembl_prefix
        return f"look like {best} Ensembl IDs ({prefix}..., e.g. {_examples(matching)})"
    if _share(_ANY_ENSEMBL, names) >= 0.5:
        matching = [n for n in names if _ANY_ENSEMBL.match(n)]
        return (
            f"look like Ensembl IDs of an organism czb does not know (e.g. {_examples(matching)})"
        )
    others = [n for n in names if not _ANY_ENSEMBL.match(n)]
    return f"look like gene symbols (e.g. {_examples(others)})"


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #

#: ``builtin:NAME`` → (package, path of the file inside the package).
BUILTINS: dict[str, tuple[str, str]] = {
    "scanpy/pbmc68k_reduced": ("scanpy", "datasets/10x_pbmc68k_reduced.h5ad"),
}


def _builtin_path(name: str, dataset: str) -> Path:
    """Path of a file shipped inside an installed package, found without importing it."""
    import importlib.util

    if name in BUILTINS:
        package, inner = BUILTINS[name]
    else:  # builtin:PACKAGE/PATH/INSIDE/IT
        package, _, inner = name.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        msg = (
            f"dataset {dataset!r}: builtin:{name} needs the package {package!r}, "
            "which is not installed"
        )
        raise DatasetError(msg)
    for location in spec.submodule_search_locations:
        path = Path(location) / inner
        if path.is_file():
            return path
    msg = (
        f"dataset {dataset!r}: builtin:{name} not found in the installed {package!r} "
        f"(looked for {inner}); known builtins: {', '.join(sorted(BUILTINS))}"
    )
    raise DatasetError(msg)


def _generator_digest(name: str, params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a generator's name and its full arguments."""
    payload = json.dumps(
        {"generator": name, "params": params}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _generator(spec: DatasetSpec, name: str) -> tuple[Any, str]:
    """The generator of a ``synthetic:NAME`` dataset and the digest of its full arguments."""
    import inspect

    from czb.runner.synthetic import GENERATORS, check_params

    try:
        generator = GENERATORS[name]
    except KeyError:
        known = ", ".join(sorted(GENERATORS))
        msg = f"dataset {spec.name!r}: unknown synthetic generator {name!r}; known: {known}"
        raise DatasetError(msg) from None
    try:
        bound = inspect.signature(generator).bind(**spec.params)
    except TypeError as e:
        msg = f"dataset {spec.name!r}: bad params for synthetic:{name}: {e}"
        raise DatasetError(msg) from None
    # Hash the arguments with defaults filled in, so that spelling out a default
    # gives the same digest and changing a default gives a new one.
    bound.apply_defaults()
    try:
        check_params(name, dict(bound.arguments))  # types, ranges and size, before any work
    except ValueError as e:
        msg = f"dataset {spec.name!r}: bad params for synthetic:{name}: {e}"
        raise DatasetError(msg) from None
    return generator, _generator_digest(name, dict(bound.arguments))


def synthetic_digest(spec: DatasetSpec) -> str:
    """The sha256 a ``synthetic:`` dataset is identified by, without generating it."""
    return _generator(spec, spec.uri.removeprefix("synthetic:"))[1]


def builtin_path(spec: DatasetSpec) -> Path:
    """The file of a ``builtin:`` dataset."""
    return _builtin_path(spec.uri.removeprefix("builtin:"), spec.name)


def _generate(spec: DatasetSpec, name: str) -> tuple[anndata.AnnData, str]:
    generator, digest = _generator(spec, name)
    try:
        adata = generator(**spec.params)
    except ValueError as e:
        msg = f"dataset {spec.name!r}: synthetic:{name} rejected its params: {e}"
        raise DatasetError(msg) from None
    return adata, digest


@contextlib.contextmanager
def _quiet_anndata() -> Iterator[None]:
    """Silence anndata's warnings that the user cannot act on, or that czb reports itself.

    Old-format files (like scanpy's pbmc68k_reduced) make anndata emit Future- and
    OldFormatWarnings; non-unique names are reported by :func:`load_dataset` in czb's words.
    """
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter(
            "ignore", getattr(anndata, "OldFormatWarning", PendingDeprecationWarning)
        )
        warnings.filterwarnings(
            "ignore", message=r"(Observation|Variable) names are not unique", category=UserWarning
        )
        yield


def _read_elem_function() -> Any:
    try:
        from anndata.io import read_elem  # anndata >= 0.11
    except ImportError:  # pragma: no cover - anndata 0.10
        from anndata.experimental import read_elem
    return read_elem


def _read_h5ad(
    path: Path, layer: str, dataset: str, *, backed: bool | None = None, digest: str | None = None
) -> anndata.AnnData:
    """Read an .h5ad file: obs, var and the matrix that ``layer`` names (in memory or backed).

    Files written by anndata >= 0.7 are read element by element so that unused
    layers, ``obsm`` and ``uns`` never reach memory; the matrix itself is read into
    memory or left on disk as a :class:`BackedMatrix` (see :func:`load_dataset` for the
    policy). Older files are read whole. Whatever is read is checked first (see
    :func:`check_h5ad_structure`): sizes against what the file stores, and the
    structure of sparse matrices, so that a corrupt or forged file is one
    :class:`~czb.errors.DatasetError`, never a crash or a runaway allocation.
    """
    import anndata
    import h5py

    label = f"dataset {dataset!r}"
    try:
        with h5py.File(path, "r") as f, _quiet_anndata():
            file_size = Path(path).stat().st_size
            if f.attrs.get("encoding-type") != "anndata":
                # anndata < 0.7 files are read whole: check every element of them first.
                check_group(f, FileCheck(path, label, file_size))
                return anndata.read_h5ad(path)
            check = FileCheck(path, label, file_size)
            for element in ("obs", "var"):
                if element not in f:
                    msg = f"{label}: {path} has no {element!r} element; it is not an AnnData (.h5ad) file"
                    raise DatasetError(msg)
                check_element(f, element, check)
            obs = _read_element(f, "obs", path=path, name=label)
            layers = f.get("layers", {})
            # What the file offers, so that _select can list it when `layer` is missing.
            available = ["X"] * ("X" in f) + ["raw"] * ("raw" in f) + list(layers)
            var = _read_element(f, "var", path=path, name=label)
            adata = anndata.AnnData(obs=obs, var=var)
            adata.uns["_czb_available"] = available
            matrix_args = {"backed": backed, "digest": digest, "file_size": file_size}
            if layer == "raw" and "raw" in f:
                check_element(f, "raw/var", check)
                raw_var = _read_element(f, "raw/var", path=path, name=label)
                matrix = _read_matrix(f, "raw/X", path, dataset, **matrix_args)
                _check_shape(matrix, "raw/X", obs, raw_var, path=path, name=label)
                adata.raw = anndata.AnnData(X=matrix, obs=obs, var=raw_var)
            elif layer == "X" and "X" in f:
                matrix = _read_matrix(f, "X", path, dataset, **matrix_args)
                _check_shape(matrix, "X", obs, var, path=path, name=label)
                adata.X = matrix
            elif layer in layers:
                element = f"layers/{layer}"
                matrix = _read_matrix(f, element, path, dataset, **matrix_args)
                _check_shape(matrix, element, obs, var, path=path, name=label)
                adata.layers[layer] = matrix
            return adata
    except (DatasetError, MemoryError):
        raise
    except Exception as e:  # h5py/anndata raise OSError, KeyError, ValueError... on bad files
        raise _unreadable(dataset, path, e) from e


def _read_element(f: Any, element: str, *, path: Path, name: str) -> Any:
    """``read_elem`` of one (checked) element, its failures named by the element."""
    try:
        return _read_elem_function()(f[element])
    except (DatasetError, MemoryError):
        raise
    except Exception as e:  # anndata/h5py/pandas raise anything on a malformed element
        msg = (
            f"{name}: cannot read element {element!r} of {path} ({read_error_cause(e)}); "
            "the file may be corrupt or truncated"
        )
        raise DatasetError(msg) from e


def _check_shape(matrix: Any, element: str, obs: Any, var: Any, *, path: Path, name: str) -> None:
    """The matrix has one row per obs row and one column per var row."""
    shape = tuple(int(s) for s in getattr(matrix, "shape", ()))
    if len(shape) != 2 or shape != (len(obs), len(var)):
        msg = (
            f"{name}: {path}: matrix {element!r} has shape {shape}, but obs has {len(obs)} rows "
            f"and var {len(var)}; the file may be corrupt"
        )
        raise DatasetError(msg)


def _read_matrix(
    f: Any,
    element: str,
    path: Path,
    dataset: str,
    *,
    backed: bool | None,
    digest: str | None,
    file_size: int,
) -> Any:
    """The matrix at ``element``, checked: read into memory, or a :class:`BackedMatrix`.

    Sparse matrices read into memory are checked in full first (row pointers and every
    column index, read in chunks); those left on disk get the same check of their row
    pointers here and of their column indices block by block as they are read
    (:meth:`BackedMatrix._check_indices`), which :func:`validate_dataset` does for all
    blocks before any heavy work. A CSC matrix is checked in full before it is rewritten.
    """
    import h5py

    label = f"dataset {dataset!r}"
    check = FileCheck(path, label, file_size)
    check_links(f, element, check)
    node = f[element]
    layout = sparse_format(node) if isinstance(node, h5py.Group) else None
    if layout is not None:
        storage = layout[0]
        data = node.get("data")
        claimed = int(data.shape[0]) if isinstance(data, h5py.Dataset) and data.ndim == 1 else 0
        lazy = backed if backed is not None else claimed > BACKED_MIN_VALUES
        check.check_indices = not lazy or storage == "csc"
        storage, shape, indptr = check_sparse_group(node, check)
        nnz, dtype = int(indptr[-1]), node["data"].dtype
    elif isinstance(node, h5py.Dataset) and node.ndim == 2:
        check_array(node, check)
        if node.dtype.kind not in NUMERIC_KINDS:
            msg = f"{label}: {path}: matrix {element!r} does not hold numbers (dtype {node.dtype})"
            raise DatasetError(msg)
        storage, shape, dtype, indptr = "dense", node.shape, node.dtype, None
        nnz = int(shape[0]) * int(shape[1])
        lazy = backed if backed is not None else nnz > BACKED_MIN_VALUES
    else:  # anything else (a 1-D array, an unknown encoding): anndata reads it or says why
        check_element(f, element, check)
        return _read_element(f, element, path=path, name=label)
    if not lazy:
        return _read_element(f, element, path=path, name=label)
    if storage == "csc":
        path, element = _row_major_copy(node, path, element, dataset, shape=shape, digest=digest)
        storage, indptr = "csr", None
    matrix = BackedMatrix(
        path, element, dataset=dataset, shape=shape, dtype=dtype, storage=storage, nnz=nnz
    )
    if indptr is not None:
        matrix._indptr = indptr  # already read and checked
    return matrix


def _row_major_copy(
    node: Any, path: Path, element: str, dataset: str, *, shape: tuple[int, int], digest: str | None
) -> tuple[Path, str]:
    """A row-major (CSR) copy of a CSC matrix in the cache, made once; its path and element.

    Reading rows of a column-major matrix means reading all of it, so a large CSC
    matrix is rewritten once into ``<cache>/row_major/<sha256>-<element>.h5`` (same
    values, CSR) with a :class:`~czb.errors.DatasetWarning`; later loads of the same
    file reuse the copy.
    """
    import h5py

    from czb.settings import get_settings

    key = digest or hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()
    out = get_settings().cache_dir / "row_major" / f"{key}-{element.replace('/', '_')}.h5"
    nnz = int(node["data"].shape[0])
    if out.is_file():
        try:
            with h5py.File(out, "r") as f:
                group = f["X"]
                if tuple(group.attrs["shape"]) == tuple(shape) and group["data"].shape[0] == nnz:
                    return out, "X"
        except Exception:  # noqa: S110 - an unusable copy is made again below
            pass
    warnings.warn(
        f"dataset {dataset!r}: the matrix {element!r} of {path} is stored column-major (CSC), "
        f"which cannot be read by rows; rewriting it row-major once into {out} "
        f"({nnz} values, about {nnz * 8 / 1e9:.2g} GB); later loads reuse it. "
        "Store the matrix as CSR to skip this",
        DatasetWarning,
        stacklevel=5,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        _csc_to_csr(node, tmp, shape=shape)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        msg = (
            f"dataset {dataset!r}: cannot rewrite {element!r} of {path} row-major into {out} "
            f"({read_error_cause(e)})"
        )
        raise DatasetError(msg) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out, "X"


def _csc_to_csr(
    node: Any,
    out_path: Path,
    *,
    shape: tuple[int, int],
    band_values: int | None = None,
    chunk_values: int | None = None,
) -> None:
    """Write the CSC group ``node`` as a CSR group ``X`` of a new HDF5 file, out of core.

    One pass counts the values of each row; the rows are then cut into bands of at
    most ``band_values`` values (:data:`CSC_BAND_VALUES`), and for each band the whole
    matrix is read once, column block by column block, placing the band's values at
    their row-major positions (columns come in increasing order, so every row ends up
    sorted). Memory: one band plus one column block.
    """
    import h5py

    band_values = band_values or CSC_BAND_VALUES
    chunk_values = chunk_values or CHUNK_VALUES
    n_rows, n_cols = shape
    col_ptr = np.asarray(node["indptr"][:], dtype=np.int64)
    data_in, rows_in = node["data"], node["indices"]
    nnz = int(col_ptr[-1])
    counts = np.zeros(n_rows, dtype=np.int64)
    for lo in range(0, nnz, chunk_values):
        counts += np.bincount(rows_in[lo : lo + chunk_values], minlength=n_rows)
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])

    def cuts(ptr: np.ndarray, size: int) -> list[tuple[int, int]]:
        """Consecutive ranges of ptr's slots holding about ``size`` values (at least one slot)."""
        out, start, n = [], 0, len(ptr) - 1
        while start < n:
            stop = int(np.searchsorted(ptr, ptr[start] + size, side="right")) - 1
            stop = min(max(stop, start + 1), n)
            out.append((start, stop))
            start = stop
        return out

    column_blocks = cuts(col_ptr, chunk_values)
    index_dtype = np.int32 if n_cols < 2**31 else np.int64
    with h5py.File(out_path, "w") as f:
        group = f.create_group("X")
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        group.create_dataset("indptr", data=row_ptr)
        data_out = group.create_dataset("data", shape=(nnz,), dtype=data_in.dtype)
        cols_out = group.create_dataset("indices", shape=(nnz,), dtype=index_dtype)
        for r0, r1 in cuts(row_ptr, band_values):
            base, size = int(row_ptr[r0]), int(row_ptr[r1] - row_ptr[r0])
            if size == 0:
                continue
            band_data = np.empty(size, dtype=data_in.dtype)
            band_cols = np.empty(size, dtype=index_dtype)
            fill = row_ptr[r0:r1] - base  # next free slot of each row of the band
            for c0, c1 in column_blocks:
                lo, hi = int(col_ptr[c0]), int(col_ptr[c1])
                rows = rows_in[lo:hi]
                mask = (rows >= r0) & (rows < r1)
                if not mask.any():
                    continue
                local = rows[mask].astype(np.int64) - r0
                values = data_in[lo:hi][mask]
                per_column = np.diff(col_ptr[c0 : c1 + 1])
                cols = np.repeat(np.arange(c0, c1, dtype=np.int64), per_column)[mask]
                order = np.argsort(local, kind="stable")  # column order kept within a row
                local, values, cols = local[order], values[order], cols[order]
                rank = np.arange(local.size) - np.searchsorted(local, local, side="left")
                where = fill[local] + rank
                band_data[where] = values
                band_cols[where] = cols
                fill += np.bincount(local, minlength=r1 - r0)
            data_out[base : base + size] = band_data
            cols_out[base : base + size] = band_cols


def _select(adata: anndata.AnnData, spec: DatasetSpec) -> tuple[anndata.AnnData, str]:
    """A fresh AnnData with ``X`` = the spec's matrix, obs copied, var_names = gene IDs."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    layer = spec.layer
    if layer == "X":
        X, var = adata.X, adata.var
        if X is None:
            msg = (
                f"dataset {spec.name!r}: layer 'X' is empty in the file; "
                f"available layers: {_layer_names(adata)}"
            )
            raise DatasetError(msg)
    elif layer == "raw":
        if adata.raw is None:
            msg = (
                f"dataset {spec.name!r}: layer 'raw' requested but the file has no .raw; "
                f"available layers: {_layer_names(adata)}"
            )
            raise DatasetError(msg)
        X, var = adata.raw.X, adata.raw.var
    else:
        if layer not in adata.layers:
            msg = (
                f"dataset {spec.name!r}: layer {layer!r} not in the file; "
                f"available layers: {_layer_names(adata)}"
            )
            raise DatasetError(msg)
        X, var = adata.layers[layer], adata.var

    if isinstance(X, BackedMatrix):
        pass  # stays on disk; repeated entries of a row add up, as scipy defines them
    elif sp.issparse(X):
        if X.format != "csr":
            X = sp.csr_matrix(X)  # CSR: fast row access for chunked checks and models
        if not X.has_canonical_format:
            # Unsorted or repeated column indices are valid CSR (repeats add up); one
            # entry per gene, in order, is what models and the value checks expect.
            X.sum_duplicates()  # in place: the file's AnnData is dropped after _select
    else:
        X = np.asarray(X)

    gene_ids, source = _gene_ids(var, spec)
    new_var = var.copy()
    if source != "var_names":
        # Keep the other kind of ID the var_names held (cz-benchmarks files: symbols as
        # var_names, Ensembl IDs in a column), so models reading symbols need no table.
        other = "gene_symbol" if spec.gene_id_type == "ensembl" else "ensembl_id"
        if other not in new_var.columns:
            new_var[other] = var.index.astype(str).to_numpy()
    new_var.index = pd.Index(gene_ids, name=None)
    obs = adata.obs.copy()
    obs.index = pd.Index(obs.index.astype(str), name=None)
    with _quiet_anndata():
        out = ad.AnnData(X=X, obs=obs, var=new_var)
    return out, source


def _layer_names(adata: anndata.AnnData) -> str:
    names = adata.uns.get("_czb_available")
    if names is None:
        names = (
            ["X"] * (adata.X is not None) + ["raw"] * (adata.raw is not None) + list(adata.layers)
        )
    return ", ".join(repr(n) for n in names) or "none"


def _gene_ids(var: pd.DataFrame, spec: DatasetSpec) -> tuple[list[str], str]:
    """Gene IDs from ``var[spec.gene_key]`` (or var_names), and where they came from."""
    key = spec.gene_key
    # cz-benchmarks' convention: symbols as var_names, Ensembl IDs in var['ensembl_id'].
    if (
        key is None
        and spec.gene_id_type == "ensembl"
        and "ensembl_id" in var.columns
        and ensembl_share(var.index.astype(str), spec.organism) < MIN_ENSEMBL_SHARE
        and ensembl_share(var["ensembl_id"].astype(str), spec.organism) >= MIN_ENSEMBL_SHARE
    ):
        key = "ensembl_id"
    if key is None:
        return [str(n) for n in var.index], "var_names"
    if key not in var.columns:
        msg = (
            f"dataset {spec.name!r}: gene_key {key!r} is not a var column; "
            f"available: {_available(key, var.columns)}"
        )
        raise DatasetError(msg)
    values = var[key]
    missing = values.isna().to_numpy()
    ids = values.astype(str).to_numpy(dtype=object)
    if missing.any():
        # Keep the gene (and the matrix shape) under its original name rather than 'nan'.
        ids[missing] = var.index.astype(str).to_numpy()[missing]
        warnings.warn(
            f"dataset {spec.name!r}: {int(missing.sum())} genes have no value in var[{key!r}]; "
            "they keep their var_names",
            DatasetWarning,
            stacklevel=4,
        )
    return [str(i) for i in ids], f"var[{key!r}]"


def load_dataset(
    spec: DatasetSpec,
    *,
    offline: bool | None = None,
    progress: bool = False,
    backed: bool | None = None,
) -> Dataset:
    """Load the dataset a spec describes.

    ``uri`` schemes:

    - ``builtin:NAME``: a file shipped inside an installed package (see
      :data:`BUILTINS`; ``builtin:PACKAGE/PATH`` for any other), never downloaded;
    - ``synthetic:GENERATOR``: ``GENERATORS[GENERATOR](**spec.params)`` from
      :mod:`czb.runner.synthetic`; ``sha256`` is that of the canonical JSON of the
      generator name and its arguments (defaults filled in);
    - anything else (local path, ``file://``, ``https://``, ``s3://``) goes through
      :func:`czb.runner.fetch.fetch`, which verifies ``spec.sha256`` when set.

    The matrix named by ``spec.layer`` (``X``, ``raw`` or a layer) becomes ``X`` of
    a fresh AnnData (sparse input is kept sparse, as CSR), with ``obs`` copied and
    ``var_names`` the gene IDs (``var[spec.gene_key]`` when set). When the spec
    declares Ensembl IDs without a ``gene_key`` and the var_names are not Ensembl
    IDs but a ``var['ensembl_id']`` column holds them (cz-benchmarks' convention),
    that column is used. Duplicated gene IDs are made unique with a
    :class:`~czb.errors.DatasetWarning`.

    obs and var are always read into memory. The matrix of a file stays on disk (a
    :class:`BackedMatrix`, read in row chunks when needed) when it stores more than
    :data:`BACKED_MIN_VALUES` values, or whenever ``backed=True``; see :class:`Dataset`.

    Parameters
    ----------
    spec
        The dataset's spec.
    offline
        Never touch the network (default: the ``CZB_OFFLINE`` setting).
    progress
        Show a download progress bar.
    backed
        ``None`` (default): leave large matrices on disk, read small ones;
        ``True``: always leave the matrix on disk; ``False``: always read it into
        memory. Generated (``synthetic:``) data and files in anndata's pre-0.7 format
        are always in memory.

    Returns
    -------
    The :class:`Dataset`; call :func:`validate_dataset` on it before heavy work.

    Raises
    ------
    DatasetError
        Unknown builtin or generator, generator parameters of the wrong type or size,
        unreadable file (not HDF5, corrupt, truncated or forged: sizes it does not store,
        a malformed sparse matrix, links or storage in other files; see
        :func:`check_h5ad_structure`; the column indices of a backed matrix are checked
        as its blocks are read, by :func:`validate_dataset`), missing layer or gene_key,
        a matrix whose shape does not fit obs and var, duplicated cell IDs.
    FetchError
        The file cannot be downloaded, or is not cached while offline.
    """
    uri = spec.uri
    path: Path | None = None
    if uri.startswith("synthetic:"):
        adata, digest = _generate(spec, uri.removeprefix("synthetic:"))
    else:
        from czb.runner import fetch as fetch_module

        if uri.startswith("builtin:"):
            path = _builtin_path(uri.removeprefix("builtin:"), spec.name)
            digest = fetch_module.known_sha256(path)
            if spec.sha256 is not None and digest != spec.sha256:
                msg = (
                    f"dataset {spec.name!r}: {path} has sha256 {digest}, "
                    f"but the spec expects {spec.sha256}"
                )
                raise DatasetError(msg)
        else:
            path = Path(
                fetch_module.fetch(uri, sha256=spec.sha256, offline=offline, progress=progress)
            )
            # The digest of the file as it is now (fetch just checked it against the spec's),
            # never the spec's own: the record says what was actually read.
            digest = fetch_module.known_sha256(path)
        adata = _read_h5ad(path, spec.layer, spec.name, backed=backed, digest=digest)

    selected, gene_source = _select(adata, spec)
    del adata  # drop unused layers before anything else allocates

    if not selected.obs_names.is_unique:
        dup = selected.obs_names[selected.obs_names.duplicated()].unique()
        msg = (
            f"dataset {spec.name!r}: {len(dup)} cell IDs occur more than once in obs_names "
            f"(e.g. {_examples(dup, 3)}); cell IDs must be unique to match embeddings to cells"
        )
        raise DatasetError(msg)
    if not selected.var_names.is_unique:
        n_dup = int(selected.var_names.duplicated().sum())
        warnings.warn(
            f"dataset {spec.name!r}: {n_dup} duplicated gene IDs in {gene_source} "
            f"(e.g. {_examples(selected.var_names[selected.var_names.duplicated()].unique())}); "
            "made unique by appending '-1', '-2', ...",
            DatasetWarning,
            stacklevel=2,
        )
        selected.var_names_make_unique()

    extras = {"gene_source": gene_source, "layer": spec.layer}
    return Dataset(spec=spec, adata=selected, path=path, sha256=digest, extras=extras)


# --------------------------------------------------------------------------- #
# Validation
# --------------------------------------------------------------------------- #

#: Roles every spec fills without extra_keys.
_BUILTIN_ROLES = {"label", "batch", "species"}
#: Rows sampled to decide whether values are integers.
_INTEGER_CHECK_ROWS = 2000
#: Above this maximum, non-integer data are normalised but not log-transformed.
_LOG_MAX = 30.0


def _available(key: str, columns: Iterable[Any], *, limit: int = 12) -> str:
    """Columns as a string, the closest matches to ``key`` first."""
    columns = [str(c) for c in columns]
    if not columns:
        return "none"
    close = difflib.get_close_matches(key, columns, n=5, cutoff=0.4)
    lowered = [c for c in columns if c not in close and key.lower() in c.lower()]
    ordered = close + lowered + sorted(c for c in columns if c not in close and c not in lowered)
    shown = ", ".join(repr(c) for c in ordered[:limit])
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"{shown}{more}"


def _check_obs_keys(ds: Dataset) -> None:
    spec, obs = ds.spec, ds.adata.obs
    wanted = [("label_key", spec.label_key)]
    wanted += [("batch_key", k) for k in spec.batch_keys]
    wanted += [(f"extra_keys.{role}", k) for role, k in spec.extra_keys.items()]
    if spec.control_key is not None:
        wanted.append(("control_key", spec.control_key))
    for what, key in wanted:
        if key not in obs.columns:
            msg = (
                f"dataset {ds.name!r}: {what} {key!r} is not an obs column; "
                f"available: {_available(key, obs.columns)}"
            )
            raise DatasetError(msg)
    n_missing = sum(label is None for label in ds.labels)
    if n_missing:
        warnings.warn(
            f"dataset {ds.name!r}: {n_missing} of {ds.n_cells} cells have no value in label_key "
            f"{spec.label_key!r}; tasks that need a label leave them out and count them",
            DatasetWarning,
            stacklevel=3,
        )


def _check_gene_ids(ds: Dataset) -> None:
    spec = ds.spec
    names = _gene_sample(str(n) for n in ds.adata.var_names)
    where = ds.extras.get("gene_source", "var_names")
    if spec.gene_id_type == "ensembl":
        share = _share(_PREFIX_PATTERNS[spec.organism], names)
        if share < MIN_ENSEMBL_SHARE:
            prefix = ORGANISMS[spec.organism].ensembl_prefix
            msg = (
                f"dataset {ds.name!r}: {where} {_describe_gene_ids(names)}, but the spec declares "
                f"gene_id_type 'ensembl' for organism {spec.organism!r} "
                f"(only {share:.0%} start with {prefix}; need {MIN_ENSEMBL_SHARE:.0%})"
            )
            raise DatasetError(msg)
    elif spec.gene_id_type == "symbol":
        share = _share(_ANY_ENSEMBL, names)
        if share >= 0.5:
            msg = (
                f"dataset {ds.name!r}: {where} {_describe_gene_ids(names)} ({share:.0%} of them), "
                "but the spec declares gene_id_type 'symbol'"
            )
            raise DatasetError(msg)


def _first_bad_cell(ds: Dataset, row: int) -> str:
    return repr(str(ds.adata.obs_names[row]))


def _check_values(ds: Dataset) -> None:
    """Finite and non-negative everywhere; integers (on sampled rows) for raw counts."""
    import scipy.sparse as sp

    X, name, spec = ds.adata.X, ds.name, ds.spec
    where = f"expression matrix (layer {spec.layer!r})"

    # Finite and non-negative: sparse matrices only need their stored values.
    blocks = [(0, X)] if sp.issparse(X) else iter_row_chunks(X)
    n_bad = n_neg = 0
    first_bad = first_neg = None
    min_value = np.inf
    for start, block in blocks:
        values = block.data if sp.issparse(block) else np.asarray(block)
        bad = ~np.isfinite(values)
        if bad.any():
            n_bad += int(bad.sum())
            if first_bad is None:
                first_bad = start + _row_of(block, np.flatnonzero(bad.ravel())[0])
        finite = values[~bad] if bad.any() else values
        if finite.size:
            min_value = min(min_value, float(finite.min()))
        neg = finite < 0
        if neg.any():
            n_neg += int(neg.sum())
            if first_neg is None:
                first_neg = start + _row_of(block, np.flatnonzero((values < 0).ravel())[0])
    if n_bad:
        msg = (
            f"dataset {name!r}: {where} has {n_bad} non-finite values (NaN or inf), "
            f"e.g. in cell {_first_bad_cell(ds, first_bad)}"
        )
        raise DatasetError(msg)
    if n_neg:
        msg = (
            f"dataset {name!r}: {where} has {n_neg} negative values (min {min_value:.4g}, "
            f"e.g. in cell {_first_bad_cell(ds, first_neg)}); expected {spec.expression}: "
            "is it scaled or centred data?"
        )
        raise DatasetError(msg)

    # Integers: a sample of rows is enough to tell counts from normalised data.
    # The sample is read in chunks: 2,000 dense rows of 60,000 genes would be 480 MB.
    n = X.shape[0]
    rows = np.unique(np.linspace(0, n - 1, num=min(n, _INTEGER_CHECK_ROWS)).astype(int))
    max_value = -np.inf
    first_fraction: tuple[int, float] | None = None  # (row, value)
    for start in range(0, rows.size if n else 0, 256):
        chunk_rows = rows[start : start + 256]
        block = X[chunk_rows]
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if values.size == 0:
            continue
        max_value = max(max_value, float(values.max()))
        fractional = np.flatnonzero(values != np.round(values))
        if fractional.size and first_fraction is None:
            first_fraction = (
                int(chunk_rows[_row_of(block, fractional[0])]),
                float(values[fractional[0]]),
            )
            if spec.expression == "raw_counts":
                break  # enough to fail; the max so far is a fine hint
    if max_value == -np.inf:
        return  # no stored values at all: reported as empty cells
    if spec.expression == "raw_counts" and first_fraction is not None:
        row, value = first_fraction
        kind = "log-normalised" if max_value <= _LOG_MAX else "normalised (not raw counts)"
        msg = (
            f"dataset {name!r}: spec declares expression 'raw_counts' but {where} has "
            f"non-integer values (e.g. {value:.4g} in cell {_first_bad_cell(ds, row)}, "
            f"max {max_value:.4g}); the data look {kind}: "
            "point `layer` at the counts or declare `expression: log_normalized`"
        )
        raise DatasetError(msg)
    if spec.expression == "log_normalized" and first_fraction is None and max_value > _LOG_MAX:
        warnings.warn(
            f"dataset {name!r}: spec declares expression 'log_normalized' but {where} "
            f"holds only integers up to {max_value:.0f}; the data look like raw counts",
            DatasetWarning,
            stacklevel=3,
        )


def _row_of(block: Any, flat_index: int) -> int:
    """Row of the ``flat_index``-th stored value (sparse CSR) or element (dense) of ``block``."""
    import scipy.sparse as sp

    if sp.issparse(block):
        indptr = block.tocsr().indptr
        return int(np.searchsorted(indptr, flat_index, side="right") - 1)
    n_cols = block.shape[1] if block.ndim == 2 else 1
    return int(flat_index // max(n_cols, 1))


def _check_empty_cells(ds: Dataset) -> None:
    totals = row_sums(ds.adata.X)
    empty = np.flatnonzero(totals == 0)
    if empty.size:
        ids = _examples((str(ds.adata.obs_names[i]) for i in empty[:3]), 3)
        msg = (
            f"dataset {ds.name!r}: {empty.size} of {ds.n_cells} cells have no counts (zero total), "
            f"e.g. {ids}; filter them out (e.g. scanpy.pp.filter_cells(adata, min_counts=1))"
        )
        raise DatasetError(msg)


def _check_roles(ds: Dataset, require: Iterable[str]) -> None:
    spec = ds.spec
    for role in require:
        if role == "batch" and not spec.batch_keys:
            msg = f"dataset {ds.name!r}: the task needs batches, but the spec has no batch_key"
            raise DatasetError(msg)
        if role == "control":
            if spec.control_key is None and spec.control_label is None:
                msg = f"dataset {ds.name!r}: the task needs control cells, but the spec has no control_key or control_label"
                raise DatasetError(msg)
            continue
        if role not in _BUILTIN_ROLES and role not in spec.extra_keys:
            have = ", ".join(sorted(spec.extra_keys)) or "none"
            msg = (
                f"dataset {ds.name!r}: the task needs role {role!r}, but the spec has no "
                f"extra_keys.{role} (extra_keys: {have})"
            )
            raise DatasetError(msg)


def validate_dataset(ds: Dataset, *, require: Iterable[str] = ()) -> None:
    """Check that a loaded dataset fits its spec, before any heavy work.

    Checks, cheapest first, stopping at the first failure:

    1. every role in ``require`` is provided by the spec (``batch`` needs a
       ``batch_key``; ``label`` and ``species`` always are; others need ``extra_keys``);
    2. ``label_key``, every batch key and every extra key are obs columns, and every
       value of a role with a ``label_order`` is in that order;
    3. gene IDs fit ``gene_id_type`` and the organism: for ``ensembl``, at least
       90% must carry the organism's Ensembl prefix; for ``symbol``, most must not
       look like Ensembl IDs;
    4. expression values are finite and non-negative (stored values only for
       sparse matrices, row chunks for dense ones and for matrices on disk), and
       integers on a sample of rows when the spec declares ``raw_counts``;
    5. no cell has a zero total.

    A matrix on disk (:class:`BackedMatrix`) is read in row chunks, so memory stays
    at one chunk; the checks and messages are the same as in memory.

    Parameters
    ----------
    ds
        The dataset, from :func:`load_dataset`.
    require
        Roles the task needs, e.g. ``("batch",)`` or ``("time_point",)``.

    Raises
    ------
    DatasetError
        One line naming the dataset, the key and what was found.
    """
    _check_roles(ds, require)
    _check_obs_keys(ds)
    for role in ds.spec.label_order:
        if role not in ds.spec.extra_keys:
            msg = f"dataset {ds.name!r}: label_order names role {role!r}, which extra_keys does not map"
            raise DatasetError(msg)
        ds.role(role)  # every value must be in the declared order
    if ds.spec.control_key is not None or ds.spec.control_label is not None:
        controls = ds.controls  # the flag parses
        if not controls.any():
            how = (f"control_key {ds.spec.control_key!r}" if ds.spec.control_key
                   else f"control_label {ds.spec.control_label!r}")
            msg = f"dataset {ds.name!r}: no cell is a control by {how}"
            raise DatasetError(msg)
    _check_gene_ids(ds)
    _check_values(ds)
    _check_empty_cells(ds)
