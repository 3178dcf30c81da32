"""The host side of the model container contract (version 1), and the embedding cache.

A docker model (:class:`DockerModelSource`) embeds a dataset in four steps:

1. **input**: the dataset's raw counts go to ``input/dataset.h5ad`` with the gene IDs the
   model declares (converted by :mod:`czb.runner.genes`, never guessed), its batch
   columns in ``obs``, and ``input/request.json`` (:func:`build_request`);
2. **run**: the model's image runs with ``/input`` and ``/weights`` read-only and
   ``/output`` the only writable mount (:func:`czb.runner.docker_engine.run_container`);
3. **output**: ``embeddings.npy`` (float32, cells × dim), ``cell_ids.json`` (the row
   order; a model may drop cells) and ``meta.json``, written last, are read back and
   checked (:func:`read_output`); exit code 99 means *not applicable*, any other non-zero
   code a failure reported with the container's last log lines;
4. **cache**: a finished run is kept under a key of (image ID, weights checksum, dataset
   checksum, request), so scoring again never re-runs the model (:class:`EmbeddingCache`).

The container side is ``containers/common/czb_container.py``; the README's "Wrap your own
model" section states the contract for people writing their own image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.errors import EmbeddingError, ModelRunError, NotApplicableError
from czb.runner.embeddings import Embedding, _align, check_embedding
from czb.runner.specs import ModelSpec

if TYPE_CHECKING:
    from czb.runner.datasets import Dataset
    from czb.runner.docker_engine import ImageInfo, LogSink

CONTRACT_VERSION = 1
EXIT_OK = 0
EXIT_NOT_APPLICABLE = 99
DATASET_FILE = "dataset.h5ad"
REQUEST_FILE = "request.json"
EMBEDDINGS_FILE = "embeddings.npy"
CELL_IDS_FILE = "cell_ids.json"
META_FILE = "meta.json"
REASON_FILE = "reason.json"
PREDICTIONS_FILE = "predictions.h5ad"
PREDICT_EXPRESSION_SHIFT = "perturbation_expression_shift"
PREDICT_MASKED_GENE = "perturbation_masked_gene"
LOG_FILE = "container.log"
#: Log lines kept in a result's provenance, and shown in a failure's message.
RESULT_LOG_LINES = 50
ERROR_LOG_LINES = 20
DEFAULT_BATCH_SIZE = 32


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
    use_cache: bool = True
    log: LogSink | None = None
    on_start: Callable[[Any], None] | None = None


# --------------------------------------------------------------------------- input


def build_request(
    spec: ModelSpec,
    dataset: Dataset,
    *,
    seed: int,
    device: str,
    variant: str,
    gene_id_type: str,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """The ``request.json`` of one run; every field the container may read."""
    parameters = dict(spec.parameters)
    spec_batch = parameters.pop("batch_size", None)
    return {
        "contract_version": CONTRACT_VERSION,
        "model": spec.name,
        "variant": variant,
        "seed": int(seed),
        "device": device,
        "batch_size": int(batch_size or spec_batch or DEFAULT_BATCH_SIZE),
        "organism": dataset.spec.organism,
        "gene_id_type": gene_id_type,
        "batch_keys": list(dataset.spec.batch_keys),
        "parameters": parameters,
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

    ``X`` is written row chunk by row chunk (:func:`_write_csr_rows`), so the dataset's
    matrix, in memory or on disk, is read once and never copied whole.

    Returns
    -------
    The gene-mapping summary (genes passed on, unmapped, ambiguous, mapping source).
    """
    import anndata as ad
    import h5py
    import pandas as pd

    from czb.runner.datasets import iter_row_chunks
    from czb.runner.genes import model_genes

    genes = model_genes(dataset, request["gene_id_type"], gene_map=gene_map)
    x = dataset.adata.X
    keep = np.asarray(genes.keep)
    cols = None if np.array_equal(keep, np.arange(x.shape[1])) else keep
    obs = pd.DataFrame(index=pd.Index(dataset.adata.obs_names.astype(str), name=None))
    for key in request.get("batch_keys", []):
        obs[key] = dataset.adata.obs[key].astype(str).to_numpy()
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
        _write_csr_rows(f, "X", blocks, n_cols=len(var), cols=cols)
    (input_dir / REQUEST_FILE).write_text(json.dumps(dict(request), indent=2, sort_keys=True))
    for path in (input_dir / DATASET_FILE, input_dir / REQUEST_FILE):
        path.chmod(0o644)
    input_dir.chmod(0o755)
    return genes.summary


