"""Result records from a plan's unit outputs in a store: one per model × dataset × task,
written to the store's ``results/``.

A record whose units are missing says which failed and why; a record the plan marks
``not_applicable`` (a model of the other kind than its task's) says so, with the dataset
and model as the plan's other units saw them.
"""

from __future__ import annotations

from typing import Any

from czb.core import records as R
from czb.core.errors import ResultsError
from czb.core.hashing import cache_key
from czb.evaluation.estimates import Bootstrap
from czb.evaluation.runner import TaskResult, aggregate
from czb.evaluation.task import MetricValue
from czb.pipeline.groups import group_model, group_record
from czb.pipeline.plan import Embedder, EmbeddingFile, Plan, RecordPlan, ScoreUnit
from czb.pipeline.scoring import model_record, result_record, stored_model
from czb.pipeline.store import UNIT_FILE, Store, StoreError
from czb.pipeline.tasks import PlannedTask
from czb.specs.parameters import resolve_parameters
from czb.specs.schema import DatasetSpec

#: What every score output holds (:func:`czb.pipeline.work.run_score_units`, ``not_applicable_output``).
SCORE_OUTPUT_KEYS = ("status", "error", "metrics", "runtime_s", "peak_memory_mb", "computation")
#: What every metric of a score output holds.
SCORE_METRIC_KEYS = ("name", "value", "params", "ci95")
#: What :func:`assemble_records` reads of an embed unit's ``unit.json``.
EMBED_META_KEYS = ("status", "dataset", "model", "runtime_s")


def read_score(store: Store, key: str, *, repair: bool = True) -> dict[str, Any] | None:
    """Score unit ``key``'s output, or ``None`` when it is absent or unreadable (then
    named in a :class:`~czb.pipeline.store.StoreWarning` and, with ``repair``, deleted so
    the unit runs again)."""
    relative = f"scores/{key}.json"
    output = store.read_output(relative, keys=SCORE_OUTPUT_KEYS, repair=repair)
    if output is None:
        return None
    metrics = output["metrics"]
    if not isinstance(metrics, list) or not all(
            isinstance(m, dict) and all(k in m for k in SCORE_METRIC_KEYS) for m in metrics):
        store.discard(relative, "is not a czb score output (malformed metrics)", repair=repair)
        return None
    return output


def record_file(rp: RecordPlan) -> str:
    """Where a record goes in the store: named by dataset, model, task and its units' keys
    (so the same units make the same file, whichever command ran them)."""
    stem = "__".join(R.slug(s) for s in (rp.dataset, rp.model, rp.task))
    parts: dict[str, Any] = {"embeddings": rp.embed_keys, "scores": rp.score_keys}
    if rp.not_applicable is not None:  # no units: its reason tells it apart
        parts["not_applicable"] = rp.not_applicable
    key = cache_key(parts)
    return f"results/{stem}__{key[:12]}.json"


def assemble_records(plan: Plan, store: Store, *, command: str = "") -> tuple[list[R.ResultRecord], list[str]]:
    """One result record per record of the plan, from its units' outputs in ``store``,
    each written to ``results/`` (:func:`record_file`).

    Returns
    -------
    The records in the plan's order, and one line per record that could not be written
    (the others are: one bad write loses no other record).
    """
    seen = _Seen(plan, store)
    records, unwritten = [], []
    for rp in plan.records:
        record = seen.unscored(rp, command) if rp.not_applicable is not None else _record(plan, rp, store, command)
        try:
            store.write_bytes(record_file(rp), (R.result_json(record) + "\n").encode())
        except (ResultsError, StoreError) as e:  # this record is lost, not the others
            unwritten.append(str(e))
        records.append(record)
    return records, unwritten


def _planned_task(plan: Plan, name: str) -> PlannedTask:
    return PlannedTask.build(plan.tasks[name])


