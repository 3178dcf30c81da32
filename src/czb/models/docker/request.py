"""The input side of a model run: the per-run options, ``request.json`` and the files
written into ``/input`` (the dataset as CSR counts, or a perturbation screen).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import NotApplicableError
from czb.models.docker.contract import CONTRACT_VERSION, DATASET_FILE, REQUEST_FILE
from czb.specs.parameters import resolve_parameters
from czb.specs.schema import ModelSpec

if TYPE_CHECKING:
    from czb.data.dataset import Dataset
    from czb.models.docker.engine import LogSink


@dataclass
class RunOptions:
    """Per-run choices that override the model spec (the ``czb run`` flags).

    Attributes
    ----------
    variant
        Weights variant (default: the spec's ``default_variant``).
    weights_dir
        A local weights folder instead of the staged copy.
    gpus
        ``"all"``, ``"none"`` or a number; ``None``: ``"all"`` when the spec's resources
        ask for a GPU, else ``"none"``.
    memory_gb, shm_gb, timeout_s
        Container limits (default: the spec's resources).
    batch_size
        Cells per forward pass (default: the spec's ``parameters.batch_size``).
    parameters
        Values of parameters the model spec declares (``--param NAME=VALUE``; strings
        are parsed as the declared type); a name the spec does not declare is an error.
    use_cache
        Reuse a finished run with the same key; ``False`` always runs the model (and
        refreshes the cache).
    log
        Receives the container's log lines as they arrive (default: stderr).
    on_start
        Called with the started container (for tests).
    """

    variant: str | None = None
    weights_dir: Path | None = None
    gpus: str | None = None
    memory_gb: float | None = None
    shm_gb: float | None = None
    timeout_s: int | None = None
    batch_size: int | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    use_cache: bool = True
    log: LogSink | None = None
    on_start: Callable[[Any], None] | None = None



def build_request(
    spec: ModelSpec,
    dataset: Dataset,
    *,
    seed: int,
    device: str,
    variant: str,
    gene_id_type: str,
    batch_size: int | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``request.json`` of one run; every field the container may read.

    ``parameters`` holds every parameter the spec declares, valued by
    :func:`~czb.specs.parameters.resolve_parameters` (the declared defaults, then
    ``parameters`` and ``batch_size`` given here); ``batch_size`` is a field of its own.

    Raises
    ------
    SpecError
        A parameter the spec does not declare (naming the closest declared one), or a
        value its declaration does not allow.
    """
    overrides = {**(parameters or {}), **({"batch_size": batch_size} if batch_size else {})}
    values = resolve_parameters(spec, overrides)
    return {
        "contract_version": CONTRACT_VERSION,
        "model": spec.name,
        "variant": variant,
        "seed": int(seed),
        "device": device,
        "batch_size": values.pop("batch_size"),
        "organism": dataset.spec.organism,
        "gene_id_type": gene_id_type,
        "batch_keys": list(dataset.spec.batch_keys),
        "parameters": values,
        "dataset_file": DATASET_FILE,
    }


def check_applicable(spec: ModelSpec, dataset: Dataset, variant: str) -> None:
    """Raise :class:`NotApplicableError` before any work when the model cannot take the data."""
    _, chosen = spec.variant(variant)
    organisms = chosen.organisms or spec.organisms
    if organisms and dataset.spec.organism not in organisms:
        msg = (
            f"{spec.name} ({variant}) supports {', '.join(organisms)}; "
            f"dataset {dataset.name} is {dataset.spec.organism}"
        )
        raise NotApplicableError(msg)
    if spec.input == "raw_counts" and dataset.spec.expression != "raw_counts":
        msg = (
            f"{spec.name} reads raw counts; dataset {dataset.name} provides "
            f"{dataset.spec.expression} expression only"
        )
        raise NotApplicableError(msg)


def write_input(
    dataset: Dataset,
    input_dir: Path,
    request: Mapping[str, Any],
    *,
    gene_map: Any = None,
) -> dict[str, Any]:
    """Write ``dataset.h5ad`` and ``request.json`` into ``input_dir``.

    ``dataset.h5ad``: ``X`` the counts as CSR float32 (cells × model genes), ``var_names``
    the IDs of ``request['gene_id_type']``, var columns ``gene_symbol`` and ``ensembl_id``
    (empty strings where unknown), ``obs_names`` the cell IDs, ``obs`` the batch columns
    as strings.

    ``X`` is written row chunk by row chunk (:func:`write_csr_rows`), so the dataset's
    matrix, in memory or on disk, is read once and never copied whole.

    Returns
    -------
    The gene-mapping summary (genes passed on, unmapped, ambiguous, mapping source).
    """
    import anndata as ad
    import h5py
    import pandas as pd

    from czb.core.missing import missing_mask
    from czb.data.genes import model_genes
    from czb.data.matrix import iter_row_chunks

    genes = model_genes(dataset, request["gene_id_type"], gene_map=gene_map)
    x = dataset.adata.X
    keep = np.asarray(genes.keep)
    cols = None if np.array_equal(keep, np.arange(x.shape[1])) else keep
    obs = pd.DataFrame(index=pd.Index(dataset.adata.obs_names.astype(str), name=None))
    for key in request.get("batch_keys", []):
        column = dataset.adata.obs[key]
        text = column.astype(str).to_numpy().astype(object)
        text[missing_mask(column)] = ""  # no value: empty, never the text "nan"
        obs[key] = text
    var = pd.DataFrame(
        {
            "gene_symbol": [s or "" for s in genes.symbols],
            "ensembl_id": [e or "" for e in genes.ensembl_ids],
        },
        index=pd.Index([str(i) for i in genes.ids], name=None),
    )
    input_dir.mkdir(parents=True, exist_ok=True)
    # obs and var first (anndata writes them), then X appended chunk by chunk.
    ad.AnnData(obs=obs, var=var).write_h5ad(input_dir / DATASET_FILE)
    with h5py.File(input_dir / DATASET_FILE, "a") as f:
        blocks = (block for _, block in iter_row_chunks(x))
        write_csr_rows(f, "X", blocks, n_cols=len(var), cols=cols)
    (input_dir / REQUEST_FILE).write_text(json.dumps(dict(request), indent=2, sort_keys=True))
    for path in (input_dir / DATASET_FILE, input_dir / REQUEST_FILE):
        path.chmod(0o644)
    input_dir.chmod(0o755)
    return genes.summary


def write_csr_rows(
    f: Any,
    name: str,
    blocks: Any,
    *,
    n_cols: int,
    cols: np.ndarray | None = None,
    chunk_values: int = 1 << 18,
) -> None:
    """Write row blocks as one float32 CSR matrix ``f[name]`` in anndata's on-disk format.

    The group carries ``encoding-type: csr_matrix`` (anndata's spec, read by anndata
    >= 0.7); ``data`` and ``indices`` grow with each block, ``indptr`` (int64) is
    written at the end. Memory: one block plus the row pointers.

    Parameters
    ----------
    f
        An h5py file or group open for writing.
    name
        Name of the new group.
    blocks
        Iterable of consecutive row blocks (sparse or dense), each ``(n_b, n)``.
    n_cols
        Columns of the written matrix (``len(cols)`` when ``cols`` is given).
    cols
        Columns of each block to keep, in this order (``None``: all).
    chunk_values
        HDF5 chunk length of ``data`` and ``indices``.
    """
    import scipy.sparse as sp

    group = f.create_group(name)
    group.attrs["encoding-type"] = "csr_matrix"
    group.attrs["encoding-version"] = "0.1.0"
    index_dtype = np.int32 if n_cols < 2**31 else np.int64
    data = group.create_dataset(
        "data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(chunk_values,)
    )
    indices = group.create_dataset(
        "indices", shape=(0,), maxshape=(None,), dtype=index_dtype, chunks=(chunk_values,)
    )
    pointers, nnz, n_rows = [np.zeros(1, dtype=np.int64)], 0, 0
    for block in blocks:
        block = sp.csr_matrix(block) if not sp.issparse(block) else block.tocsr()
        if cols is not None:
            block = block[:, cols]
        if block.shape[1] != n_cols:
            msg = f"write_csr_rows: a block has {block.shape[1]} columns, expected {n_cols}"
            raise ValueError(msg)
        k = int(block.indptr[-1])
        if k:
            data.resize((nnz + k,))
            data[nnz:] = block.data[:k].astype(np.float32, copy=False)
            indices.resize((nnz + k,))
            indices[nnz:] = block.indices[:k]
        pointers.append(block.indptr[1:].astype(np.int64) + nnz)
        nnz += k
        n_rows += block.shape[0]
    group.create_dataset("indptr", data=np.concatenate(pointers))
    group.attrs["shape"] = np.array([n_rows, n_cols], dtype=np.int64)


def screen_cell_ids(data: Any) -> list[str]:
    """The cell IDs of a perturbation screen (``cell<i>`` where it has none)."""
    if data.cell_ids is not None:
        return [str(i) for i in data.cell_ids]
    return [f"cell{i}" for i in range(len(data.conditions))]


def write_screen(
    data: Any,
    input_dir: Path,
    request: Mapping[str, Any],
    *,
    selected: np.ndarray | None = None,
    masked: np.ndarray | None = None,
) -> None:
    """``dataset.h5ad`` and ``request.json`` of a perturbation request.

    ``X`` raw counts (CSR float32), ``var_names`` gene symbols, obs ``condition`` and
    ``batch``; for masked genes also obs ``selected`` and layer ``masked`` (CSR, 1 where
    an entry of a selected cell is hidden).
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    counts = data.counts if sp.issparse(data.counts) else sp.csr_matrix(data.counts)
    obs = pd.DataFrame({"condition": np.asarray(data.conditions).astype(str)},
                       index=pd.Index(screen_cell_ids(data)))
    if data.batches is not None:
        obs["batch"] = np.asarray(data.batches).astype(str)
    genes = [str(g) for g in data.genes]
    adata = ad.AnnData(X=counts.tocsr().astype(np.float32),
                       obs=obs, var=pd.DataFrame({"gene_symbol": genes}, index=pd.Index(genes)))
    if selected is not None:
        flag = np.zeros(adata.n_obs, dtype=bool)
        flag[selected] = True
        adata.obs["selected"] = flag
        hidden = sp.lil_matrix(adata.shape, dtype=np.uint8)
        rows, cols = np.nonzero(masked)
        hidden[np.asarray(selected)[rows], cols] = 1
        adata.layers["masked"] = hidden.tocsr()
    adata.write_h5ad(input_dir / DATASET_FILE)
    (input_dir / REQUEST_FILE).write_text(json.dumps(dict(request), indent=2, sort_keys=True))
