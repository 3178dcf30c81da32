"""Orchestration: datasets × embedding sources × tasks → result records.

Order of work, so bad input fails before anything heavy runs:

1. resolve every name and build every task (unknown names, bad parameters);
2. per dataset: load and validate it;
3. per embedding source (the models asked for, plus the PCA baseline): embed,
   then score every task on that embedding with one shared neighbour graph;
4. tasks over several datasets (``TaskInfo.kind == "multi_dataset"``, e.g.
   cross-species) run last, on each source's embeddings of all datasets stacked;
5. perturbation tasks (``kind == "perturbation"``) score predictors (models with
   ``output: predictions``) instead of embeddings, beside the control-mean and
   additive-linear baselines.

A model that does not produce what a task scores gets a ``not_applicable`` record.

A source that fails to embed, or a task that fails, becomes a ``failed`` record;
it is never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import czb
from czb.errors import CzbError, NotApplicableError, ResultsError
from czb.evaluation.context import DEFAULT_SEEDS, EvaluationContext, TaskResult, run_task
from czb.evaluation.registry import get_task
from czb.evaluation.resources import measure
from czb.evaluation.tasks.base import Task
from czb.runner import results as R
from czb.runner.datasets import Dataset
from czb.runner.predictors import perturbation_data
from czb.runner.specs import Catalog, DatasetSpec, TaskSpec

BASELINE_MODEL = "pca"
#: What perturbation predictors are compared with in tables (both baselines are scored).
BASELINE_PREDICTOR = "control_mean"

Progress = Callable[[str], None]


@dataclass
class PlannedTask:
    spec: TaskSpec
    task: Task


def build_tasks(specs: Sequence[TaskSpec]) -> list[PlannedTask]:
    """Instantiate each task spec's implementation with its parameters (validated now)."""
    return [PlannedTask(spec, get_task(spec.implementation)(**spec.parameters)) for spec in specs]


def baselines_for(task_kinds: Iterable[str]) -> list[str]:
    """The baselines every comparison on tasks of these kinds needs: PCA for embeddings
    (cell-level and multi-dataset tasks), the simple predictors for perturbation responses."""
    from czb.runner.predictors import BASELINE_PREDICTORS

    kinds = set(task_kinds)
    return ([BASELINE_MODEL] if kinds - {"perturbation"} else []) + (
        list(BASELINE_PREDICTORS) if "perturbation" in kinds else [])


def dataset_roles(ds: Dataset, cell_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell annotations of a dataset by role, restricted to ``cell_index`` when given.

    ``species`` is always there (the spec's organism unless an obs column holds it).
    ``labels`` and ``batch`` are strings, ``None`` for a cell without a value (NaN,
    ``None``, empty: :func:`~czb.evaluation.applicability.missing_mask`; for several
    batch keys, a cell missing any of them), never the text ``"nan"``: the evaluation
    leaves those cells out of the tasks that need the role and counts them.
    """
    roles: dict[str, np.ndarray] = {"labels": ds.labels, "species": ds.role("species")}
    if ds.batches is not None:
        roles["batch"] = ds.batches
    if ds.controls is not None:
        roles["control"] = ds.controls
    for role in ds.spec.extra_keys:
        roles[role] = ds.role(role)
    if cell_index is not None:
        roles = {k: v[cell_index] for k, v in roles.items()}
    return roles


def map_labels(labels: np.ndarray | None) -> np.ndarray | None:
    """Labels for a report map's legend: a cell without one shows as ``(no label)``."""
    from czb.evaluation.applicability import missing_mask

    if labels is None:
        return None
    labels = np.asarray(labels, dtype=object).copy()
    labels[missing_mask(labels)] = "(no label)"
    return labels


def dataset_expression(ds: Dataset, cell_index: np.ndarray | None = None) -> Any:
    """The dataset's expression for tasks that read it (rows restricted to ``cell_index``).

    A matrix on disk stays there (the tasks read it in row chunks); its rows are
    restricted lazily (:class:`~czb.evaluation.perturbation_analysis.RowSubset`), never copied.
    """
    from czb.evaluation.perturbation_analysis import Expression, RowSubset
    from czb.runner.datasets import BackedMatrix

    X = ds.adata.X
    if cell_index is not None:
        X = RowSubset(X, cell_index) if isinstance(X, BackedMatrix) else X[cell_index]
    return Expression(X, ds.gene_symbols(), kind=ds.spec.expression)


def dataset_record(ds: Dataset) -> R.DatasetRecord:
    return R.DatasetRecord(name=ds.name, uri=ds.spec.uri, sha256=ds.sha256, n_cells=ds.n_cells, n_genes=ds.n_genes)


def result_record(
    *,
    dataset: R.DatasetRecord,
    model: dict[str, Any],
    planned: PlannedTask,
    result: TaskResult,
    command: str,
    embedding_runtime_s: float,
) -> R.ResultRecord:
    """The result record of one task on one model's output for one dataset."""
    return R.ResultRecord(
        czb_version=czb.__version__,
        created_at=R.now_utc(),
        command=command,
        host=R.host_record(),
        dataset=dataset,
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
                ci95=list(m.ci95) if m.ci95 is not None else None,
            )
            for m in result.metrics
        ],
        runtime_s=result.runtime_s,
        embedding_runtime_s=embedding_runtime_s,
        peak_memory_mb=result.peak_memory_mb,
        computation=result.computation,
    )