def _record(plan: Plan, rp: RecordPlan, store: Store, command: str) -> R.ResultRecord:
    first = plan.scores[rp.score_keys[0]]
    planned = _planned_task(plan, rp.task)
    pieces = [read_score(store, k) for k in rp.score_keys]
    if first.predictor is not None:
        return _predictor_record(rp, first, planned, pieces, store, command)
    embeds = [plan.embeds[k] for k in rp.embed_keys]
    metas = [store.read_output(f"embeddings/{k}/{UNIT_FILE}", keys=EMBED_META_KEYS) for k in rp.embed_keys]
    datasets = [R.DatasetRecord.model_validate(m["dataset"]) if m else _unread_dataset(e.dataset, e.parts)
                for e, m in zip(embeds, metas)]
    models = [stored_model(m["model"], _unrun_model(e.model)) if m else _unrun_model(e.model)
              for e, m in zip(embeds, metas)]
    grouped = len(embeds) > 1
    dataset = group_record(datasets) if grouped else datasets[0]
    model = group_model([d.name for d in datasets], models) if grouped else models[0]
    if any(m is None for m in metas):
        reasons = []
        for e, key, meta in zip(embeds, rp.embed_keys, metas):
            if meta is None:
                failure = _read_failure(store, key) or {}
                reasons.append((f"{e.dataset.name}: " if grouped else "") + _failure_reason(failure))
                if not grouped:  # the model as its failed run described it, and its last log lines
                    model = stored_model(failure.get("model"), model)
                    if isinstance(failure.get("log_tail"), list):
                        model = model.model_copy(update={"info": {"log_tail": failure["log_tail"]}})
        result = TaskResult(rp.task, "failed", seeds=list(rp.seeds), error="embedding failed: " + "; ".join(reasons))
    else:
        result = _task_result(rp, pieces, store)
    # Models of the same identity share units; the record is this one's.
    model = model.model_copy(update={"name": rp.model})
    record = result_record(dataset=dataset, model=model, planned=planned, result=result, command=command,
                           embedding_runtime_s=sum(m["runtime_s"] for m in metas if m))
    if not grouped and metas[0] and metas[0].get("embedding_sample"):
        record.embedding_sample = metas[0]["embedding_sample"]
    return record


def _task_result(rp: RecordPlan, pieces: list[Any], store: Store) -> TaskResult:
    """The outcome over a record's seeds: its score units' outputs, or why some are missing
    (one reason when every missing seed failed alike)."""
    if any(p is None for p in pieces):
        reasons = {seed: _failure_reason(_read_failure(store, key))
                   for seed, key, piece in zip(rp.seeds, rp.score_keys, pieces) if piece is None}
        alike = len(set(reasons.values())) == 1 and len(reasons) == len(pieces)
        error = next(iter(reasons.values())) if alike else "; ".join(f"seed {s}: {r}" for s, r in reasons.items())
        return TaskResult(rp.task, "failed", seeds=list(rp.seeds), error=error)
    if any(p["status"] != "ok" for p in pieces):
        odd = next(p for p in pieces if p["status"] != "ok")
        return TaskResult(rp.task, odd["status"], seeds=list(rp.seeds), error=odd["error"])
    values = [MetricValue(m["name"], float("nan") if m["value"] is None else m["value"], m["params"],
                          tuple(m["ci95"]) if m["ci95"] is not None else None,
                          Bootstrap.from_json(m.get("bootstrap")))  # absent in older outputs
              for p in pieces for m in p["metrics"]]
    return TaskResult(rp.task, "ok", aggregate(values), list(rp.seeds),
                      runtime_s=sum(p["runtime_s"] for p in pieces),
                      peak_memory_mb=max(p["peak_memory_mb"] for p in pieces),
                      computation=pieces[0]["computation"])


def _predictor_record(rp: RecordPlan, unit: ScoreUnit, planned: PlannedTask, pieces: list[Any], store: Store,
                      command: str) -> R.ResultRecord:
    """The record of a perturbation predictor: dataset and model as its units saw them."""
    seen = next((p for p in pieces if p is not None and p.get("dataset")), None)
    ds, predictor = unit.datasets[0], unit.predictor
    dataset = R.DatasetRecord.model_validate(seen["dataset"]) if seen else _unread_dataset(ds, unit.parts)
    model = stored_model(seen["model"], _unrun_model(predictor)) if seen else _unrun_model(predictor)
    model = model.model_copy(update={"name": rp.model})
    return result_record(dataset=dataset, model=model, planned=planned, result=_task_result(rp, pieces, store),
                         command=command, embedding_runtime_s=0.0)


