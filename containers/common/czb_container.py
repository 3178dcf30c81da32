"""The container side of czb's model contract (contract version 1).

Every model image copies this one module next to its entrypoint. It depends on the
standard library, numpy and anndata only, never on the ``czb`` host package, so host
and image versions stay independent: only plain files cross the boundary.

Mounts (see README, "Wrap your own model")::

    /input    read-only   dataset.h5ad (raw counts, gene IDs of the declared kind), request.json
    /weights  read-only   the model's weights, staged by the host
    /output   writable    embeddings.npy, cell_ids.json, meta.json (written last); the host
                          reads only these names, as regular files (no links) within size caps

Exit codes: 0 done, 99 not applicable (e.g. an organism the model does not support),
anything else a failure (the host keeps the last log lines).

An entrypoint is a function ``embed(job: Job) -> ModelOutput`` handed to :func:`main`::

    def embed(job):
        adata = job.read_dataset()
        ...
        return ModelOutput(embeddings, adata.obs_names, n_weight_tensors=n)

    if __name__ == "__main__":
        main(embed, model="my_model", package="my-package")
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import random
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONTRACT_VERSION = 1

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NOT_APPLICABLE = 99

REQUEST_FILE = "request.json"
DATASET_FILE = "dataset.h5ad"
EMBEDDINGS_FILE = "embeddings.npy"
CELL_IDS_FILE = "cell_ids.json"
META_FILE = "meta.json"
REASON_FILE = "reason.json"
PREDICTIONS_FILE = "predictions.h5ad"

#: What a request asks for: cell embeddings, or one of the perturbation formulations.
TASK_EMBEDDING = "embedding"
TASK_EXPRESSION_SHIFT = "perturbation_expression_shift"
TASK_MASKED_GENE = "perturbation_masked_gene"

log = logging.getLogger("czb_container")


class ContractError(Exception):
    """The input does not follow the contract (missing file, wrong field...)."""


class NotApplicable(Exception):  # noqa: N818 - a verdict, not an error
    """The model cannot embed this dataset (organism, gene IDs...); exits with 99."""


class PartialLoadError(Exception):
    """A checkpoint did not fill every tensor of the model, or held tensors it does not use."""


# --------------------------------------------------------------------------- request


@dataclass(frozen=True)
class Request:
    """What the host asks for, read from ``/input/request.json``.

    Attributes
    ----------
    model
        Model name in the host's catalog.
    variant
        Which published weights (e.g. ``"whole_human"``); ``None`` for the default.
    seed
        Seed for every random number generator.
    device
        ``"cuda"`` or ``"cpu"``.
    batch_size
        Cells per forward pass.
    organism
        The dataset's organism, as the host names it (``"human"``, ``"mouse"``...).
    gene_id_type
        ``"ensembl"`` or ``"symbol"``: what ``var_names`` of the dataset hold.
    batch_keys
        obs columns holding batch labels (the host copies them into the dataset).
    parameters
        Every parameter the model spec declares (but ``batch_size``), valued from the
        spec's defaults and the command line; read them with :meth:`Job.parameter`.
    """

    model: str
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 32
    variant: str | None = None
    organism: str = "human"
    gene_id_type: str = "ensembl"
    batch_keys: tuple[str, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    dataset_file: str = DATASET_FILE
    contract_version: int = CONTRACT_VERSION
    #: ``embedding`` (default), ``perturbation_expression_shift`` or ``perturbation_masked_gene``.
    task: str = TASK_EMBEDDING
    #: Perturbation requests: the obs column of conditions and the control condition.
    condition_key: str = "condition"
    control_label: str | None = None
    #: Expression shift: the conditions whose mean expression to predict.
    test_conditions: tuple[str, ...] = ()

    @classmethod
    def from_file(cls, path: Path) -> Request:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            msg = f"{path}: request file missing"
            raise ContractError(msg) from None
        except (OSError, ValueError) as e:
            msg = f"{path}: cannot read request ({e})"
            raise ContractError(msg) from None
        if not isinstance(raw, dict):
            msg = f"{path}: request must be a JSON object"
            raise ContractError(msg)
        version = raw.get("contract_version", CONTRACT_VERSION)
        if version != CONTRACT_VERSION:
            msg = f"{path}: contract version {version}; this image speaks {CONTRACT_VERSION}"
            raise ContractError(msg)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            msg = f"{path}: unknown request field(s) {', '.join(unknown)}"
            raise ContractError(msg)
        if "model" not in raw:
            msg = f"{path}: request has no 'model'"
            raise ContractError(msg)
        raw["batch_keys"] = tuple(raw.get("batch_keys") or ())
        raw["test_conditions"] = tuple(raw.get("test_conditions") or ())
        raw["parameters"] = dict(raw.get("parameters") or {})
        request = cls(**raw)
        if request.task not in (TASK_EMBEDDING, TASK_EXPRESSION_SHIFT, TASK_MASKED_GENE):
            msg = f"{path}: unknown task {request.task!r}"
            raise ContractError(msg)
        if request.device not in ("cpu", "cuda"):
            msg = f"{path}: device must be 'cpu' or 'cuda', got {request.device!r}"
            raise ContractError(msg)
        if isinstance(request.batch_size, bool) or not isinstance(request.batch_size, int) or request.batch_size < 1:
            msg = f"{path}: batch_size must be a positive integer, got {request.batch_size!r}"
            raise ContractError(msg)
        return request

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["batch_keys"] = list(self.batch_keys)
        d["test_conditions"] = list(self.test_conditions)
        d["parameters"] = dict(self.parameters)
        return json.dumps(d, indent=2, sort_keys=True)


@dataclass
class Job:
    """One run of an entrypoint: the request and the three folders."""

    request: Request
    input_dir: Path
    weights_dir: Path
    output_dir: Path

    @property
    def parameters(self) -> Mapping[str, Any]:
        return self.request.parameters

    def parameter(self, name: str) -> Any:
        """The value of a parameter the model spec declares.

        The host sends every declared parameter, its value checked against the
        declaration, so defaults live in the spec only.

        Raises
        ------
        ContractError
            The request does not hold ``name``: the model spec does not declare it.
        """
        if name not in self.request.parameters:
            sent = ", ".join(sorted(self.request.parameters)) or "none"
            msg = (
                f"{REQUEST_FILE}: parameter {name!r} missing (sent: {sent}); the host sends every "
                f"parameter the model spec declares: declare {name} under the spec's parameters"
            )
            raise ContractError(msg)
        return self.request.parameters[name]

    def read_dataset(self) -> Any:
        """The input dataset as an in-memory AnnData (``X`` raw counts, CSR)."""
        import anndata as ad

        path = self.input_dir / self.request.dataset_file
        if not path.is_file():
            msg = f"{path}: input dataset missing"
            raise ContractError(msg)
        adata = ad.read_h5ad(path)
        log.info("dataset: %d cells × %d genes (%s)", adata.n_obs, adata.n_vars, self.request.gene_id_type)
        return adata

    def weights_path(self, *parts: str) -> Path:
        """A file or folder under the weights mount; clear error when it is missing."""
        path = self.weights_dir.joinpath(*parts)
        if not path.exists():
            present = sorted(p.name for p in self.weights_dir.iterdir()) if self.weights_dir.is_dir() else []
            msg = (
                f"weights file {path} missing (weights folder holds: "
                f"{', '.join(present[:10]) or 'nothing'}); stage them with "
                f"`czb models fetch-weights {self.request.model}` or pass --weights DIR"
            )
            raise ContractError(msg)
        return path

    def require_organism(self, supported: Iterable[str]) -> None:
        """Exit as not applicable when the dataset's organism is not supported."""
        supported = list(supported)
        if self.request.organism not in supported:
            msg = (
                f"{self.request.model} supports {', '.join(supported)}; "
                f"dataset organism is {self.request.organism}"
            )
            raise NotApplicable(msg)


