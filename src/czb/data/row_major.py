"""Rewriting a column-major (CSC) matrix of an .h5ad file row-major (CSR), out of core,
so that its rows can be read in chunks."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from czb.core.errors import DatasetError, DatasetWarning
from czb.core.settings import get_settings
from czb.data.hdf5_checks import read_error_cause
from czb.data.matrix import CHUNK_VALUES

#: Stored values per band when a column-major (CSC) file is rewritten row-major: the
#: conversion holds one band in memory (about 12 bytes per value) and reads the file
#: once per band.
CSC_BAND_VALUES = 1 << 26


def row_major_copy(
    node: Any, path: Path, element: str, dataset: str, *, shape: tuple[int, int], digest: str | None
) -> tuple[Path, str]:
    """A row-major (CSR) copy of a CSC matrix in the cache, made once; its path and element.

    Reading rows of a column-major matrix means reading all of it, so a large CSC
    matrix is rewritten once into ``<cache>/row_major/<sha256>-<element>.h5`` (same
    values, CSR) with a :class:`~czb.core.errors.DatasetWarning`; later loads of the same
    file reuse the copy.
    """
    import h5py

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