@dataclass
class Embedded:
    """The outcome of embedding one dataset with one source: an embedding, or why not."""

    model: dict[str, Any]
    embedding: Any = None
    status: str = "ok"
    error: str | None = None
    runtime_s: float = 0.0

    @property
    def cell_index(self) -> np.ndarray | None:
        """The dataset cells the embedding's rows belong to (``None``: all, or no embedding)."""
        return self.embedding.cell_index if self.embedding is not None else None


def embed_dataset(source: Any, ds: Dataset, *, seed: int, raise_errors: bool = False) -> Embedded:
    """Embed ``ds`` with ``source``; a failure or a not-applicable model is returned, not raised
    (unless ``raise_errors``, for debugging)."""
    info: dict[str, Any] = {}
    with measure() as usage:
        try:
            embedding = source.embed(ds, seed=seed)
        except NotApplicableError as e:
            embedding, status, error = None, "not_applicable", str(e)
        except Exception as e:  # noqa: BLE001 - a crashing model is a failed run, recorded
            if raise_errors:
                raise
            embedding, status = None, "failed"
            error = str(e) if isinstance(e, CzbError) else f"{type(e).__name__}: {e}"
            if getattr(e, "log_tail", None):
                info["log_tail"] = e.log_tail[-50:]
        else:
            status, error = "ok", None
    model = source.describe()
    info.update(embedding.info if embedding is not None else {})
    return Embedded({**model, "info": info}, embedding, status, error, usage.runtime_s)


def _unscored(embedded: Embedded, dataset: R.DatasetRecord, planned: Sequence[PlannedTask], *,
              seeds: Sequence[int], command: str) -> list[R.ResultRecord]:
    """One failed / not-applicable record per task, for an embedding that does not exist."""
    prefix = "embedding failed: " if embedded.status == "failed" else ""
    result = TaskResult(task="", status=embedded.status, seeds=list(seeds), error=f"{prefix}{embedded.error}")
    return [
        result_record(dataset=dataset, model=embedded.model, planned=p, result=result, command=command,
                      embedding_runtime_s=embedded.runtime_s)
        for p in planned
    ]


def embedding_context(
    values: np.ndarray,
    roles: dict[str, np.ndarray | None],
    *,
    expression: Any = None,
    relationship_sources: Sequence[str] | None = None,
    n_jobs: int = 1,
    exact: bool | None = None,
) -> EvaluationContext:
    """The evaluation context of an embedding whose rows ``roles`` annotate (``labels``,
    ``batch`` or ``None``, and any extra role)."""
    roles = dict(roles)
    return EvaluationContext(
        values,
        labels=roles.pop("labels"),
        batches=roles.pop("batch", None),
        roles={k: v for k, v in roles.items() if v is not None},
        expression=expression,
        relationship_sources=relationship_sources,
        n_jobs=n_jobs,
        exact=exact,
    )


