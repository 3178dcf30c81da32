"""What a worker runs: one embed unit, or the score units of one embedding (or group).

These functions run in worker processes (local or on a Ray node); they read the
dataset from its URI (each node's cache) and write their outputs to the store, and
return only a small summary. A unit that fails raises :class:`UnitFailed` (or dies
with its worker) and is retried by the suite runner.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import CzbError, CzbWarning, DatasetError, EmbeddingWarning
from czb.pipeline.plan import Embedder, EmbeddingFile, EmbedUnit, ScoreUnit
from czb.pipeline.store import EMBEDDING_FILE, UNIT_FILE, Store, StoreError, open_store
from czb.pipeline.tasks import PlannedTask
from czb.specs.schema import DatasetSpec

if TYPE_CHECKING:
    from czb.data.dataset import Dataset
    from czb.evaluation.perturbation.expression import Expression
    from czb.evaluation.task import TaskContext
    from czb.models.docker.request import RunOptions
    from czb.models.embedding import EmbeddingSource


class UnitFailed(CzbError):
    """A unit ran but did not produce its output (the model or task failed).

    Attributes
    ----------
    key
        The unit's key.
    log_tail
        The model container's last log lines, when there are any.
    model
        The model's record as the failed run described it (its image digest...), as JSON.
    """

    def __init__(self, key: str, message: str, *, log_tail: Sequence[str] = (), model: dict[str, Any] | None = None):
        super().__init__(message)
        self.key = key
        self.log_tail = list(log_tail)
        self.model = model

    def __reduce__(self):  # keyword-only arguments survive pickling between processes
        return _unit_failed, (self.key, str(self), self.log_tail, self.model)


def _unit_failed(key: str, message: str, log_tail: list[str], model: dict[str, Any] | None) -> UnitFailed:
    return UnitFailed(key, message, log_tail=log_tail, model=model)


@dataclass
class _Kept:
    """What :func:`keep_last_dataset` holds: the dataset a job loaded last (by its key)."""

    show_download: bool
    key: str | None = None
    dataset: Dataset | None = None


#: Set while :func:`keep_last_dataset` is active (``czb run``: jobs one after another in
#: one process); ``None`` in worker processes.
_kept: _Kept | None = None


@contextmanager
def keep_last_dataset(*, show_download: bool = False) -> Iterator[None]:
    """Within this block, jobs in this process reuse the dataset the previous job loaded
    when it is the same (one is kept at most), and show download progress when
    ``show_download``. Worker processes never keep one: an idle worker would hold it."""
    global _kept
    _kept = _Kept(show_download)
    try:
        yield
    finally:
        _kept = None


class DatasetUnusable(DatasetError):
    """A unit's dataset cannot be loaded or validated, or is no longer the content its
    units were keyed by: every unit on it would fail alike (``czb run`` stops at it)."""


def load_checked(spec: DatasetSpec, offline: bool | None, *, expected: str | None = None,
                 since: str = "the run was planned") -> Dataset:
    """The dataset of ``spec``, loaded and validated (reused: :func:`keep_last_dataset`).

    Raises
    ------
    DatasetUnusable
        It cannot be loaded or validated (the loader's message), or its sha256 is not
        ``expected`` (it changed ``since``).
    """
    from czb.data.reading import load_dataset
    from czb.data.validation import validate_dataset

    key = spec.model_dump_json() + repr(offline)
    if _kept is not None and _kept.key == key:
        ds = _kept.dataset
    else:
        if _kept is not None:
            _kept.key = _kept.dataset = None  # released before the next one loads
        try:
            ds = load_dataset(spec, offline=offline, progress=_kept is not None and _kept.show_download)
            validate_dataset(ds)
        except CzbError as e:
            raise DatasetUnusable(str(e)) from e
        if _kept is not None:
            _kept.key, _kept.dataset = key, ds
    if expected is not None and ds.sha256 is not None and ds.sha256 != expected:
        msg = (f"dataset {ds.name!r} changed since {since} (sha256 {ds.sha256}, expected {expected}); "
               "plan it again")
        raise DatasetUnusable(msg)
    return ds


class JobWarning(CzbWarning):
    """A warning of another library raised inside a job, forwarded as one line."""


def with_warnings(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, list[tuple[type[Warning], str]]]:
    """``fn(*args, **kwargs)`` and the warnings it raised, each once: a job's warnings
    travel back with its result (a worker process or node has no terminal of its own) and
    are said where the run is watched (:func:`say_warnings`). czb's own keep their class;
    another library's become a :class:`JobWarning` naming it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = fn(*args, **kwargs)
    said = []
    for w in caught:
        if issubclass(w.category, CzbWarning):
            said.append((w.category, str(w.message)))
        else:
            said.append((JobWarning, f"{w.category.__name__}: {w.message}"))
    return value, list(dict.fromkeys(said))


def say_warnings(said: Sequence[tuple[type[Warning], str]], where: str) -> None:
    """Raise again, here, the warnings a job raised (:func:`with_warnings`)."""
    for category, message in said:
        warnings.warn(message if category is not JobWarning else f"{where}: {message}", category, stacklevel=2)


def assigned_gpus(wants_gpu: bool) -> str | None:
    """The GPUs the executor gave this job (``CUDA_VISIBLE_DEVICES``, as Ray and the local
    executor set it) as a docker ``--gpus`` value, so the container uses those and no
    others; ``None``: as the model spec says."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not wants_gpu or visible is None:
        return None
    ids = [i for i in visible.split(",") if i.strip()]
    return f"device={','.join(ids)}" if ids else "none"


def run_options(options: RunOptions | None, wants_gpu: bool) -> RunOptions:
    """The options a job runs a docker model with: the run's (default: logs not streamed,
    many jobs share the terminal), with the GPUs the executor assigned, if any."""
    from czb.models.docker.request import RunOptions

    options = options if options is not None else RunOptions(log=lambda _line: None)
    assigned = assigned_gpus(wants_gpu)
    return replace(options, gpus=assigned) if assigned is not None else options


def _source(model: Embedder, options: RunOptions | None, wants_gpu: bool) -> EmbeddingSource:
    """The embedding source of an embed unit's model: a user's file, or a model spec's."""
    from czb.models.sources import source_for_file, source_for_model

    if isinstance(model, EmbeddingFile):
        return source_for_file(model.path, key=model.key)
    return source_for_model(model, run_options(options, wants_gpu))