def _write_csr_rows(
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
            msg = f"_write_csr_rows: a block has {block.shape[1]} columns, expected {n_cols}"
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


# --------------------------------------------------------------------------- output


@dataclass
class ModelOutput:
    """What a run left in ``/output``, checked.

    Attributes
    ----------
    values
        Array of shape ``(n_embedded_cells, dim)``, float32.
    cell_ids
        Object array of shape ``(n_embedded_cells,)``.
    meta
        ``meta.json`` as a dict.
    """

    values: np.ndarray
    cell_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def read_output(output_dir: Path, *, name: str) -> ModelOutput:
    """Read and check ``embeddings.npy``, ``cell_ids.json`` and ``meta.json``.

    Raises
    ------
    EmbeddingError
        A file is missing (``meta.json`` absent means the run did not finish), not
        readable without unpickling, of the wrong shape or type.
    """
    meta_path = output_dir / META_FILE
    if not meta_path.is_file():
        msg = f"{name}: the container exited 0 but wrote no {META_FILE} (the run did not finish)"
        raise EmbeddingError(msg)
    try:
        meta = json.loads(meta_path.read_text())
        ids = json.loads((output_dir / CELL_IDS_FILE).read_text())
        values = np.load(output_dir / EMBEDDINGS_FILE, allow_pickle=False)
    except FileNotFoundError as e:
        msg = f"{name}: output file {Path(e.filename).name} missing"
        raise EmbeddingError(msg) from None
    except (OSError, ValueError) as e:
        msg = f"{name}: unreadable output ({e})"
        raise EmbeddingError(msg) from None
    if not isinstance(meta, dict):
        msg = f"{name}: {META_FILE} must be a JSON object"
        raise EmbeddingError(msg)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        msg = f"{name}: {CELL_IDS_FILE} must be a JSON list of strings"
        raise EmbeddingError(msg)
    if values.dtype != np.float32:
        msg = f"{name}: {EMBEDDINGS_FILE} has dtype {values.dtype}; the contract asks for float32"
        raise EmbeddingError(msg)
    if values.ndim != 2 or values.shape[0] != len(ids):
        msg = (
            f"{name}: {EMBEDDINGS_FILE} has shape {values.shape} but {CELL_IDS_FILE} lists "
            f"{len(ids)} cells"
        )
        raise EmbeddingError(msg)
    cell_ids = np.asarray(ids, dtype=object)
    values = check_embedding(values, name=name, row_names=cell_ids)
    return ModelOutput(values=values, cell_ids=cell_ids, meta=meta)


def _cell_ids(data: Any) -> list[str]:
    if data.cell_ids is not None:
        return [str(i) for i in data.cell_ids]
    return [f"cell{i}" for i in range(len(data.conditions))]


def _write_screen(
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
                       index=pd.Index(_cell_ids(data)))
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


def read_predictions(output_dir: Path, *, name: str, rows: list[str], genes: Any) -> np.ndarray:
    """Read ``predictions.h5ad`` and put its rows and columns in the asked order.

    Raises
    ------
    EmbeddingError
        No ``meta.json`` (the run did not finish), an unreadable file, missing or extra
        rows or genes, or values that are not finite.
    """
    import anndata as ad

    if not (output_dir / META_FILE).is_file():
        msg = f"{name}: the container exited 0 but wrote no {META_FILE} (the run did not finish)"
        raise EmbeddingError(msg)
    try:
        predicted = ad.read_h5ad(output_dir / PREDICTIONS_FILE)
    except (OSError, ValueError, KeyError) as e:
        msg = f"{name}: cannot read {PREDICTIONS_FILE} ({e})"
        raise EmbeddingError(msg) from None
    genes = [str(g) for g in genes]
    for what, want, have in (("rows", rows, predicted.obs_names), ("genes", genes, predicted.var_names)):
        missing = sorted(set(want) - set(map(str, have)))
        if missing or len(have) != len(want):
            msg = (
                f"{name}: {PREDICTIONS_FILE} has {len(have)} {what} where {len(want)} were asked"
                + (f" (missing e.g. {', '.join(missing[:3])})" if missing else "")
            )
            raise EmbeddingError(msg)
    values = predicted[rows, genes].X
    values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float64)
    if not np.isfinite(values).all():
        msg = f"{name}: {PREDICTIONS_FILE} holds NaN or infinite values"
        raise EmbeddingError(msg)
    return values