def score_embedding(
    embedded: Embedded,
    dataset: R.DatasetRecord,
    roles: dict[str, np.ndarray | None],
    planned: Sequence[PlannedTask],
    *,
    seeds: Sequence[int],
    n_jobs: int,
    command: str,
    progress: Progress | None = None,
    raise_errors: bool = False,
    expression: Any = None,
    relationship_sources: Sequence[str] | None = None,
    exact: bool | None = None,
) -> list[R.ResultRecord]:
    """Score every task on one embedding, sharing one neighbour graph.

    ``roles`` holds per-cell annotations aligned with the embedding's rows: ``labels``,
    ``batch`` (or ``None``) and any extra role; ``expression`` the cells' expression
    for tasks that read it (rows aligned likewise).
    """
    if embedded.embedding is None:
        return _unscored(embedded, dataset, planned, seeds=seeds, command=command)
    say = progress or (lambda _msg: None)
    context = embedding_context(embedded.embedding.values, roles, expression=expression,
                                relationship_sources=relationship_sources, n_jobs=n_jobs, exact=exact)
    return _score_tasks(context, planned, dataset=dataset, model=lambda: embedded.model, seeds=seeds,
                        command=command, embedding_runtime_s=embedded.runtime_s, say=say,
                        raise_errors=raise_errors)


def score_predictor(
    source: Any,
    ds: Dataset,
    data: Any,
    planned: Sequence[PlannedTask],
    *,
    seeds: Sequence[int],
    n_jobs: int,
    command: str,
    progress: Progress | None = None,
    raise_errors: bool = False,
) -> list[R.ResultRecord]:
    """Score a perturbation predictor on every perturbation task of one dataset."""
    from czb.evaluation.tasks.genetic_perturbation_prediction import PerturbationContext

    say = progress or (lambda _msg: None)
    if hasattr(source, "bind"):  # a docker predictor: organism and input checks first
        try:
            source.bind(ds)
        except NotApplicableError as e:
            skipped = Embedded({**source.describe(), "info": {}}, None, "not_applicable", str(e))
            return _unscored(skipped, dataset_record(ds), planned, seeds=seeds, command=command)
    context = PerturbationContext(data, source, n_jobs=n_jobs)
    # Described after each task: a docker predictor knows its image once it has run.
    return _score_tasks(context, planned, dataset=dataset_record(ds),
                        model=lambda: {**source.describe(), "info": {}}, seeds=seeds, command=command,
                        embedding_runtime_s=0.0, say=say, raise_errors=raise_errors)


def _score_tasks(
    context: Any,
    planned: Sequence[PlannedTask],
    *,
    dataset: R.DatasetRecord,
    model: Callable[[], dict[str, Any]],
    seeds: Sequence[int],
    command: str,
    embedding_runtime_s: float,
    say: Progress,
    raise_errors: bool,
) -> list[R.ResultRecord]:
    """Run every planned task on one context, one record each (``model()`` read after the task)."""
    context.plan(p.task for p in planned)
    records = []
    for p in planned:
        described = model()
        say(f"{dataset.name}: {described['name']}: {p.spec.name}")
        result = run_task(p.task, context, seeds, raise_errors=raise_errors)
        records.append(result_record(dataset=dataset, model=model(), planned=p, result=result,
                                     command=command, embedding_runtime_s=embedding_runtime_s))
    return records


@dataclass
class GroupMember:
    """What a task over several datasets keeps of one member: its record, its embedding
    and its roles (the AnnData itself is released)."""

    record: R.DatasetRecord
    embedded: Embedded
    roles: dict[str, np.ndarray]


def group_member(ds: Dataset, embedded: Embedded) -> GroupMember:
    return GroupMember(dataset_record(ds), embedded, dataset_roles(ds, embedded.cell_index))


def group_record(members: Sequence[R.DatasetRecord]) -> R.DatasetRecord:
    """The record of several datasets scored together: names joined with ``+``, totals, members."""
    return R.DatasetRecord(
        name="+".join(m.name for m in members),
        uri=" ".join(m.uri for m in members),
        sha256=None,
        n_cells=sum(m.n_cells for m in members),
        n_genes=sum(m.n_genes for m in members),
        members=list(members),
    )


