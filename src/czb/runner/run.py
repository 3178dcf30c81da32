"""Orchestration: datasets × embedding sources × tasks → result records.

Order of work, so bad input fails before anything heavy runs:

1. resolve every name and build every task (unknown names, bad parameters);
2. per dataset: load and validate it;
3. per embedding source (the models asked for, plus the PCA baseline): embed,
   then score every task on that embedding with one shared neighbour graph.

A source that fails to embed, or a task that fails, becomes a ``failed`` record;
it is never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import czb
from czb.errors import CzbError, NotApplicableError
from czb.evaluation.context import DEFAULT_SEEDS, EvaluationContext, TaskResult, run_task
from czb.evaluation.registry import get_task
from czb.evaluation.resources import measure
from czb.evaluation.tasks.base import Task
from czb.runner import results as R
from czb.runner.datasets import Dataset
from czb.runner.specs import Catalog, DatasetSpec, TaskSpec

BASELINE_MODEL = "pca"

Progress = Callable[[str], None]


@dataclass
class PlannedTask:
    spec: TaskSpec
    task: Task


def build_tasks(specs: Sequence[TaskSpec]) -> list[PlannedTask]:
    """Instantiate each task spec's implementation with its parameters (validated now)."""
    return [PlannedTask(spec, get_task(spec.implementation)(**spec.parameters)) for spec in specs]


