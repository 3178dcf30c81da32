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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from czb.core import records as R
from czb.core.errors import CzbError, ResultsError
from czb.evaluation.runner import DEFAULT_SEEDS
from czb.models.predictors import perturbation_data
from czb.pipeline.baselines import baselines_for
from czb.pipeline.dataset_views import dataset_expression, dataset_record, dataset_roles, map_labels
from czb.pipeline.groups import GroupMember, group_member, score_group
from czb.pipeline.scoring import (
    Embedded,
    Progress,
    embed_dataset,
    score_embedding,
    score_predictor,
    unscored_records,
)
from czb.pipeline.tasks import build_tasks
from czb.specs.catalog import Catalog
from czb.specs.schema import DatasetSpec


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

    from czb.core.errors import ResultsError

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
        :class:`czb.models.docker.request.RunOptions` for docker models (GPUs, weights,
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
    from czb.core.settings import get_settings
    from czb.data.reading import load_dataset
    from czb.data.validation import validate_dataset
    from czb.models.predictors import predictor_for_model
    from czb.models.sources import source_for_file, source_for_model

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
                keep(unscored_records(Embedded({**model, "info": {}}, None, "not_applicable", why),
                               dataset_record(ds), cell_level, seeds=seeds, command=command))
                if multi:
                    members[i].append(group_member(ds, Embedded({**model, "info": {}}, None, "not_applicable", why)))
                continue
            say(f"{ds.name}: embedding with {model['name']}")
            embedded = embed_dataset(source, ds, seed=seeds[0], raise_errors=raise_errors)
            if embedding is not None and i == 0 and embedded.status == "failed":
                # The user's own file (first source) does not fit: stop before the baselines run.
                keep(unscored_records(embedded, dataset_record(ds), [*cell_level, *perturbation], seeds=seeds,
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
            keep(unscored_records(Embedded({**embedded.model}, None, "not_applicable", why), dataset_record(ds),
                           perturbation, seeds=seeds, command=command))
        del ds, data
    if multi:
        for group in members:
            keep(score_group(group, multi, seeds=seeds, n_jobs=n_jobs, command=command,
                             progress=progress, raise_errors=raise_errors, exact=exact))
    return done()