def group_model(names: Sequence[str], models: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A model's description for a group: the first member's, with each member's info."""
    return {**models[0], "info": {"members": {n: m.get("info", {}) for n, m in zip(names, models)}}}


def stack_members(members: Sequence[GroupMember]) -> tuple[R.DatasetRecord, Embedded, dict[str, np.ndarray]]:
    """The group of several datasets (cross-species) as one: its record, the members'
    embeddings stacked in member order, and their roles aligned with the rows.

    Roles: ``labels``, ``species``, ``dataset`` (member name), ``batch``
    (``member|batch``, when every member has batches) and each extra role every member
    has (``donor``, ``sample``, ``time_point``...; donor and sample IDs prefixed with the
    member name so IDs of different datasets never merge). When a member has no
    embedding, or the embeddings differ in dimension, the stacked :class:`Embedded` has
    none and says why (``failed`` or ``not_applicable``), and the roles are empty.
    """
    from czb.runner.embeddings import Embedding

    group = group_record([m.record for m in members])
    first = members[0].embedded
    model = group_model([m.record.name for m in members], [m.embedded.model for m in members])
    runtime = sum(m.embedded.runtime_s for m in members)
    problems = [m for m in members if m.embedded.embedding is None]
    if problems:
        status = "failed" if any(m.embedded.status == "failed" for m in problems) else "not_applicable"
        error = "; ".join(f"{m.record.name}: {m.embedded.error}" for m in problems)
        return group, Embedded(model, None, status, error, runtime), {}
    dims = {m.record.name: m.embedded.embedding.dim for m in members}
    if len(set(dims.values())) > 1:
        error = "embeddings differ in dimension across datasets: " + ", ".join(f"{k} {v}" for k, v in dims.items())
        return group, Embedded(model, None, "failed", error, runtime), {}

    values = np.concatenate([m.embedded.embedding.values for m in members])
    names = [np.full(len(m.roles["labels"]), m.record.name, dtype=object) for m in members]
    roles: dict[str, np.ndarray] = {
        "labels": np.concatenate([m.roles["labels"] for m in members]).astype(object),
        "species": np.concatenate([m.roles["species"] for m in members]).astype(object),
        "dataset": np.concatenate(names),
    }
    if all(m.roles.get("batch") is not None for m in members):
        roles["batch"] = np.concatenate([_prefixed(n, "|", m.roles["batch"]) for n, m in zip(names, members)])
    shared = set.intersection(*(set(m.roles) for m in members)) - set(roles) - {"batch"}
    for role in sorted(shared):
        parts = [m.roles[role] for m in members]
        if role in ("donor", "sample"):
            parts = [_prefixed(n, ":", p) for n, p in zip(names, parts)]
        roles[role] = np.concatenate(parts)
    stacked = Embedded(model, Embedding(values=values, model=first.model["name"], kind="stacked"),
                       runtime_s=runtime)
    return group, stacked, roles


def _prefixed(names: np.ndarray, separator: str, values: np.ndarray) -> np.ndarray:
    """``name + separator + value`` per cell; a cell without a value keeps none (``None``)."""
    from czb.evaluation.applicability import missing_mask

    out = names + separator + np.asarray(values).astype(str).astype(object)
    out[missing_mask(values)] = None
    return out


def score_group(
    members: Sequence[GroupMember],
    planned: Sequence[PlannedTask],
    *,
    seeds: Sequence[int],
    n_jobs: int,
    command: str,
    progress: Progress | None = None,
    raise_errors: bool = False,
    exact: bool | None = None,
) -> list[R.ResultRecord]:
    """Score tasks over several datasets (cross-species) on their stacked embeddings
    (:func:`stack_members`)."""
    group, stacked, roles = stack_members(members)
    if stacked.embedding is None:
        return _unscored(stacked, group, planned, seeds=seeds, command=command)
    return score_embedding(stacked, group, roles, planned, seeds=seeds, n_jobs=n_jobs, command=command,
                           progress=progress, raise_errors=raise_errors, exact=exact)


def check_output_dir(folder: Path, *, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it writable (a probe file is written and
    removed), so that a run with nowhere to put its results fails at once, not after its
    work.

    Raises
    ------
    ResultsError
        One line naming the folder: it is a file, cannot be created, or is not writable.
    """
    import os
    import tempfile

    from czb.errors import ResultsError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        msg = f"{what} {folder} exists and is not a folder"
        raise ResultsError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create {what} {folder}: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".czb-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        msg = f"{what} {folder} is not writable: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from None
    return folder


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
    exact: bool | None = None,
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
        Where result JSONs are written (none written when ``None``); created and checked
        writable before any work (:func:`check_output_dir`).
    raise_errors
        Let a failing model or task raise instead of becoming a ``failed`` record.
    model_options
        :class:`czb.runner.containers.RunOptions` for docker models (GPUs, weights,
        limits, cache).
    exact
        Exact neighbour graphs and silhouettes at any size (``True``); ``None``: exact
        up to the documented sizes, approximate/estimated above (recorded in each
        result's ``computation``).

    Returns
    -------
    Every record, in order: per dataset, per source, per task. When ``embedding`` cannot
    be used on the dataset (unreadable, wrong shape, constant...), its failed records
    only: it is read right after the dataset loads, and nothing else runs.
    """
    from czb.runner.datasets import load_dataset, validate_dataset
    from czb.runner.embeddings import source_for_file, source_for_model
    from czb.runner.predictors import predictor_for_model
    from czb.settings import get_settings

    settings = get_settings()
    n_jobs = n_jobs or settings.n_jobs
    if not seeds:
        msg = "at least one seed is needed"
        raise CzbError(msg)
    dataset_specs: list[DatasetSpec] = catalog.resolve("dataset", datasets)
    model_specs = catalog.resolve("model", models) if models else []
    task_specs = catalog.resolve("task", tasks)
    if output_dir is not None:  # before any work: results with nowhere to go would be lost
        check_output_dir(output_dir)
    planned = build_tasks(task_specs)
    if embedding is not None and len(dataset_specs) != 1:
        msg = f"--embedding scores one dataset; {len(dataset_specs)} were given"
        raise CzbError(msg)
    if embedding is None and not model_specs:
        msg = "nothing to score: give --model or --embedding"
        raise CzbError(msg)
    cell_level = [p for p in planned if p.task.info.kind == "cell"]
    multi = [p for p in planned if p.task.info.kind == "multi_dataset"]
    perturbation = [p for p in planned if p.task.info.kind == "perturbation"]
    if multi and len(dataset_specs) < 2:
        names = ", ".join(p.spec.name for p in multi)
        msg = f"{names} compare(s) several datasets (e.g. one per species): give two or more --dataset"
        raise CzbError(msg)
    if baseline:
        present = {m.name for m in model_specs}
        wanted = baselines_for(p.task.info.kind for p in planned)
        model_specs += [catalog.model(name) for name in wanted if name not in present]
    sources = [
        predictor_for_model(m, model_options) if m.output == "predictions" else source_for_model(m, model_options)
        for m in model_specs
    ]
    if embedding is not None:
        sources.insert(0, source_for_file(embedding, key=embedding_key))

    say = progress or (lambda _m: None)
    records: list[R.ResultRecord] = []
    unwritten: list[str] = []

    def keep(new: list[R.ResultRecord]) -> None:
        if output_dir is not None:
            for record in new:
                try:
                    R.write_result(record, output_dir)
                except ResultsError as e:  # one record that cannot be written loses no other
                    unwritten.append(str(e))
        records.extend(new)

    def done() -> list[R.ResultRecord]:
        if unwritten:
            msg = f"{len(unwritten)} result(s) could not be written (the others were): {unwritten[0]}"
            raise ResultsError(msg)
        return records

    members: list[list[GroupMember]] = [[] for _ in sources]
    for spec in dataset_specs:
        say(f"{spec.name}: loading")
        ds = load_dataset(spec, offline=offline, progress=progress is not None)
        validate_dataset(ds)
        data = None  # the dataset as perturbation tasks read it, built on first use
        for i, source in enumerate(sources):
            model = source.describe()
            if getattr(source, "produces", "embedding") == "predictions":
                if perturbation:
                    data = data if data is not None else perturbation_data(ds)
                    keep(score_predictor(source, ds, data, perturbation, seeds=seeds, n_jobs=n_jobs,
                                         command=command, progress=progress, raise_errors=raise_errors))
                why = f"{model['name']} predicts perturbation responses; this task scores embeddings"
                keep(_unscored(Embedded({**model, "info": {}}, None, "not_applicable", why),
                               dataset_record(ds), cell_level, seeds=seeds, command=command))
                if multi:
                    members[i].append(group_member(ds, Embedded({**model, "info": {}}, None, "not_applicable", why)))
                continue
            say(f"{ds.name}: embedding with {model['name']}")
            embedded = embed_dataset(source, ds, seed=seeds[0], raise_errors=raise_errors)
            if embedding is not None and i == 0 and embedded.status == "failed":
                # The user's own file (first source) does not fit: stop before the baselines run.
                keep(_unscored(embedded, dataset_record(ds), [*cell_level, *perturbation], seeds=seeds,
                               command=command))
                return done()
            if cell_level:
                reads_expression = any("expression" in p.task.info.requires for p in cell_level)
                expression = dataset_expression(ds, embedded.cell_index) if reads_expression else None
                roles = dataset_roles(ds, embedded.cell_index)
                scored = score_embedding(embedded, dataset_record(ds), roles,
                                         cell_level, seeds=seeds, n_jobs=n_jobs, command=command,
                                         progress=progress, raise_errors=raise_errors, expression=expression,
                                         relationship_sources=ds.spec.relationship_sources, exact=exact)
                if output_dir is not None and embedded.embedding is not None:
                    sample = R.write_embedding_sample(
                        embedded.embedding.values, output_dir, dataset=ds.name, model=model["name"],
                        labels=map_labels(roles.get("labels")), batches=map_labels(roles.get("batch")))
                    for record in scored:
                        record.embedding_sample = sample
                keep(scored)
            if multi:
                members[i].append(group_member(ds, embedded))
            why = f"{model['name']} produces embeddings; this task scores perturbation predictions"
            keep(_unscored(Embedded({**embedded.model}, None, "not_applicable", why), dataset_record(ds),
                           perturbation, seeds=seeds, command=command))
        del ds, data
    if multi:
        for group in members:
            keep(score_group(group, multi, seeds=seeds, n_jobs=n_jobs, command=command,
                             progress=progress, raise_errors=raise_errors, exact=exact))
    return done()


def reference_baseline(record: R.ResultRecord) -> str:
    """The baseline a record is compared with: ``pca`` for embeddings, ``control_mean``
    for perturbation predictions."""
    try:
        kind = get_task(record.task.implementation).info.kind
    except CzbError:
        kind = "cell"
    return BASELINE_PREDICTOR if kind == "perturbation" else BASELINE_MODEL


def baseline_differences(records: Sequence[R.ResultRecord], baseline: str | None = None) -> dict:
    """``{(dataset, task, metric, params-key, model): model value - baseline value}`` for ok records.

    The baseline is ``baseline`` when given, else each record's :func:`reference_baseline`.
    """
    def key(r: R.ResultRecord, m: R.MetricRecord) -> tuple:
        return (r.dataset.name, r.task.name, m.name, tuple(sorted((k, str(v)) for k, v in m.params.items())))

    def reference(r: R.ResultRecord) -> str:
        return baseline or reference_baseline(r)

    base = {
        key(r, m): m.value
        for r in records
        if r.model.name == reference(r) and r.status == "ok"
        for m in r.metrics
    }
    out = {}
    for r in records:
        if r.model.name == reference(r) or r.status != "ok":
            continue
        for m in r.metrics:
            b = base.get(key(r, m))
            if b is not None and m.value is not None:
                out[(*key(r, m), r.model.name)] = m.value - b
    return out