def dataset_roles(ds: Dataset, cell_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell annotations of a dataset by role, restricted to ``cell_index`` when given."""
    roles: dict[str, np.ndarray] = {"labels": ds.labels}
    if ds.batches is not None:
        roles["batch"] = ds.batches
    for role in ds.spec.extra_keys:
        roles[role] = ds.role(role)
    if cell_index is not None:
        roles = {k: v[cell_index] for k, v in roles.items()}
    return roles


def _record(
    *,
    ds: Dataset,
    model: dict[str, Any],
    planned: PlannedTask,
    result: TaskResult,
    command: str,
    embedding_runtime_s: float,
) -> R.ResultRecord:
    return R.ResultRecord(
        czb_version=czb.__version__,
        created_at=R.now_utc(),
        command=command,
        host=R.host_record(),
        dataset=R.DatasetRecord(
            name=ds.name, uri=ds.spec.uri, sha256=ds.sha256, n_cells=ds.n_cells, n_genes=ds.n_genes
        ),
        model=R.ModelRecord(
            name=model["name"],
            kind=model["kind"],
            image_digest=model.get("image_digest") or ("in-process" if model["kind"] != "docker" else "unresolved"),
            parameters=model.get("parameters", {}),
            info=model.get("info", {}),
        ),
        task=R.TaskRecord(
            name=planned.spec.name,
            implementation=planned.spec.implementation,
            parameters=planned.task.params.model_dump(mode="json"),
        ),
        seeds=result.seeds,
        status=result.status,
        error=result.error,
        metrics=[
            R.MetricRecord(
                name=m.name,
                value=m.value,
                value_std_dev=m.value_std_dev,
                values_raw=m.values_raw,
                params=m.params,
            )
            for m in result.metrics
        ],
        runtime_s=result.runtime_s,
        embedding_runtime_s=embedding_runtime_s,
        peak_memory_mb=result.peak_memory_mb,
    )


def score_source(
    source: Any,
    ds: Dataset,
    planned: Sequence[PlannedTask],
    *,
    seeds: Sequence[int],
    n_jobs: int,
    command: str,
    progress: Progress | None = None,
    raise_errors: bool = False,
) -> list[R.ResultRecord]:
    """Embed ``ds`` with ``source`` and score every task; failures become records
    (or propagate, with ``raise_errors``, for debugging)."""
    say = progress or (lambda _msg: None)
    model = source.describe()
    say(f"{ds.name}: embedding with {model['name']}")
    status = "failed"
    with measure() as usage:
        try:
            embedding = source.embed(ds, seed=seeds[0])
            error = None
        except NotApplicableError as e:
            embedding, status, error = None, "not_applicable", str(e)
        except Exception as e:  # noqa: BLE001 - a crashing model is a failed run, recorded
            if raise_errors:
                raise
            embedding = None
            error = str(e) if isinstance(e, CzbError) else f"{type(e).__name__}: {e}"
            log_tail = getattr(e, "log_tail", None)
            if log_tail:
                model = {**model, "info": {**model.get("info", {}), "log_tail": log_tail[-50:]}}
    if embedding is None:
        model = {**source.describe(), "info": model.get("info", {})}
        prefix = "embedding failed: " if status == "failed" else ""
        failed = TaskResult(task="", status=status, seeds=list(seeds), error=f"{prefix}{error}")
        return [
            _record(ds=ds, model=model, planned=p, result=failed, command=command,
                    embedding_runtime_s=usage.runtime_s)
            for p in planned
        ]
    model = {**source.describe(), "info": {**model.get("info", {}), **embedding.info}}
    roles = dataset_roles(ds, embedding.cell_index)
    context = EvaluationContext(
        embedding.values,
        labels=roles.pop("labels"),
        batches=roles.pop("batch", None),
        roles=roles,
        n_jobs=n_jobs,
    )
    context.plan(p.task for p in planned)
    records = []
    for p in planned:
        say(f"{ds.name}: {model['name']}: {p.spec.name}")
        result = run_task(p.task, context, seeds, raise_errors=raise_errors)
        records.append(
            _record(ds=ds, model=model, planned=p, result=result, command=command,
                    embedding_runtime_s=usage.runtime_s)
        )
    return records


def run_benchmark(
    catalog: Catalog,
    *,
    datasets: Sequence[str],
    tasks: Sequence[str],
    models: Sequence[str] = (),
    embedding: Path | None = None,
    embedding_key: str | None = None,
    baseline: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    output_dir: Path | None = None,
    offline: bool | None = None,
    n_jobs: int | None = None,
    command: str = "",
    progress: Progress | None = None,
    raise_errors: bool = False,
    model_options: Any = None,
) -> list[R.ResultRecord]:
    """Score models (or a user's embedding file) on datasets and tasks.

    Parameters
    ----------
    catalog
        Where names are looked up.
    datasets, tasks, models
        Names in the catalog (``["all"]`` expands to every entry).
    embedding, embedding_key
        A file of precomputed embeddings (one dataset only) and its key.
    baseline
        Also score the ``pca`` baseline on the same data (skipped if already asked for).
    seeds
        Seeds of stochastic steps.
    output_dir
        Where result JSONs are written (none written when ``None``).
    raise_errors
        Let a failing model or task raise instead of becoming a ``failed`` record.
    model_options
        :class:`czb.runner.containers.RunOptions` for docker models (GPUs, weights,
        limits, cache).

    Returns
    -------
    Every record, in order: per dataset, per source, per task.
    """
    from czb.runner.datasets import load_dataset, validate_dataset
    from czb.runner.embeddings import source_for_file, source_for_model
    from czb.settings import get_settings

    settings = get_settings()
    n_jobs = n_jobs or settings.n_jobs
    if not seeds:
        msg = "at least one seed is needed"
        raise CzbError(msg)
    dataset_specs: list[DatasetSpec] = catalog.resolve("dataset", datasets)
    model_specs = catalog.resolve("model", models) if models else []
    planned = build_tasks(catalog.resolve("task", tasks))
    if embedding is not None and len(dataset_specs) != 1:
        msg = f"--embedding scores one dataset; {len(dataset_specs)} were given"
        raise CzbError(msg)
    if embedding is None and not model_specs:
        msg = "nothing to score: give --model or --embedding"
        raise CzbError(msg)
    if baseline and BASELINE_MODEL not in {m.name for m in model_specs}:
        model_specs.append(catalog.model(BASELINE_MODEL))
    sources = [source_for_model(m, model_options) for m in model_specs]
    if embedding is not None:
        sources.insert(0, source_for_file(embedding, key=embedding_key))

    records: list[R.ResultRecord] = []
    for spec in dataset_specs:
        (progress or (lambda _m: None))(f"{spec.name}: loading")
        ds = load_dataset(spec, offline=offline, progress=progress is not None)
        validate_dataset(ds)
        for source in sources:
            new = score_source(source, ds, planned, seeds=seeds, n_jobs=n_jobs, command=command,
                               progress=progress, raise_errors=raise_errors)
            if output_dir is not None:
                for record in new:
                    R.write_result(record, output_dir)
            records += new
    return records


def baseline_differences(records: Sequence[R.ResultRecord], baseline: str = BASELINE_MODEL) -> dict:
    """``{(dataset, task, metric, params-key, model): model value - baseline value}`` for ok records."""
    def key(r: R.ResultRecord, m: R.MetricRecord) -> tuple:
        return (r.dataset.name, r.task.name, m.name, tuple(sorted((k, str(v)) for k, v in m.params.items())))

    base = {
        key(r, m): m.value
        for r in records
        if r.model.name == baseline and r.status == "ok"
        for m in r.metrics
    }
    out = {}
    for r in records:
        if r.model.name == baseline or r.status != "ok":
            continue
        for m in r.metrics:
            b = base.get(key(r, m))
            if b is not None and m.value is not None:
                out[(*key(r, m), r.model.name)] = m.value - b
    return out
