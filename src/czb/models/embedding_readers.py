"""Readers of embedding files (``.npy``, ``.npz``, ``.parquet``, ``.h5ad``): their raw
content, before the values are checked and aligned to a dataset.

The files come from outside, so nothing in them is unpickled, and the sizes an ``.npy``
header or a zip member claims are checked against the bytes that are there before
anything is allocated. What each format must hold is described on
:class:`~czb.models.embedding_files.FileEmbeddingSource`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from czb.core.errors import EmbeddingError
from czb.models.embedding import MAX_SHOWN, show_items

#: File suffixes :func:`~czb.models.sources.source_for_file` reads.
FILE_FORMATS = (".npy", ".npz", ".parquet", ".h5ad")
#: Names of the array (``.npz``) or column (``.parquet``) that may hold cell IDs.
CELL_ID_NAMES = ("cell_ids", "cell_id", "obs_names")


@dataclass
class FileContent:
    """Raw content of an embedding file, before checks and alignment."""

    values: Any
    cell_ids: np.ndarray | None = None
    #: Where the IDs came from, e.g. ``"cell_ids"`` or ``"index"``.
    id_source: str | None = None
    key: str | None = None
    #: Things to warn about once the embedding is built.
    notes: list[str] = field(default_factory=list)


class EmbeddingFileReader:
    """Reads the raw content of one embedding file; the reader follows its suffix."""

    def __init__(self, path: str | Path, *, key: str | None = None):
        self.path = Path(path)
        self.key = key
        self.format = self.path.suffix.lower()

    def read(self) -> FileContent:
        """The file's values, cell IDs (if any) and key, unchecked.

        Raises
        ------
        EmbeddingError
            Unreadable file, missing or ambiguous key, or content refused before reading
            (pickled objects, sizes the file cannot hold).
        """
        readers = {
            ".npy": self._read_npy,
            ".npz": self._read_npz,
            ".parquet": self._read_parquet,
            ".h5ad": self._read_h5ad,
        }
        return readers[self.format]()

    # Parsers of untrusted files raise all sorts of exceptions on corrupt input (OSError,
    # ValueError, EOFError, BadZipFile, ArrowInvalid, KeyError from h5py...); each reader
    # turns those into one EmbeddingError naming the file. Our own checks come after.

    def _unreadable(self, error: Exception) -> EmbeddingError:
        # Never the parser's message itself: numpy, zipfile and h5py quote the file.
        from czb.data.hdf5_checks import read_error_cause
        from czb.io.content import describe_content, expected_kind

        what = describe_content(self.path, expected=expected_kind(self.path.name))
        if what is not None:
            return EmbeddingError(f"{self.path}: not a readable {self.format} file: it is {what}")
        return EmbeddingError(f"{self.path}: not a readable {self.format} file ({read_error_cause(error)})")

    def _read_npy(self) -> FileContent:
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
        return FileContent(values)

    def _read_npz(self) -> FileContent:
        import zipfile

        try:
            with zipfile.ZipFile(self.path) as archive:
                members = {m[: -len(".npy")]: m for m in archive.namelist() if m.endswith(".npy")}
                names = list(members)
                id_names = [n for n in CELL_ID_NAMES if n in names]
                data_names = [n for n in names if n not in id_names]
                if len(id_names) > 1:
                    msg = f"{self.path}: several cell ID arrays ({show_items(id_names)}); keep one"
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
        return FileContent(values, cell_ids, id_names[0] if id_names else None, key)

    def _refuse_objects(self, dtype: np.dtype, what: str) -> None:
        # Object arrays are pickles, and unpickling a file can run arbitrary code.
        if dtype.hasobject:
            msg = (
                f"{self.path}: {what} holds Python objects (dtype object), which czb does not "
                f"unpickle; save numbers, and cell IDs as strings (np.asarray(ids, dtype=str))"
            )
            raise EmbeddingError(msg)

    def _read_parquet(self) -> FileContent:
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
            msg = f"{self.path}: several cell ID columns ({show_items(id_cols)}); keep one"
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
                msg = f"{self.path}: no column {key!r}; columns: {show_items(data_names) or 'none'}"
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
            return FileContent(values, ids, id_source, key, notes)

        types = {c: table.schema.field(c).type for c in data_names}
        bad = [
            f"{c} ({t})"
            for c, t in types.items()
            if not (pa.types.is_integer(t) or pa.types.is_floating(t))
        ]
        if bad:
            msg = (
                f"{self.path}: non-numeric column(s) {', '.join(bad[:MAX_SHOWN])}; every column "
                f"other than the cell IDs must be one numeric dimension (or pass key= to "
                f"name a list column)"
            )
            raise EmbeddingError(msg)
        if not data_names:
            values = np.empty((n_rows, 0), dtype=np.float32)
        else:
            # Nulls come out as NaN and are reported by check_embedding.
            values = np.column_stack([table.column(c).to_numpy() for c in data_names])
        return FileContent(values, ids, id_source, None, notes)

    def _read_h5ad(self) -> FileContent:
        import h5py

        from czb.core.errors import DatasetError
        from czb.data.hdf5_checks import check_h5ad_element

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
        return FileContent(_dense(values, self.path, key), ids, "obs_names", key)

    def _read_h5ad_legacy(self) -> FileContent:
        # Files from anndata < 0.7 store obs as a compound dataset; let anndata read them,
        # once the whole file passed the checks that keep scipy from crashing.
        import anndata as ad

        from czb.core.errors import DatasetError
        from czb.data.hdf5_checks import check_h5ad_structure

        try:
            check_h5ad_structure(self.path, name="embedding file")
        except DatasetError as e:
            raise EmbeddingError(str(e)) from None
        adata = ad.read_h5ad(self.path, backed="r")
        try:
            key = self._pick_key(list(adata.obsm.keys()), what="obsm entry", plural="obsm entries")
            values = _dense(adata.obsm[key], self.path, key)
            ids = self._ids(np.asarray(adata.obs_names), "obs_names")
            return FileContent(values, ids, "obs_names", key)
        finally:
            adata.file.close()

    def _pick_key(self, names: list[str], *, what: str, plural: str) -> str:
        if self.key is not None:
            if self.key not in names:
                msg = f"{self.path}: no {what} {self.key!r}; available: {show_items(names) or 'none'}"
                raise EmbeddingError(msg)
            return self.key
        if len(names) == 1:
            return names[0]
        if not names:
            msg = f"{self.path}: contains no {what}"
        else:
            msg = f"{self.path}: several {plural} ({show_items(names)}); pass key= to choose one"
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
            msg = f"{path}: obsm[{key!r}] has non-numeric column(s) {show_items(bad)}"
            raise EmbeddingError(msg)
        return values.to_numpy()
    return values