def run_embed_unit(
    unit: EmbedUnit,
    store_url: str,
    *,
    offline: bool | None = None,
    options: RunOptions | None = None,
    raise_errors: bool = False,
) -> dict[str, Any]:
    """Embed the unit's dataset with its model; write the embedding, then ``unit.json``.

    A model that does not apply to the dataset is an outcome (``not_applicable``), not
    a failure. ``options`` are the run's choices for docker models (default: the spec's,
    with container logs kept with the run, not streamed); the GPUs the executor
    assigned win over theirs. With ``raise_errors`` a failing model raises its own
    exception (``czb --debug``). Returns ``{"status", "runtime_s"}``.
    """
    from czb.core import records as R
    from czb.pipeline.dataset_views import dataset_record, dataset_roles, map_labels
    from czb.pipeline.scoring import embed_dataset
    store = open_store(store_url)
    ds = load_checked(unit.dataset, offline, expected=unit.parts["dataset"]["sha256"])
    embedded = embed_dataset(_source(unit.model, options, bool(unit.gpus)), ds, seed=unit.seed,
                             raise_errors=raise_errors)
    if embedded.status == "failed":
        raise UnitFailed(unit.key, embedded.error or "the model failed",
                         log_tail=embedded.model.info.get("log_tail", []),
                         model=embedded.model.model_copy(update={"info": {}}).model_dump(mode="json"))
    folder = f"embeddings/{unit.key}"
    meta: dict[str, Any] = {
        "key": unit.key, "status": embedded.status, "error": embedded.error,
        "model": embedded.model.model_dump(mode="json"),
        "dataset": dataset_record(ds).model_dump(mode="json"), "runtime_s": embedded.runtime_s,
        "parts": unit.parts, "host": socket.gethostname(), "finished_at": R.now_utc(),
    }
    if embedded.embedding is not None:
        emb = embedded.embedding
        arrays = {"values": emb.values}
        if emb.cell_index is not None:
            arrays["cell_index"] = emb.cell_index
        store.write_arrays(f"{folder}/{EMBEDDING_FILE}", **arrays)
        roles = dataset_roles(ds, emb.cell_index)  # maps in reports: a sample beside the results
        sample, payload = R.embedding_sample(emb.values, dataset=ds.name, model=unit.model.name,
                                             labels=map_labels(roles.get("labels")),
                                             batches=map_labels(roles.get("batch")))
        try:
            store.write_bytes(f"results/{sample}", payload)
            meta["embedding_sample"] = sample
        except StoreError as e:  # it only serves report maps: the embedding is kept
            warnings.warn(f"{e}; reports will have no map of it", EmbeddingWarning, stacklevel=2)
    store.write_json(f"{folder}/{UNIT_FILE}", meta)  # last: the unit is done
    return {"status": embedded.status, "runtime_s": embedded.runtime_s}


