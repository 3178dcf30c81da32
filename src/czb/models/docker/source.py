"""The host side of the model container contract (version 1): :class:`DockerModelSource`.

A docker model embeds a dataset in four steps:

1. **input**: the dataset's raw counts go to ``input/dataset.h5ad`` with the gene IDs the
   model declares (converted by :mod:`czb.data.genes`, never guessed), its batch
   columns in ``obs``, and ``input/request.json``
   (:func:`~czb.models.docker.request.build_request`);
2. **run**: the model's image runs with ``/input`` and ``/weights`` read-only and
   ``/output`` the only writable mount (:func:`czb.models.docker.engine.run_container`);
3. **output**: ``embeddings.npy`` (float32, cells × dim), ``cell_ids.json`` (the row
   order; a model may drop cells) and ``meta.json``, written last, are copied out of
   ``/output`` (regular files only, within size caps:
   :func:`~czb.models.docker.output_files.collect_output`; the image is not trusted) into
   a folder czb made, then read and checked (:func:`~czb.models.docker.contract.read_output`);
   exit code 99 means *not applicable*, any other non-zero code a failure reported with
   the container's last log lines;
4. **cache**: that folder, with czb's ``key.json`` and the container log, is kept under a
   key of (image ID, weights checksum, dataset checksum, request), so scoring again never
   re-runs the model (:class:`~czb.models.docker.cache.EmbeddingCache`).

The container side is ``containers/common/czb_container.py``; the README's "Wrap your own
model" section states the contract for people writing their own image.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import EmbeddingError, ModelRunError, NotApplicableError
from czb.core.hashing import cache_key
from czb.models.docker.cache import EmbeddingCache, discard_tree, remove_stale_work
from czb.models.docker.contract import (
    CONTRACT_VERSION,
    EXIT_NOT_APPLICABLE,
    EXIT_OK,
    LOG_FILE,
    META_FILE,
    PREDICT_EXPRESSION_SHIFT,
    PREDICT_MASKED_GENE,
    ModelOutput,
    OutputLimits,
    read_output,
    read_predictions,
    read_reason,
)
from czb.models.docker.output_files import collect_output, read_tail
from czb.models.docker.request import (
    RunOptions,
    build_request,
    check_applicable,
    screen_cell_ids,
    write_input,
    write_screen,
)
from czb.models.embedding import Embedding, align_to_dataset
from czb.models.workdirs import process_tag
from czb.specs.parameters import resolve_parameters
from czb.specs.schema import ModelSpec

if TYPE_CHECKING:
    from czb.data.dataset import Dataset
    from czb.models.docker.engine import ImageInfo

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

#: How the digest of a weights folder is made (the README gives a reference snippet).
WEIGHTS_DIGEST_RULE = (
    "sha256 over every file under the folder, sorted by path components as pathlib sorts: "
    "its POSIX relative path, a NUL byte, its bytes, a NUL byte"
)

#: Log lines kept in a result's provenance, and shown in a failure's message.
RESULT_LOG_LINES = 50
ERROR_LOG_LINES = 20


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

    Raises
    ------
    SpecError
        ``options`` set a parameter the spec does not declare, or a value it does not
        allow: before any dataset, weights or container work.
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
        batch = {"batch_size": self.options.batch_size} if self.options.batch_size else {}
        #: Every declared parameter's value for this source's runs.
        self.parameters = resolve_parameters(spec, {**self.options.parameters, **batch})
        if cache_dir is None:
            from czb.core.settings import get_settings

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
        from czb.models.docker.engine import RunLimits

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
            "parameters": dict(self.parameters),
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
        from czb.models.docker import engine as docker_engine
        from czb.models.weights import resolve_weights

        check_applicable(self.spec, dataset, self.variant)
        weights = resolve_weights(self.spec, self.variant, weights_dir=self.options.weights_dir,
                                  cache_dir=self.cache_dir)
        engine = docker_engine.client()
        self._image = image = docker_engine.image_info(engine, self.spec.image, model=self.name)
        gene_id_type = dataset.spec.gene_id_type if self.spec.gene_id_type == "any" else self.spec.gene_id_type
        request = build_request(
            self.spec, dataset, seed=seed, device="cpu" if self.gpus == "none" else "cuda",
            variant=self.variant, gene_id_type=gene_id_type, parameters=self.parameters,
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
        values, cell_index = align_to_dataset(output.values, output.cell_ids, dataset, name=self.name, info=info)
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
        from czb.models.docker import engine as docker_engine
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
            As :func:`~czb.models.docker.request.check_applicable`.
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
            write_screen(train, input_dir, request)

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
        ids = screen_cell_ids(data)

        def write(input_dir: Path) -> None:
            write_screen(data, input_dir, request, selected=cells, masked=masked)

        return self._predict(write, rows=[ids[i] for i in cells], genes=data.genes)

    def _prediction_request(self, task: str, seed: int, data: Any, **fields: Any) -> dict[str, Any]:
        bound = getattr(self, "_bound", None)
        if bound is None:
            msg = f"{self.name}: bind(dataset) before predicting"
            raise EmbeddingError(msg)
        request = build_request(
            self.spec, bound, seed=seed, device="cpu" if self.gpus == "none" else "cuda",
            variant=self.variant, gene_id_type="symbol", parameters=self.parameters,
        )
        request["batch_keys"] = ["batch"] if data.batches is not None else []
        return {**request, "task": task, "condition_key": "condition",
                "control_label": data.control_label, **fields}

    def _predict(self, write: Callable[[Path], None], *, rows: list[str], genes: Any) -> np.ndarray:
        from czb.models.docker import engine as docker_engine
        from czb.models.weights import resolve_weights

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