@dataclass
class ModelOutput:
    """What an entrypoint returns.

    Attributes
    ----------
    embeddings
        Array of shape ``(n_embedded_cells, dim)``.
    cell_ids
        Sequence of length ``n_embedded_cells``: the input cell IDs of the rows, in row
        order. A model may drop cells (the host realigns and records how many).
    n_weight_tensors
        Number of weight tensors actually loaded from ``/weights`` (0 for models that
        train on the data, like scVI's de novo mode).
    info
        Anything else worth keeping in ``meta.json`` (genes matched, cells dropped and
        why, model settings read from the checkpoint...).
    """

    embeddings: Any
    cell_ids: Sequence[str]
    n_weight_tensors: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictionOutput:
    """What a perturbation entrypoint returns.

    Attributes
    ----------
    predictions
        Array of shape ``(n_rows, n_genes)``: predicted log-normalised expression
        (``log1p(counts / total * 1e4)``). Rows are the request's ``test_conditions``
        (expression shift: each condition's mean) or the input cells with
        ``obs['selected']`` (masked genes: each cell).
    row_names
        Condition names or cell IDs of the rows, in row order.
    gene_names
        The input's ``var_names`` the columns belong to, in column order.
    n_weight_tensors, info
        As in :class:`ModelOutput`.
    """

    predictions: Any
    row_names: Sequence[str]
    gene_names: Sequence[str]
    n_weight_tensors: int
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    """Seed Python, numpy and (when installed) torch; make torch kernels deterministic.

    Models that break ties at random (scGPT) give the same embedding for the same seed.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(request: Request) -> str:
    """``"cuda"`` or ``"cpu"``; fails clearly when CUDA is asked for and absent."""
    if request.device == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        msg = (
            "request asks for device 'cuda' but torch sees no GPU in this container "
            "(run with --gpus none to use the CPU)"
        )
        raise ContractError(msg)
    return "cuda"


def load_state_dict_strictly(
    module: Any,
    state_dict: Mapping[str, Any],
    *,
    name: str = "checkpoint",
    ignore_unexpected: Iterable[str] = (),
    ignore_missing: Iterable[str] = (),
) -> int:
    """Load ``state_dict`` into a torch ``module`` and fail unless every tensor is filled.

    Published checkpoints are often loaded with ``strict=False``, which silently keeps
    random weights for every tensor whose name does not match: the model then runs and
    returns garbage. Here every parameter and buffer of ``module`` must come from the
    checkpoint with the right shape, except names starting with a prefix in
    ``ignore_missing``; checkpoint tensors the module has no slot for are an error too,
    except names starting with a prefix in ``ignore_unexpected`` (e.g. training-only
    heads).

    Returns
    -------
    Number of tensors loaded.

    Raises
    ------
    PartialLoadError
        Naming the missing, unexpected and mis-shaped tensors.
    """
    ignore_unexpected, ignore_missing = tuple(ignore_unexpected), tuple(ignore_missing)
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.startswith(ignore_missing)]
    unexpected = [k for k in state_dict if k not in own and not k.startswith(ignore_unexpected)]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        msg = f"{name}: partial load of {len(own)} model tensors: " + "; ".join(parts)
        raise PartialLoadError(msg)
    usable = {k: v for k, v in state_dict.items() if k in own}
    module.load_state_dict(usable, strict=False)
    return len(usable)


def weights_checksum(weights_dir: Path) -> str | None:
    """The folder digest of ``weights_dir``, for ``meta.json``'s ``weights_checksum``.

    sha256 fed, for every file under the folder in pathlib's sort order (sorted ``Path``
    objects: by path components), its POSIX path relative to the folder, a NUL byte, its
    bytes and a NUL byte: the host's ``czb.models.weights.directory_checksum``, as the
    README's container contract defines it. ``None`` when the folder is empty or absent
    (a model trained on the data itself).
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        return None
    files = sorted(p for p in weights_dir.rglob("*") if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(weights_dir).as_posix().encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- outputs


def write_outputs(output_dir: Path, output: ModelOutput, meta: Mapping[str, Any]) -> None:
    """Write ``embeddings.npy``, ``cell_ids.json``, then ``meta.json``.

    Each file is written under a temporary name and renamed, and ``meta.json`` comes
    last, so a run killed midway leaves no ``meta.json``: the host treats that as a
    failure and keeps nothing.
    """
    output_dir = Path(output_dir)
    values = np.asarray(output.embeddings)
    if values.ndim != 2:
        msg = f"embeddings must be 2-D (cells × dims), got shape {values.shape}"
        raise ContractError(msg)
    values = np.ascontiguousarray(values, dtype=np.float32)
    ids = [str(i) for i in output.cell_ids]
    if len(ids) != values.shape[0]:
        msg = f"{len(ids)} cell IDs for {values.shape[0]} embedding rows"
        raise ContractError(msg)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values).all(axis=1)).sum())
        msg = f"{bad} of {values.shape[0]} embedding rows hold NaN or infinite values"
        raise ContractError(msg)

    def atomic(name: str, write: Callable[[Any], None], mode: str) -> None:
        tmp = output_dir / f".{name}.partial"
        with tmp.open(mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(output_dir / name)

    atomic(EMBEDDINGS_FILE, lambda f: np.save(f, values, allow_pickle=False), "wb")
    atomic(CELL_IDS_FILE, lambda f: json.dump(ids, f), "w")
    atomic(META_FILE, lambda f: json.dump(dict(meta), f, indent=2, sort_keys=True, default=str), "w")


def write_predictions(output_dir: Path, output: PredictionOutput, meta: Mapping[str, Any]) -> None:
    """Write ``predictions.h5ad`` (rows × genes, float32), then ``meta.json``; atomically."""
    import anndata as ad
    import pandas as pd

    output_dir = Path(output_dir)
    values = np.ascontiguousarray(np.asarray(output.predictions), dtype=np.float32)
    rows, genes = [str(r) for r in output.row_names], [str(g) for g in output.gene_names]
    if values.ndim != 2 or values.shape != (len(rows), len(genes)):
        msg = f"predictions of shape {values.shape} for {len(rows)} rows × {len(genes)} genes"
        raise ContractError(msg)
    if not np.isfinite(values).all():
        msg = "predictions hold NaN or infinite values"
        raise ContractError(msg)
    tmp = output_dir / f".{PREDICTIONS_FILE}.partial"
    ad.AnnData(X=values, obs=pd.DataFrame(index=pd.Index(rows)), var=pd.DataFrame(index=pd.Index(genes))).write_h5ad(tmp)
    tmp.replace(output_dir / PREDICTIONS_FILE)
    meta_tmp = output_dir / f".{META_FILE}.partial"
    meta_tmp.write_text(json.dumps(dict(meta), indent=2, sort_keys=True, default=str))
    meta_tmp.replace(output_dir / META_FILE)


# --------------------------------------------------------------------------- main


def run(
    embed: Callable[[Job], ModelOutput | PredictionOutput],
    *,
    model: str,
    package: str | None = None,
    input_dir: Path | str | None = None,
    weights_dir: Path | str | None = None,
    output_dir: Path | str | None = None,
) -> int:
    """Run one entrypoint under the contract and return its exit code.

    Folders default to ``/input``, ``/weights`` and ``/output`` (or ``CZB_INPUT_DIR``,
    ``CZB_WEIGHTS_DIR``, ``CZB_OUTPUT_DIR``), so tests can run an entrypoint in-process
    on temporary folders.
    """
    _configure_logging()
    input_dir = Path(input_dir or os.environ.get("CZB_INPUT_DIR", "/input"))
    weights_dir = Path(weights_dir or os.environ.get("CZB_WEIGHTS_DIR", "/weights"))
    output_dir = Path(output_dir or os.environ.get("CZB_OUTPUT_DIR", "/output"))
    started = time.perf_counter()
    try:
        request = Request.from_file(input_dir / REQUEST_FILE)
        log.info("%s: seed %d, device %s, batch size %d", model, request.seed, request.device, request.batch_size)
        seed_everything(request.seed)
        job = Job(request, input_dir, weights_dir, output_dir)
        checksum = weights_checksum(weights_dir)
        loaded = time.perf_counter()
        output = embed(job)
        embedded = time.perf_counter()
        meta = {
            "contract_version": CONTRACT_VERSION,
            "model": model,
            "variant": request.variant,
            "package": package,
            "version": package_version(package) if package else None,
            "weights_checksum": checksum,
            "n_weight_tensors_loaded": int(output.n_weight_tensors),
            "device": request.device,
            "seed": request.seed,
            "task": request.task,
            ("n_rows_out" if isinstance(output, PredictionOutput) else "n_cells_out"): int(np.shape(_values(output))[0]),
            "dim": int(np.shape(_values(output))[1]) if np.ndim(_values(output)) == 2 else None,
            "python": platform.python_version(),
            "torch_version": package_version("torch"),
            "timings": {
                "checksum_s": round(loaded - started, 3),
                "embed_s": round(embedded - loaded, 3),
            },
            **output.info,
        }
        meta["timings"]["total_s"] = round(time.perf_counter() - started, 3)
        if isinstance(output, PredictionOutput):
            write_predictions(output_dir, output, meta)
        else:
            write_outputs(output_dir, output, meta)
    except NotApplicable as e:
        log.error("not applicable: %s", e)
        _write_reason(output_dir, "not_applicable", str(e))
        return EXIT_NOT_APPLICABLE
    except Exception as e:
        log.error("failed: %s: %s\n%s", type(e).__name__, e, traceback.format_exc())
        _write_reason(output_dir, "failed", f"{type(e).__name__}: {e}")
        return EXIT_FAILED
    log.info("%s: done in %.1f s", model, meta["timings"]["total_s"])
    return EXIT_OK


def _values(output: ModelOutput | PredictionOutput) -> Any:
    return output.predictions if isinstance(output, PredictionOutput) else output.embeddings


def main(embed: Callable[[Job], ModelOutput | PredictionOutput], *, model: str, package: str | None = None) -> None:
    """Entrypoint ``__main__``: run and exit with the contract's exit code."""
    sys.exit(run(embed, model=model, package=package))


def _write_reason(output_dir: Path, status: str, reason: str) -> None:
    # A one-line verdict the host shows instead of digging through logs.
    with contextlib.suppress(OSError):
        (Path(output_dir) / REASON_FILE).write_text(json.dumps({"status": status, "reason": reason}))


def _configure_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