def run_score_units(
    units: Sequence[ScoreUnit],
    store_url: str,
    *,
    n_jobs: int = 1,
    offline: bool | None = None,
    options: RunOptions | None = None,
    raise_errors: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score every unit (all on the same embedding, or the same group's stacked
    embeddings) with one shared evaluation context, so the neighbour graph and other
    shared values are computed once.

    Each finished unit's output is written as soon as it is known, so a job that dies
    halfway keeps what it finished. Returns ``{key: {"status", "error", "runtime_s"}}``;
    a failed task is reported there (and not written), not raised (unless
    ``raise_errors``). ``options`` are the run's for a docker predictor (:func:`run_options`).
    """
    from czb.pipeline.scoring import embedding_context
    if len({u.embed_keys for u in units}) != 1:
        msg = "a score job reads one embedding (or one group's); these units read several"
        raise CzbError(msg)
    store = open_store(store_url)
    planned = [PlannedTask.build(u.task) for u in units]
    if units[0].predictor is not None:
        return _score_predictions(units, planned, store, n_jobs=n_jobs, offline=offline, options=options,
                                  raise_errors=raise_errors)
    reads_expression = any("expression" in p.task.info.requires for p in planned)
    values, roles, expression, relationship_sources, rows = _scoring_input(units[0], store, offline,
                                                                           expression=reads_expression)
    pre = None
    if units[0].pre_integration is not None and any(p.task.reads_pre_integration for p in planned):
        pre = _pre_integration(units[0].pre_integration, store, rows=rows, n_rows=len(values))
    context = embedding_context(values, roles, tasks=[p.task for p in planned], expression=expression,
                                relationship_sources=relationship_sources, n_jobs=n_jobs, exact=units[0].exact,
                                pre_integration=pre)
    context.plan(p.task for p in planned)
    return _run_units(units, planned, context, store, raise_errors=raise_errors)


def _run_units(units: Sequence[ScoreUnit], planned: Sequence[PlannedTask], context: TaskContext, store: Store,
               extra: Callable[[], dict[str, Any]] | None = None, *, raise_errors: bool = False
               ) -> dict[str, dict[str, Any]]:
    """Each unit's task on ``context`` with its seed, its output written as soon as it is
    known (with ``extra()``'s fields, read after the task)."""
    from czb.core import records as R
    from czb.evaluation.runner import run_task
    outcomes: dict[str, dict[str, Any]] = {}
    for unit, p in zip(units, planned):
        result = run_task(p.task, context, [unit.seed], raise_errors=raise_errors)
        outcomes[unit.key] = {"status": result.status, "error": result.error, "runtime_s": result.runtime_s}
        if result.status == "failed":
            continue
        store.write_json(f"scores/{unit.key}.json", {
            "key": unit.key, "status": result.status, "error": result.error, "seed": unit.seed,
            "metrics": [{"name": m.name, "value": _plain(m.values_raw[0]), "params": m.params,
                         "ci95": list(m.ci95) if m.ci95 is not None else None,
                         "bootstrap": None if m.bootstrap is None else m.bootstrap.to_json()}
                        for m in result.metrics],
            "runtime_s": result.runtime_s, "peak_memory_mb": result.peak_memory_mb,
            "computation": result.computation, "parts": unit.parts,
            "host": R.host_record().model_dump(mode="json"), "finished_at": R.now_utc(),
            **(extra() if extra else {}),
        })
    return outcomes


def _score_predictions(units: Sequence[ScoreUnit], planned: Sequence[PlannedTask], store: Store, *, n_jobs: int,
                       offline: bool | None, options: RunOptions | None, raise_errors: bool
                       ) -> dict[str, dict[str, Any]]:
    """Perturbation tasks on one predictor and dataset: the predictor runs inside them."""
    from czb.core.errors import NotApplicableError
    from czb.evaluation.perturbation.prediction.data import PerturbationContext
    from czb.models.predictors import perturbation_data, predictor_for_model
    from czb.pipeline.dataset_views import dataset_record
    from czb.pipeline.scoring import model_record
    spec = units[0].predictor
    ds = load_checked(units[0].datasets[0], offline, expected=units[0].parts["dataset"]["sha256"])
    source = predictor_for_model(spec, run_options(options, spec.resources.gpu))
    dataset = dataset_record(ds).model_dump(mode="json")

    def described() -> dict[str, Any]:  # a docker predictor knows its image once it has run
        return {"dataset": dataset, "model": model_record(source.describe()).model_dump(mode="json")}

    try:
        source.bind(ds)  # a docker predictor checks organism and input first
    except NotApplicableError as e:
        for unit in units:
            store.write_json(f"scores/{unit.key}.json", not_applicable_output(unit, str(e), **described()))
        return {u.key: {"status": "not_applicable", "error": str(e), "runtime_s": 0.0} for u in units}
    context = PerturbationContext(perturbation_data(ds), source, n_jobs=n_jobs)
    return _run_units(units, planned, context, store, extra=described)


def _scoring_input(
    unit: ScoreUnit, store: Store, offline: bool | None, *, expression: bool
) -> tuple[np.ndarray, dict[str, np.ndarray], Expression | None, Sequence[str] | None, np.ndarray | None]:
    """What the unit scores: ``(values, roles, expression, relationship_sources, rows)``
    (``rows``: the dataset rows the embedding has, ``None`` for all); for a group, the
    members' embeddings stacked (:func:`czb.pipeline.groups.stack_members`), with no
    expression (no task over several datasets reads it)."""
    from czb.core import records as R
    from czb.models.embedding import Embedding
    from czb.pipeline.dataset_views import dataset_expression, dataset_record, dataset_roles
    from czb.pipeline.groups import GroupMember, stack_members
    from czb.pipeline.scoring import Embedded, stored_model

    members = []
    for key, spec in zip(unit.embed_keys, unit.datasets):
        try:
            arrays = store.read_arrays(f"embeddings/{key}/{EMBEDDING_FILE}")
            meta = store.read_json(f"embeddings/{key}/{UNIT_FILE}") or {}
            if "values" not in arrays or not isinstance(meta, dict):
                msg = f"{store.url}/embeddings/{key} is not a czb embedding"
                raise StoreError(msg)
        except StoreError as e:
            # Unreadable: removed, so the suite runner embeds it again (and this unit waits).
            store.forget_embedding(key)
            msg = f"{e}; removed, to be embedded again"
            raise StoreError(msg) from None
        ds = load_checked(spec, offline, expected=meta.get("dataset", {}).get("sha256"), since="it was embedded")
        embedding = Embedding(values=arrays["values"], model=unit.model, kind="stored",
                              cell_index=arrays.get("cell_index"))
        if len(unit.embed_keys) == 1:
            return (embedding.values, dataset_roles(ds, embedding.cell_index),
                    dataset_expression(ds, embedding.cell_index) if expression else None,
                    ds.spec.relationship_sources, embedding.cell_index)
        unknown = R.ModelRecord(name=unit.model, kind="stored", image_digest="in-process")
        model = stored_model(meta.get("model"), unknown)
        members.append(GroupMember(dataset_record(ds), Embedded(model, embedding),
                                   dataset_roles(ds, embedding.cell_index)))
        del ds  # a member's AnnData is not kept
    _, stacked, roles = stack_members(members)
    if stacked.embedding is None:
        raise CzbError(stacked.error or "the group's embeddings cannot be stacked")
    return stacked.embedding.values, roles, None, None, None


def _pre_integration(key: str, store: Store, *, rows: np.ndarray | None, n_rows: int) -> np.ndarray | None:
    """The dataset's PCA baseline (embed unit ``key``), aligned with an embedding of
    ``n_rows`` rows of the dataset (``rows``; ``None``: all in order). ``None`` when it is
    not there (its unit failed) or does not cover the embedding's cells: the metrics
    reading it are then left out with their reason."""
    try:
        meta = store.read_json(f"embeddings/{key}/{UNIT_FILE}") or {}
        if not isinstance(meta, dict) or meta.get("status") != "ok":
            return None
        pca = store.read_arrays(f"embeddings/{key}/{EMBEDDING_FILE}")
    except StoreError:
        return None
    values = pca.get("values")
    if values is None:
        return None
    # Both index rows of the same dataset: PCA's (all rows when absent) and the embedding's.
    pca_rows = pca.get("cell_index")
    if pca_rows is not None:
        if rows is None:
            rows = np.arange(n_rows)
        at = np.searchsorted(pca_rows, rows)
        if at.max(initial=0) >= len(pca_rows) or not np.array_equal(pca_rows[np.minimum(at, len(pca_rows) - 1)], rows):
            return None
        rows = at
    if rows is not None:
        if rows.max(initial=-1) >= len(values):
            return None
        values = values[rows]
    return values if len(values) == n_rows else None


def not_applicable_output(unit: ScoreUnit, reason: str, **extra: Any) -> dict[str, Any]:
    """A score unit's output when its model cannot produce what the task scores."""
    return {"key": unit.key, "status": "not_applicable", "error": reason, "seed": unit.seed, "metrics": [],
            "runtime_s": 0.0, "peak_memory_mb": 0.0, "computation": {}, "parts": unit.parts, **extra}


def _plain(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
