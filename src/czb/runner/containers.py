"""The host side of the model container contract (version 1), and the embedding cache.

A docker model (:class:`DockerModelSource`) embeds a dataset in four steps:

1. **input**: the dataset's raw counts go to ``input/dataset.h5ad`` with the gene IDs the
   model declares (converted by :mod:`czb.runner.genes`, never guessed), its batch
   columns in ``obs``, and ``input/request.json`` (:func:`build_request`);
2. **run**: the model's image runs with ``/input`` and ``/weights`` read-only and
   ``/output`` the only writable mount (:func:`czb.runner.docker_engine.run_container`);
3. **output**: ``embeddings.npy`` (float32, cells × dim), ``cell_ids.json`` (the row
   order; a model may drop cells) and ``meta.json``, written last, are copied out of
   ``/output`` (regular files only, within size caps: :func:`collect_output`; the image
   is not trusted) into a folder czb made, then read and checked (:func:`read_output`);
   exit code 99 means *not applicable*, any other non-zero code a failure reported with
   the container's last log lines;
4. **cache**: that folder, with czb's ``key.json`` and the container log, is kept under a
   key of (image ID, weights checksum, dataset checksum, request), so scoring again never
   re-runs the model (:class:`EmbeddingCache`).

The container side is ``containers/common/czb_container.py``; the README's "Wrap your own
model" section states the contract for people writing their own image.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.errors import EmbeddingError, EmbeddingWarning, ModelRunError, NotApplicableError
from czb.runner.contract import (
    CELL_IDS_FILE,
    CONTRACT_VERSION,
    DATASET_FILE,
    EMBEDDINGS_FILE,
    EXIT_NOT_APPLICABLE,
    EXIT_OK,
    LOG_FILE,
    META_FILE,
    NEW_FILE_FLAGS,
    PREDICT_EXPRESSION_SHIFT,
    PREDICT_MASKED_GENE,
    REQUEST_FILE,
    UNLIMITED,
    ModelOutput,
    OutputLimits,
    collect_output,
    copy_fd,
    open_folder,
    open_regular,
    read_output,
    read_predictions,
    read_reason,
    read_tail,
    remove_tree,
)
from czb.runner.embeddings import Embedding, _align
from czb.runner.specs import ModelSpec
from czb.runner.workdirs import TAG_PATTERN, process_tag, stale_folders

if TYPE_CHECKING:
    from czb.runner.datasets import Dataset
    from czb.runner.docker_engine import ImageInfo, LogSink

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

#: How the digest of a weights folder is made (the README gives a reference snippet).
WEIGHTS_DIGEST_RULE = (
    "sha256 over every file under the folder, sorted by path components as pathlib sorts: "
    "its POSIX relative path, a NUL byte, its bytes, a NUL byte"
)

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

    from czb.evaluation.applicability import missing_mask
    from czb.runner.datasets import iter_row_chunks
    from czb.runner.genes import model_genes

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


# --------------------------------------------------------------------------- cache


def cache_key(parts: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``parts``."""
    payload = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def discard_tree(path: Path, what: str) -> None:
    """:func:`~czb.runner.contract.remove_tree`, with a one-line warning instead of an
    error when something cannot be removed."""
    try:
        remove_tree(path)
    except OSError as e:
        message = f"could not remove {what} {path} ({e.strerror or type(e).__name__}); remove it by hand"
        warnings.warn(message, EmbeddingWarning, stacklevel=2)


def remove_stale_work(runs: Path) -> None:
    """Remove the work folders under ``runs`` left by czb processes of this host that are
    gone (killed mid-run), and those without a process tag (an older czb's) more than a day
    old; another host's and a live process's are left (a run may take longer than a day)."""
    for entry in stale_folders(runs, rf".+?-(?:{TAG_PATTERN}-)?[A-Za-z0-9_]+", age_clears_tagged=False):
        discard_tree(entry, "stale work folder")


KEY_FILE = "key.json"
#: What a cache entry may hold besides key.json and the container log.
_ENTRY_OUTPUTS = (META_FILE, CELL_IDS_FILE, EMBEDDINGS_FILE)


