"""What a worker runs: one embed unit, or the score units of one embedding (or group).

These functions run in worker processes (local or on a Ray node); they read the
dataset from its URI (each node's cache) and write their outputs to the store, and
return only a small summary. A unit that fails raises :class:`UnitFailed` (or dies
with its worker) and is retried by the suite runner.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

import numpy as np

from czb.bench.plan import EmbedUnit, ScoreUnit
from czb.bench.store import EMBEDDING_FILE, UNIT_FILE, StoreError, open_store
from czb.core.errors import CzbError


class UnitFailed(CzbError):
    """A unit ran but did not produce its output (the model or task failed).

    Attributes
    ----------
    key
        The unit's key.
    log_tail
        The model container's last log lines, when there are any.
    """

    def __init__(self, key: str, message: str, *, log_tail: Sequence[str] = ()):
        super().__init__(message)
        self.key = key
        self.log_tail = list(log_tail)

    def __reduce__(self):  # keyword-only arguments survive pickling between processes
        return _unit_failed, (self.key, str(self), self.log_tail)


def _unit_failed(key: str, message: str, log_tail: list[str]) -> UnitFailed:
    return UnitFailed(key, message, log_tail=log_tail)


def _load(spec: Any, offline: bool | None) -> Any:
    from czb.data.reading import load_dataset
    from czb.data.validation import validate_dataset

    ds = load_dataset(spec, offline=offline)
    validate_dataset(ds)
    return ds


def _check_unchanged(ds: Any, expected: str | None, since: str = "the suite was planned") -> None:
    """Refuse a dataset whose content is no longer the one its units were keyed by."""
    if expected is not None and ds.sha256 is not None and ds.sha256 != expected:
        msg = (f"dataset {ds.name!r} changed since {since} (sha256 {ds.sha256}, expected {expected}); "
               "plan the suite again")
        raise CzbError(msg)


def assigned_gpus(wants_gpu: bool) -> str | None:
    """The GPUs the executor gave this job (``CUDA_VISIBLE_DEVICES``, as Ray and the local
    executor set it) as a docker ``--gpus`` value, so the container uses those and no
    others; ``None``: as the model spec says."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not wants_gpu or visible is None:
        return None
    ids = [i for i in visible.split(",") if i.strip()]
    return f"device={','.join(ids)}" if ids else "none"


