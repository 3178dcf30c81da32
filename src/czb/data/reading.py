"""Loading datasets from their specs: reading .h5ad files (obs, var and the one matrix
the spec names, in memory or left on disk) into a :class:`~czb.data.dataset.Dataset`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import DatasetError, DatasetWarning
from czb.data.dataset import Dataset
from czb.data.gene_ids import MIN_ENSEMBL_SHARE, ensembl_share
from czb.data.hdf5_checks import (
    NUMERIC_KINDS,
    FileCheck,
    check_array,
    check_element,
    check_group,
    check_links,
    check_sparse_group,
    read_error_cause,
    sparse_format,
)
from czb.data.matrix import BackedMatrix
from czb.data.messages import available, examples, unreadable
from czb.data.row_major import row_major_copy
from czb.data.sources import builtin_path, generate
from czb.specs.schema import DatasetSpec

if TYPE_CHECKING:
    import anndata
    import pandas as pd

__all__ = ["BACKED_MIN_VALUES", "load_dataset"]

#: Matrices of files on disk storing more values than this (non-zeros of sparse matrices,
#: every entry of dense ones) are left on disk by :func:`load_dataset`: 20M values are
#: about 160 MB as float32 CSR in memory.
BACKED_MIN_VALUES = 20_000_000


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
    memory or left on disk as a :class:`~czb.data.matrix.BackedMatrix` (see
    :func:`load_dataset` for the policy). Older files are read whole. Whatever is read
    is checked first (see :func:`~czb.data.hdf5_checks.check_h5ad_structure`): sizes
    against what the file stores, and the structure of sparse matrices, so that a corrupt or forged file is one
    :class:`~czb.core.errors.DatasetError`, never a crash or a runaway allocation.
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
        raise unreadable(dataset, path, e) from e


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
    """The matrix at ``element``, checked: read into memory, or a
    :class:`~czb.data.matrix.BackedMatrix`.

    Sparse matrices read into memory are checked in full first (row pointers and every
    column index, read in chunks); those left on disk get the same check of their row
    pointers here and of their column indices block by block as they are read
    (:meth:`~czb.data.matrix.BackedMatrix._check_indices`), which
    :func:`~czb.data.validation.validate_dataset` does for all blocks before any heavy
    work. A CSC matrix is checked in full before it is rewritten.
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
        path, element = row_major_copy(node, path, element, dataset, shape=shape, digest=digest)
        storage, indptr = "csr", None
    matrix = BackedMatrix(
        path, element, dataset=dataset, shape=shape, dtype=dtype, storage=storage, nnz=nnz
    )
    if indptr is not None:
        matrix._indptr = indptr  # already read and checked
    return matrix


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
            f"available: {available(key, var.columns)}"
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
      :data:`~czb.data.sources.BUILTINS`; ``builtin:PACKAGE/PATH`` for any other),
      never downloaded;
    - ``synthetic:GENERATOR``: ``GENERATORS[GENERATOR](**spec.params)`` from
      :mod:`czb.data.synthetic.generators`; ``sha256`` is that of the canonical JSON of the
      generator name and its arguments (defaults filled in);
    - anything else (local path, ``file://``, ``https://``, ``s3://``) goes through
      :func:`czb.io.fetch.fetch`, which verifies ``spec.sha256`` when set.

    The matrix named by ``spec.layer`` (``X``, ``raw`` or a layer) becomes ``X`` of
    a fresh AnnData (sparse input is kept sparse, as CSR), with ``obs`` copied and
    ``var_names`` the gene IDs (``var[spec.gene_key]`` when set). When the spec
    declares Ensembl IDs without a ``gene_key`` and the var_names are not Ensembl
    IDs but a ``var['ensembl_id']`` column holds them (cz-benchmarks' convention),
    that column is used. Duplicated gene IDs are made unique with a
    :class:`~czb.core.errors.DatasetWarning`.

    obs and var are always read into memory. The matrix of a file stays on disk (a
    :class:`~czb.data.matrix.BackedMatrix`, read in row chunks when needed) when it
    stores more than :data:`BACKED_MIN_VALUES` values, or whenever ``backed=True``; see
    :class:`~czb.data.dataset.Dataset`.

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
    The :class:`~czb.data.dataset.Dataset`; call
    :func:`~czb.data.validation.validate_dataset` on it before heavy work.

    Raises
    ------
    DatasetError
        Unknown builtin or generator, generator parameters of the wrong type or size,
        unreadable file (not HDF5, corrupt, truncated or forged: sizes it does not store,
        a malformed sparse matrix, links or storage in other files; see
        :func:`~czb.data.hdf5_checks.check_h5ad_structure`; the column indices of a
        backed matrix are checked as its blocks are read, by
        :func:`~czb.data.validation.validate_dataset`), missing layer or gene_key, a
        matrix whose shape does not fit obs and var, duplicated cell IDs.
    FetchError
        The file cannot be downloaded, or is not cached while offline.
    """
    uri = spec.uri
    path: Path | None = None
    if uri.startswith("synthetic:"):
        adata, digest = generate(spec, uri.removeprefix("synthetic:"))
    else:
        from czb.io import fetch as fetch_module
        from czb.io.cache import known_sha256
        if uri.startswith("builtin:"):
            path = builtin_path(spec)
            digest = known_sha256(path)
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
            digest = known_sha256(path)
        adata = _read_h5ad(path, spec.layer, spec.name, backed=backed, digest=digest)

    selected, gene_source = _select(adata, spec)
    del adata  # drop unused layers before anything else allocates

    if not selected.obs_names.is_unique:
        dup = selected.obs_names[selected.obs_names.duplicated()].unique()
        msg = (
            f"dataset {spec.name!r}: {len(dup)} cell IDs occur more than once in obs_names "
            f"(e.g. {examples(dup, 3)}); cell IDs must be unique to match embeddings to cells"
        )
        raise DatasetError(msg)
    if not selected.var_names.is_unique:
        n_dup = int(selected.var_names.duplicated().sum())
        warnings.warn(
            f"dataset {spec.name!r}: {n_dup} duplicated gene IDs in {gene_source} "
            f"(e.g. {examples(selected.var_names[selected.var_names.duplicated()].unique())}); "
            "made unique by appending '-1', '-2', ...",
            DatasetWarning,
            stacklevel=2,
        )
        selected.var_names_make_unique()

    extras = {"gene_source": gene_source, "layer": spec.layer}
    return Dataset(spec=spec, adata=selected, path=path, sha256=digest, extras=extras)