class _Seen:
    """Datasets and models as the plan's units recorded them (for records no unit made),
    read from the store once each."""

    def __init__(self, plan: Plan, store: Store):
        self.plan, self.store = plan, store
        self._datasets: dict[str, R.DatasetRecord] = {}
        self._models: dict[tuple[str, str], R.ModelRecord] = {}
        self._read = False

    def _read_outputs(self) -> None:
        if self._read:
            return
        self._read = True
        for key, unit in self.plan.embeds.items():
            meta = self.store.read_output(f"embeddings/{key}/{UNIT_FILE}", keys=EMBED_META_KEYS, repair=False)
            if meta is not None:
                self._keep(unit.dataset.name, unit.model.name, meta)
        for key, unit in self.plan.scores.items():
            if unit.predictor is not None and (output := read_score(self.store, key, repair=False)):
                if output.get("dataset") and output.get("model"):
                    self._keep(unit.dataset_name, unit.model, output)

    def _keep(self, dataset: str, model: str, output: dict[str, Any]) -> None:
        try:
            self._datasets.setdefault(dataset, R.DatasetRecord.model_validate(output["dataset"]))
        except ValueError:  # a damaged description is only not used
            return
        stored = stored_model(output["model"], None)
        if stored is not None:
            self._models.setdefault((dataset, model), stored)

    def dataset(self, name: str) -> R.DatasetRecord:
        self._read_outputs()
        if name in self._datasets:
            return self._datasets[name]
        spec = self.plan.datasets[name]
        return R.DatasetRecord(name=spec.name, uri=spec.uri, sha256=spec.sha256, n_cells=0, n_genes=0)

    def model(self, dataset: str, name: str) -> R.ModelRecord:
        self._read_outputs()
        seen = self._models.get((dataset, name))
        return seen.model_copy(update={"info": {}}) if seen else _unrun_model(self.plan.models[name])

    def unscored(self, rp: RecordPlan, command: str) -> R.ResultRecord:
        """The ``not_applicable`` record of a model of the other kind than its task's."""
        datasets = [self.dataset(name) for name in rp.members]
        dataset = group_record(datasets) if len(datasets) > 1 else datasets[0]
        result = TaskResult(rp.task, "not_applicable", seeds=list(rp.seeds), error=rp.not_applicable)
        return result_record(dataset=dataset, model=self.model(rp.members[0], rp.model),
                             planned=_planned_task(self.plan, rp.task), result=result, command=command,
                             embedding_runtime_s=0.0)


def _read_failure(store: Store, key: str) -> dict[str, Any] | None:
    """Unit ``key``'s recorded failure, or ``None`` (an unreadable record is deleted, with a warning)."""
    return store.read_output(f"failures/{key}.json", keys=("error",))


def _failure_reason(failure: dict[str, Any] | None) -> str:
    """Why a unit has no output: its recorded failure, or that the run stopped first."""
    return str(failure["error"]) if failure else "the run did not finish"


def _unread_dataset(spec: DatasetSpec, parts: dict[str, Any]) -> R.DatasetRecord:
    """The record of a dataset no unit loaded: what the plan knows (sizes unknown, 0)."""
    return R.DatasetRecord(name=spec.name, uri=spec.uri, sha256=parts["dataset"]["sha256"], n_cells=0, n_genes=0)


def _unrun_model(spec: Embedder) -> R.ModelRecord:
    """A model's record when none of its units ran: what its spec says."""
    if isinstance(spec, EmbeddingFile):
        return model_record({"name": spec.name, "kind": "file", "parameters": {"key": spec.key}})
    return model_record({"name": spec.name, "kind": spec.kind, "parameters": resolve_parameters(spec)})