class EmbeddingCache:
    """Finished model runs, content-addressed: ``<cache>/embeddings/<key>/``.

    Each entry holds the run's accepted output files (:func:`collect_output`), its
    container log and ``key.json`` (what the key was made of). Entries appear by an atomic
    rename of a complete folder, so a reader never sees a half-written one. An entry is
    read like a container's output (regular files only, within their caps): the cache is
    czb's own, but a damaged entry must not be followed anywhere.
    """

    def __init__(self, cache_dir: Path | None = None):
        if cache_dir is None:
            from czb.settings import get_settings

            cache_dir = get_settings().cache_dir
        self.root = Path(cache_dir) / "embeddings"

    def path(self, key: str) -> Path:
        return self.root / key

    def get(
        self, key: str, *, name: str, limits: OutputLimits | None = None, known_cells: Any = None
    ) -> ModelOutput | None:
        """The entry of ``key`` (``None`` when there is none; a damaged one is removed)."""
        entry = self.path(key)
        try:
            is_folder = stat.S_ISDIR(os.lstat(entry).st_mode)
        except OSError:
            return None
        if is_folder:
            try:
                return read_output(entry, name=name, limits=limits, known_cells=known_cells)
            except EmbeddingError:
                pass
        discard_tree(entry, "damaged embedding cache entry")  # forget it, run again
        return None

    def put(self, key: str, folder: Path, parts: Mapping[str, Any], *, log_file: Path | None = None) -> Path:
        """Move ``folder`` into the cache as the entry of ``key`` (replacing an older one).

        ``folder`` is a folder czb made holding only accepted output files (as
        :func:`collect_output` leaves them), never a container's ``/output`` itself;
        ``key.json`` and the copy of ``log_file`` are created there as new files.

        Raises
        ------
        EmbeddingError
            ``folder`` holds something other than regular output files.
        """
        folder = Path(folder)
        self._check_folder(folder)
        with open_folder(folder, name="embedding cache") as target:
            out = os.open(KEY_FILE, NEW_FILE_FLAGS, 0o644, dir_fd=target)
            with os.fdopen(out, "w") as f:
                f.write(json.dumps(dict(parts), indent=2, sort_keys=True, default=str))
            if log_file is not None:
                with open_folder(Path(log_file).parent, name="embedding cache") as logs:
                    fd = open_regular(logs, Path(log_file).name, UNLIMITED, name="embedding cache")
                    if fd is not None:
                        try:
                            copy_fd(fd, target, LOG_FILE, UNLIMITED, name="embedding cache")
                        finally:
                            os.close(fd)
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.path(key)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}-"))
        staging.rmdir()
        shutil.move(str(folder), staging)
        if os.path.lexists(entry):
            old = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}-old-"))
            old.rmdir()  # a fresh name for the old entry
            entry.rename(old)
            discard_tree(old, "replaced embedding cache entry")
        staging.rename(entry)
        return entry

    @staticmethod
    def _check_folder(folder: Path) -> None:
        with os.scandir(folder) as entries:
            for i, item in enumerate(entries):
                st = item.stat(follow_symlinks=False)
                accepted = item.name in _ENTRY_OUTPUTS and stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                if i >= len(_ENTRY_OUTPUTS) or not accepted:
                    msg = f"embedding cache: {folder} holds {item.name}, which is not an accepted output file"
                    raise EmbeddingError(msg)


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
        limits = OutputLimits.for_cells(dataset.adata.obs_names)
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
        cached = None
        if self.options.use_cache and dataset.sha256:
            # Entries are put only after every check below _run passed, weights included.
            cached = self.cache.get(key, name=self.name, limits=limits, known_cells=dataset.adata.obs_names)
        if cached is not None:
            info["cache"] = "hit"
            output = cached
            entry = self.cache.path(key)
            info["log_tail"] = read_tail(entry, LOG_FILE, RESULT_LOG_LINES)
        else:
            info["cache"] = "off" if not self.options.use_cache else "miss"
            output, entry, run_info = self._run(dataset, request, weights, image, engine, key, parts, limits)
            info.update(run_info)
        info["container_meta"] = output.meta
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
        limits: OutputLimits,
    ) -> tuple[ModelOutput, Path | None, dict[str, Any]]:
        genes: dict[str, Any] = {}

        def write(input_dir: Path) -> None:
            genes.update(write_input(dataset, input_dir, request))

        def read(output_dir: Path, log_file: Path) -> tuple[ModelOutput, Path | None]:
            # A folder of czb's beside /output, never mounted: the only place read from,
            # written to (key.json, the log) and cached.
            accepted = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix="accepted-"))
            collect_output(output_dir, accepted, limits.embedding_files(), name=self.name)
            output = read_output(accepted, name=self.name, limits=limits, known_cells=dataset.adata.obs_names)
            self._check_weights_checksum(output.meta, weights)
            if not dataset.sha256:
                return output, None  # no checksum, no key: nothing to cache under
            return output, self.cache.put(key, accepted, parts, log_file=log_file)

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
        remove_stale_work(runs)
        work = Path(tempfile.mkdtemp(dir=runs, prefix=f"{self.name}-{process_tag()}-"))
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
            # What the run produced is read and kept by now: a folder that will not go
            # away is a warning (the next run removes it), never a failed run.
            discard_tree(work, "work folder")

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

        def read(output_dir: Path, _log: Path) -> np.ndarray:
            return read_predictions(output_dir, name=self.name, rows=rows, genes=genes)

        predicted, _ = self._execute(write, read, weights, image, engine)
        return predicted

    def _check_weights_checksum(self, meta: Mapping[str, Any], weights: Any) -> None:
        """``meta.json``'s ``weights_checksum`` must name the mounted weights, or be null.

        Accepted: the folder digest (:data:`WEIGHTS_DIGEST_RULE`, the staged checksum) and,
        for a folder holding one file, that file's plain sha256.

        Raises
        ------
        EmbeddingError
            Another value; the message gives the accepted values and how they are made.
        """
        expected = weights.checksum
        reported = meta.get("weights_checksum")
        if not expected or reported is None:
            return
        reported = reported.strip().lower() if isinstance(reported, str) else reported
        if reported == expected:
            return
        single = _single_file_sha256(weights.path)
        if single is not None and reported == single:
            return
        shown = reported if isinstance(reported, str) and _SHA256_HEX.fullmatch(reported) else (
            "a value that is not a sha256 hex digest")
        accepted = f"{expected} (the folder digest: {WEIGHTS_DIGEST_RULE})"
        if single is not None:
            accepted += f" or {single} (the plain sha256 of the folder's only file)"
        msg = (
            f"{self.name}: {META_FILE} reports weights_checksum {shown}, but for the weights mounted "
            f"at /weights it must be {accepted}, or null (see the README's container contract)"
        )
        raise EmbeddingError(msg)

    def _check_exit(self, run: Any, output_dir: Path) -> None:
        last = run.log_tail[-ERROR_LOG_LINES:]
        shown = ("; last log lines:\n  " + "\n  ".join(last)) if last else ""
        if run.timed_out:
            msg = f"{self.name}: killed after the {self.limits().timeout_s} s timeout{shown}"
            raise ModelRunError(msg, log_tail=run.log_tail)
        if run.exit_code == EXIT_OK:
            return
        reason, refused = None, None
        try:
            reason = read_reason(output_dir, name=self.name)
        except EmbeddingError as e:
            refused = str(e).removeprefix(f"{self.name}: ")
        if run.exit_code == EXIT_NOT_APPLICABLE:
            if refused:
                msg = f"{self.name}: the container exited 99 (not applicable), but {refused}"
                raise ModelRunError(msg, log_tail=run.log_tail)
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
        detail = f": {reason}" if reason else (f"; {refused}" if refused else "")
        msg = f"{self.name}: container failed ({why}){detail}{shown}"
        raise ModelRunError(msg, log_tail=run.log_tail)

    def __repr__(self) -> str:
        return f"DockerModelSource({self.name!r}, image={self.spec.image!r}, variant={self.variant!r})"


def _single_file_sha256(folder: Path | None) -> str | None:
    """sha256 of the one file under ``folder`` (``None`` unless it holds exactly one)."""
    if folder is None:
        return None
    files = []
    for path in Path(folder).rglob("*"):
        if path.is_file():
            files.append(path)
            if len(files) > 1:
                return None
    if not files:
        return None
    digest = hashlib.sha256()
    with files[0].open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