# --------------------------------------------------------------------------- cache


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


class EmbeddingCache:
    """Finished model runs, content-addressed: ``<cache>/embeddings/<key>/``.

    Each entry holds the run's ``/output`` files, its container log and ``key.json``
    (what the key was made of). Entries appear by an atomic rename of a complete
    folder, so a reader never sees a half-written one.
    """

    def __init__(self, cache_dir: Path | None = None):
        if cache_dir is None:
            from czb.settings import get_settings

            cache_dir = get_settings().cache_dir
        self.root = Path(cache_dir) / "embeddings"

    def path(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, *, name: str) -> ModelOutput | None:
        entry = self.path(key)
        if not (entry / META_FILE).is_file():
            return None
        try:
            return read_output(entry, name=name)
        except EmbeddingError:
            shutil.rmtree(entry, ignore_errors=True)  # damaged: forget it, run again
            return None

    def put(self, key: str, output_dir: Path, parts: Mapping[str, Any]) -> Path:
        """Move a finished run's ``output_dir`` into the cache (replacing an older entry)."""
        (output_dir / "key.json").write_text(json.dumps(dict(parts), indent=2, sort_keys=True, default=str))
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.path(key)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}-"))
        staging.rmdir()
        shutil.move(str(output_dir), staging)
        if entry.exists():
            old = entry.with_name(f".{key[:12]}-old-{os.getpid()}")
            entry.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(entry)
        return entry


# --------------------------------------------------------------------------- source