def run_embed_unit(unit: EmbedUnit, store_url: str, *, offline: bool | None = None) -> dict[str, Any]:
    """Embed the unit's dataset with its model; write the embedding, then ``unit.json``.

    A model that does not apply to the dataset is an outcome (``not_applicable``), not
    a failure. Returns ``{"status", "runtime_s"}``.
    """
    from czb.core import records as R
    from czb.models.docker.request import RunOptions
    from czb.models.sources import source_for_model
    from czb.pipeline.dataset_views import dataset_record, dataset_roles, map_labels
    from czb.pipeline.scoring import embed_dataset
    store = open_store(store_url)
    ds = _load(unit.dataset, offline)
    _check_unchanged(ds, unit.parts["dataset"]["sha256"])
    # Container logs are kept with the run (its tail in the unit's provenance), not streamed:
    # many units share the terminal.
    options = RunOptions(gpus=assigned_gpus(bool(unit.gpus)), log=lambda _line: None)
    embedded = embed_dataset(source_for_model(unit.model, options), ds, seed=unit.seed)
    if embedded.status == "failed":
        raise UnitFailed(unit.key, embedded.error or "the model failed",
                         log_tail=embedded.model.get("info", {}).get("log_tail", []))
    folder = f"embeddings/{unit.key}"
    meta: dict[str, Any] = {
        "key": unit.key, "status": embedded.status, "error": embedded.error, "model": embedded.model,
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
        store.write_bytes(f"results/{sample}", payload)
        meta["embedding_sample"] = sample
    store.write_json(f"{folder}/{UNIT_FILE}", meta)  # last: the unit is done
    return {"status": embedded.status, "runtime_s": embedded.runtime_s}


def run_score_units(
    units: Sequence[ScoreUnit],
    store_url: str,
    *,
    n_jobs: int = 1,
    offline: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Score every unit (all on the same embedding, or the same group's stacked
    embeddings) with one shared evaluation context, so the neighbour graph and other
    shared values are computed once.

    Each finished unit's output is written as soon as it is known, so a job that dies
    halfway keeps what it finished. Returns ``{key: {"status", "error", "runtime_s"}}``;
    a failed task is reported there (and not written), not raised.
    """
    from czb.pipeline.scoring import embedding_context
    from czb.pipeline.tasks import build_tasks
    if len({u.embed_keys for u in units}) != 1:
        msg = "a score job reads one embedding (or one group's); these units read several"
        raise CzbError(msg)
    store = open_store(store_url)
    planned = build_tasks([u.task for u in units])
    if units[0].predictor is not None:
        return _score_predictions(units, planned, store, n_jobs=n_jobs, offline=offline)
    reads_expression = any("expression" in p.task.info.requires for p in planned)
    values, roles, expression, relationship_sources = _scoring_input(units[0], store, offline,
                                                                     expression=reads_expression)
    context = embedding_context(values, roles, tasks=[p.task for p in planned], expression=expression,
                                relationship_sources=relationship_sources, n_jobs=n_jobs, exact=units[0].exact)
    context.plan(p.task for p in planned)
    return _run_units(units, planned, context, store)


def _run_units(units: Sequence[ScoreUnit], planned: Sequence[Any], context: Any, store: Any,
               extra: Any = None) -> dict[str, dict[str, Any]]:
    """Each unit's task on ``context`` with its seed, its output written as soon as it is
    known (with ``extra()``'s fields, read after the task)."""
    from czb.core import records as R
    from czb.evaluation.runner import run_task
    outcomes: dict[str, dict[str, Any]] = {}
    for unit, p in zip(units, planned):
        result = run_task(p.task, context, [unit.seed])
        outcomes[unit.key] = {"status": result.status, "error": result.error, "runtime_s": result.runtime_s}
        if result.status == "failed":
            continue
        store.write_json(f"scores/{unit.key}.json", {
            "key": unit.key, "status": result.status, "error": result.error, "seed": unit.seed,
            "metrics": [{"name": m.name, "value": _plain(m.values_raw[0]), "params": m.params,
                         "ci95": list(m.ci95) if m.ci95 is not None else None} for m in result.metrics],
            "runtime_s": result.runtime_s, "peak_memory_mb": result.peak_memory_mb,
            "computation": result.computation, "parts": unit.parts,
            "host": R.host_record().model_dump(mode="json"), "finished_at": R.now_utc(),
            **(extra() if extra else {}),
        })
    return outcomes


def _score_predictions(units: Sequence[ScoreUnit], planned: Sequence[Any], store: Any, *, n_jobs: int,
                       offline: bool | None) -> dict[str, dict[str, Any]]:
    """Perturbation tasks on one predictor and dataset: the predictor runs inside them."""
    from czb.core.errors import NotApplicableError
    from czb.evaluation.perturbation.prediction.data import PerturbationContext
    from czb.models.docker.request import RunOptions
    from czb.models.predictors import perturbation_data, predictor_for_model
    from czb.pipeline.dataset_views import dataset_record
    spec = units[0].predictor
    ds = _load(units[0].datasets[0], offline)
    _check_unchanged(ds, units[0].parts["dataset"]["sha256"])
    source = predictor_for_model(spec, RunOptions(gpus=assigned_gpus(spec.resources.gpu), log=lambda _l: None))
    dataset = dataset_record(ds).model_dump(mode="json")

    def described() -> dict[str, Any]:  # a docker predictor knows its image once it has run
        return {"dataset": dataset, "model": {**source.describe(), "info": {}}}

    try:
        if hasattr(source, "bind"):  # a docker predictor: organism and input checks first
            source.bind(ds)
    except NotApplicableError as e:
        for unit in units:
            store.write_json(f"scores/{unit.key}.json", not_applicable_output(unit, str(e), **described()))
        return {u.key: {"status": "not_applicable", "error": str(e), "runtime_s": 0.0} for u in units}
    context = PerturbationContext(perturbation_data(ds), source, n_jobs=n_jobs)
    return _run_units(units, planned, context, store, extra=described)


def _scoring_input(
    unit: ScoreUnit, store: Any, offline: bool | None, *, expression: bool
) -> tuple[Any, dict[str, Any], Any, Any]:
    """What the unit scores: ``(values, roles, expression, relationship_sources)``; for a
    group, the members' embeddings stacked (:func:`czb.pipeline.groups.stack_members`), with
    no expression (no task over several datasets reads it)."""
    from czb.models.embedding import Embedding
    from czb.pipeline.dataset_views import dataset_expression, dataset_record, dataset_roles
    from czb.pipeline.groups import GroupMember, stack_members
    from czb.pipeline.scoring import Embedded

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
        ds = _load(spec, offline)
        _check_unchanged(ds, meta.get("dataset", {}).get("sha256"), since="it was embedded")
        embedding = Embedding(values=arrays["values"], model=unit.model, kind="stored",
                              cell_index=arrays.get("cell_index"))
        if len(unit.embed_keys) == 1:
            return (embedding.values, dataset_roles(ds, embedding.cell_index),
                    dataset_expression(ds, embedding.cell_index) if expression else None,
                    ds.spec.relationship_sources)
        members.append(GroupMember(dataset_record(ds), Embedded(meta.get("model", {}), embedding),
                                   dataset_roles(ds, embedding.cell_index)))
        del ds  # a member's AnnData is not kept
    _, stacked, roles = stack_members(members)
    if stacked.embedding is None:
        raise CzbError(stacked.error or "the group's embeddings cannot be stacked")
    return stacked.embedding.values, roles, None, None


def not_applicable_output(unit: ScoreUnit, reason: str, **extra: Any) -> dict[str, Any]:
    """A score unit's output when its model cannot produce what the task scores."""
    return {"key": unit.key, "status": "not_applicable", "error": reason, "seed": unit.seed, "metrics": [],
            "runtime_s": 0.0, "peak_memory_mb": 0.0, "computation": {}, "parts": unit.parts, **extra}


def _plain(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