class DockerModelSource:
    """Embeds datasets by running a model's image under the contract.

    Parameters
    ----------
    spec
        A model spec of kind ``docker``.
    options
        Per-run overrides (:class:`RunOptions`).
    cache_dir
        Root of the cache (default: the ``CZB_CACHE_DIR`` setting).
    """

    kind = "docker"

    def __init__(self, spec: ModelSpec, options: RunOptions | None = None, *, cache_dir: Path | None = None):
        if spec.kind != "docker":
            msg = f"model {spec.name!r} is not a docker model"
            raise EmbeddingError(msg)
        self.spec = spec
        self.name = spec.name
        self.options = options or RunOptions()
        self.variant, _ = spec.variant(self.options.variant)
        if cache_dir is None:
            from czb.settings import get_settings

            cache_dir = get_settings().cache_dir
        self.cache_dir = Path(cache_dir)
        self.cache = EmbeddingCache(self.cache_dir)
        self._image: ImageInfo | None = None
        #: ``embedding`` or ``predictions``: which tasks this source serves.
        self.produces = spec.output

    # What runs -----------------------------------------------------------------

    @property
    def gpus(self) -> str:
        if self.options.gpus is not None:
            return str(self.options.gpus)
        return "all" if self.spec.resources.gpu else "none"

    def limits(self) -> Any:
        from czb.runner.docker_engine import RunLimits

        res, opt = self.spec.resources, self.options
        return RunLimits(
            gpus=self.gpus,
            memory_gb=opt.memory_gb or res.memory_gb,
            shm_gb=opt.shm_gb or res.shm_gb or 2.0,
            timeout_s=opt.timeout_s or res.timeout_s,
            read_only_rootfs=self.spec.read_only_rootfs,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": self.spec.image,
            "image_digest": self._image.digest if self._image else None,
            "variant": self.variant,
            "parameters": dict(self.spec.parameters),
        }

    # The run ----------------------------------------------------------------

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed ``dataset`` (cached runs are reused); see the module docstring.

        Raises
        ------
        NotApplicableError
            The model does not support the dataset (checked host-side first, or the
            container exited 99).
        ModelRunError
            The image is missing, the container failed, timed out or was killed.
        EmbeddingError
            The output breaks the contract.
        """
        from czb.runner import docker_engine
        from czb.runner.weights import resolve_weights

        check_applicable(self.spec, dataset, self.variant)
        weights = resolve_weights(self.spec, self.variant, weights_dir=self.options.weights_dir,
                                  cache_dir=self.cache_dir)
        engine = docker_engine.client()
        self._image = image = docker_engine.image_info(engine, self.spec.image, model=self.name)
        gene_id_type = dataset.spec.gene_id_type if self.spec.gene_id_type == "any" else self.spec.gene_id_type
        request = build_request(
            self.spec, dataset, seed=seed, device="cpu" if self.gpus == "none" else "cuda",
            variant=self.variant, gene_id_type=gene_id_type, batch_size=self.options.batch_size,
        )
        parts = {
            "contract_version": CONTRACT_VERSION,
            "image_id": image.id,
            "weights_checksum": weights.checksum,
            "dataset": {
                "sha256": dataset.sha256,
                "layer": dataset.spec.layer,
                "gene_key": dataset.spec.gene_key,
                "gene_id_type": dataset.spec.gene_id_type,
                "n_cells": dataset.n_cells,
                "n_genes": dataset.n_genes,
            },
            "request": request,
        }
        key = cache_key(parts)
        info: dict[str, Any] = {
            "image": image.tag,
            "image_id": image.id,
            "image_digest": image.digest,
            "variant": self.variant,
            "weights_checksum": weights.checksum,
            "weights_license": weights.license,
            "request": request,
            "cache_key": key,
        }
        cached = self.cache.get(key, name=self.name) if self.options.use_cache and dataset.sha256 else None
        if cached is not None:
            info["cache"] = "hit"
            output = cached
            entry = self.cache.path(key)
            info["log_tail"] = _read_tail(entry / LOG_FILE, RESULT_LOG_LINES)
        else:
            info["cache"] = "off" if not self.options.use_cache else "miss"
            output, entry, run_info = self._run(dataset, request, weights, image, engine, key, parts)
            info.update(run_info)
        meta = output.meta
        if weights.checksum and meta.get("weights_checksum") not in (None, weights.checksum):
            msg = (
                f"{self.name}: the container loaded weights with checksum "
                f"{meta.get('weights_checksum')}, not the staged {weights.checksum}"
            )
            raise EmbeddingError(msg)
        info["container_meta"] = meta
        info["cache_entry"] = str(entry) if entry else None
        values, cell_index = _align(output.values, output.cell_ids, dataset, name=self.name, info=info)
        return Embedding(values=values, model=self.name, kind=self.kind, cell_index=cell_index, info=info)

    def _run(
        self,
        dataset: Dataset,
        request: dict[str, Any],
        weights: Any,
        image: ImageInfo,
        engine: Any,
        key: str,
        parts: Mapping[str, Any],
    ) -> tuple[ModelOutput, Path | None, dict[str, Any]]:
        genes: dict[str, Any] = {}

        def write(input_dir: Path) -> None:
            genes.update(write_input(dataset, input_dir, request))

        def read(output_dir: Path, log_file: Path) -> tuple[ModelOutput, Path | None]:
            output = read_output(output_dir, name=self.name)  # in memory: the folder may move
            if not dataset.sha256:
                return output, None  # no checksum, no key: nothing to cache under
            shutil.copy2(log_file, output_dir / LOG_FILE)
            return output, self.cache.put(key, output_dir, parts)

        (output, entry), run_info = self._execute(write, read, weights, image, engine)
        return output, entry, {"genes": genes, **run_info}

    def _execute(
        self,
        write: Callable[[Path], None],
        read: Callable[[Path, Path], Any],
        weights: Any,
        image: ImageInfo,
        engine: Any,
    ) -> tuple[Any, dict[str, Any]]:
        """Run the image once: ``write(input_dir)``, the container, then
        ``read(output_dir, log_file)``; the work folder is always removed."""
        from czb.runner import docker_engine

        runs = self.cache_dir / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=runs, prefix=f"{self.name}-"))
        try:
            input_dir, output_dir = work / "input", work / "output"
            input_dir.mkdir()
            write(input_dir)
            for path in input_dir.iterdir():
                path.chmod(0o644)
            input_dir.chmod(0o755)
            output_dir.mkdir()
            output_dir.chmod(0o777)  # the container's non-root user writes here
            mounts = {"/input": (input_dir, "ro"), "/output": (output_dir, "rw")}
            if weights.path is not None:
                mounts["/weights"] = (weights.path, "ro")
            log_file = work / LOG_FILE
            run = docker_engine.run_container(
                engine, image, mounts=mounts, limits=self.limits(), name=self.name,
                log=self.options.log, log_file=log_file, on_start=self.options.on_start,
            )
            run_info = {
                "container_runtime_s": round(run.runtime_s, 3),
                "log_tail": run.log_tail[-RESULT_LOG_LINES:],
                "gpus": self.gpus,
            }
            self._check_exit(run, output_dir)
            return read(output_dir, log_file), run_info
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # Perturbation predictions (models with ``output: predictions``) ------------------

    def bind(self, dataset: Dataset) -> None:
        """Check the model can take ``dataset`` and remember its organism for requests.

        Raises
        ------
        NotApplicableError
            As :func:`check_applicable`.
        """
        check_applicable(self.spec, dataset, self.variant)
        self._bound = dataset

    def predict_expression_shift(self, train: Any, test_conditions: Any, *, seed: int) -> np.ndarray:
        """Predicted mean log-normalised expression of each test condition, by the image.

        Input: ``dataset.h5ad`` holds the training cells (raw counts; obs ``condition``
        and ``batch``); ``request.test_conditions`` the conditions to predict.

        Returns
        -------
        Array of shape ``(len(test_conditions), n_genes)``, rows in ``test_conditions`` order.
        """
        conditions = [str(c) for c in test_conditions]
        request = self._prediction_request(PREDICT_EXPRESSION_SHIFT, seed, train, test_conditions=conditions)

        def write(input_dir: Path) -> None:
            _write_screen(train, input_dir, request)

        return self._predict(write, rows=conditions, genes=train.genes)

    def predict_masked_genes(self, data: Any, cells: np.ndarray, masked: np.ndarray, *, seed: int) -> np.ndarray:
        """Predicted log-normalised expression of the selected cells, by the image.

        Input: ``dataset.h5ad`` holds the screen with the hidden entries zeroed, obs
        ``selected`` marking the cells to predict and layer ``masked`` (the hidden entries
        of those cells).

        Returns
        -------
        Array of shape ``(len(cells), n_genes)``.
        """
        request = self._prediction_request(PREDICT_MASKED_GENE, seed, data)
        ids = _cell_ids(data)

        def write(input_dir: Path) -> None:
            _write_screen(data, input_dir, request, selected=cells, masked=masked)

        return self._predict(write, rows=[ids[i] for i in cells], genes=data.genes)

    def _prediction_request(self, task: str, seed: int, data: Any, **fields: Any) -> dict[str, Any]:
        bound = getattr(self, "_bound", None)
        if bound is None:
            msg = f"{self.name}: bind(dataset) before predicting"
            raise EmbeddingError(msg)
        request = build_request(
            self.spec, bound, seed=seed, device="cpu" if self.gpus == "none" else "cuda",
            variant=self.variant, gene_id_type="symbol", batch_size=self.options.batch_size,
        )
        request["batch_keys"] = ["batch"] if data.batches is not None else []
        return {**request, "task": task, "condition_key": "condition",
                "control_label": data.control_label, **fields}

    def _predict(self, write: Callable[[Path], None], *, rows: list[str], genes: Any) -> np.ndarray:
        from czb.runner import docker_engine
        from czb.runner.weights import resolve_weights

        weights = resolve_weights(self.spec, self.variant, weights_dir=self.options.weights_dir,
                                  cache_dir=self.cache_dir)
        engine = docker_engine.client()
        self._image = image = docker_engine.image_info(engine, self.spec.image, model=self.name)
        predicted, _ = self._execute(write, lambda out, _log: read_predictions(out, name=self.name, rows=rows,
                                                                              genes=genes),
                                     weights, image, engine)
        return predicted

    def _check_exit(self, run: Any, output_dir: Path) -> None:
        last = run.log_tail[-ERROR_LOG_LINES:]
        shown = ("; last log lines:\n  " + "\n  ".join(last)) if last else ""
        if run.timed_out:
            msg = f"{self.name}: killed after the {self.limits().timeout_s} s timeout{shown}"
            raise ModelRunError(msg, log_tail=run.log_tail)
        if run.exit_code == EXIT_OK:
            return
        reason = _reason(output_dir)
        if run.exit_code == EXIT_NOT_APPLICABLE:
            msg = f"{self.name}: not applicable: {reason or 'the container exited 99'}"
            raise NotApplicableError(msg)
        limit = self.limits().memory_gb
        if run.oom_killed:
            why = f"killed for exceeding its {limit} GB memory limit (raise --memory-gb)"
        elif run.exit_code == 137:
            # Docker does not always flag an OOM kill; say what else a SIGKILL can be.
            cause = f"`docker kill`, or exceeding its {limit} GB memory limit (raise --memory-gb)" if limit else (
                "`docker kill` or the kernel's OOM killer")
            why = f"killed (exit 137: SIGKILL, by {cause})"
        else:
            why = f"exit code {run.exit_code}"
        detail = f": {reason}" if reason else ""
        msg = f"{self.name}: container failed ({why}){detail}{shown}"
        raise ModelRunError(msg, log_tail=run.log_tail)

    def __repr__(self) -> str:
        return f"DockerModelSource({self.name!r}, image={self.spec.image!r}, variant={self.variant!r})"


def _reason(output_dir: Path) -> str | None:
    try:
        data = json.loads((output_dir / REASON_FILE).read_text())
        return str(data.get("reason")) if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _read_tail(path: Path, n: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


# --------------------------------------------------------------------------- build


def build_model_image(
    spec: ModelSpec,
    *,
    base_image: str | None = None,
    torch_spec: str | None = None,
    find_links: Path | None = None,
    tag: str | None = None,
    log: LogSink | None = None,
) -> ImageInfo:
    """Build a model's image from its container folder (``czb models build``).

    The build context holds ``model/`` (the container folder), ``common/`` (the
    container side of the contract), ``wheels/`` (``*.whl`` from ``find_links``, e.g. a
    CPU build of torch) and the host's CA bundle.

    Parameters
    ----------
    base_image
        ``BASE_IMAGE`` build argument (default: the Dockerfile's, a Python image; a
        CUDA runtime image for GPU use, or a local base for offline tests).
    torch_spec
        ``TORCH_SPEC`` build argument, e.g. ``torch==2.13.0``.
    find_links
        Folder of local wheels (default: ``PIP_FIND_LINKS`` when it is a folder).
    tag
        Image tag (default: the spec's ``image``).
    """
    from czb.runner import docker_engine
    from czb.runner.specs import BUNDLED_CONTAINERS_DIR

    folder = spec.container_dir()
    common = BUNDLED_CONTAINERS_DIR / "common"
    build_args = {}
    if base_image:
        build_args["BASE_IMAGE"] = base_image
    if torch_spec:
        build_args["TORCH_SPEC"] = torch_spec
    if find_links is None and os.environ.get("PIP_FIND_LINKS"):
        candidate = Path(os.environ["PIP_FIND_LINKS"])
        find_links = candidate if candidate.is_dir() else None
    wheels = sorted(Path(find_links).glob("*.whl")) if find_links else []
    ca_bundle = _ca_bundle()
    engine = docker_engine.client()
    return docker_engine.build_image(
        engine,
        context_parts={"model": folder, "common": common},
        dockerfile="model/Dockerfile",
        tag=tag or spec.image,
        build_args=build_args,
        wheels=wheels,
        ca_bundle=ca_bundle,
        log=log,
    )


def _ca_bundle() -> Path | None:
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None
