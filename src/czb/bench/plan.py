"""A benchmark suite as units of work, each keyed by its content.

Two kinds of unit:

- an **embed unit** turns one dataset into one model's embedding. Its key hashes what
  the embedding depends on: the model (docker image ID, weights checksums, parameters;
  for in-process baselines their implementation, parameters and czb's version), the
  dataset's content (its sha256 and the fields a model reads) and the seed;
- a **score unit** scores one task on one embedding for one seed (deterministic tasks:
  once); a task over several datasets (cross-species) scores the stacked embeddings of
  every dataset of its suite. Its key adds the task's implementation and validated
  parameters, the datasets' annotations (label and batch columns...), the seed and
  czb's version. A perturbation task scores a predictor (a model with ``output:
  predictions``), which runs inside the unit: its key holds the predictor's identity and
  the dataset's checksum instead of an embedding's key.

A unit whose output is in the store is done and never runs again, so an interrupted
suite resumes where it stopped, a task added to a suite reuses its embeddings, and two
suites sharing cells share their work. Result records are assembled from the units
(one per model, dataset and task, all seeds) when the suite finishes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import czb
from czb.core.errors import CzbError, CzbWarning
from czb.core.hashing import cache_key
from czb.specs.catalog import Catalog
from czb.specs.parameters import resolve_parameters
from czb.specs.schema import DatasetSpec, ModelSpec, SuiteSpec, TaskSpec

#: Dataset fields a model's output depends on (besides the file's content).
EMBED_DATASET_FIELDS = ("organism", "layer", "gene_key", "gene_id_type", "expression", "batch_key")
#: Dataset fields that only descriptions are made of; every other field can change a score.
DESCRIPTIVE_DATASET_FIELDS = ("name", "description", "citation", "tags", "source", "uri", "sha256")


class BenchWarning(CzbWarning):
    """Something about a suite's plan is weaker than it should be (e.g. an image keyed by tag)."""


@dataclass(frozen=True)
class EmbedUnit:
    """Embed ``dataset`` with ``model`` (seeded with ``seed``)."""

    key: str
    model: ModelSpec
    dataset: DatasetSpec
    seed: int
    parts: dict[str, Any] = field(compare=False, repr=False)

    kind = "embed"

    @property
    def label(self) -> str:
        return f"{self.dataset.name}/{self.model.name}: embedding"

    @property
    def gpus(self) -> int:
        return 1 if self.model.resources.gpu else 0

    @property
    def memory_gb(self) -> float | None:
        return self.model.resources.memory_gb


@dataclass(frozen=True)
class ScoreUnit:
    """Score ``task`` with one seed on the embeddings of units ``embed_keys``: one
    dataset's, or for a task over several datasets (cross-species) each member's, stacked;
    for a perturbation task, on the predictions of ``predictor`` (no embedding)."""

    key: str
    embed_keys: tuple[str, ...]
    model: str
    datasets: tuple[DatasetSpec, ...]
    task: TaskSpec
    seed: int
    exact: bool | None
    parts: dict[str, Any] = field(compare=False, repr=False)
    #: For a perturbation task: the predictor it runs and scores (it reads no embedding).
    predictor: ModelSpec | None = field(default=None, repr=False)

    kind = "score"

    @property
    def dataset_name(self) -> str:
        return "+".join(d.name for d in self.datasets)

    @property
    def label(self) -> str:
        return f"{self.dataset_name}/{self.model}: {self.task.name} (seed {self.seed})"


@dataclass(frozen=True)
class RecordPlan:
    """One result record: a model × dataset (or group of datasets) × task, from the
    score units of its seeds."""

    model: str
    dataset: str
    task: str
    seeds: tuple[int, ...]
    embed_keys: tuple[str, ...]
    score_keys: tuple[str, ...]


@dataclass
class Plan:
    """Every unit of a suite (deduplicated by key) and the records they make."""

    suite: str
    embeds: dict[str, EmbedUnit]
    scores: dict[str, ScoreUnit]
    records: list[RecordPlan]

    @property
    def n_units(self) -> int:
        return len(self.embeds) + len(self.scores)


def dataset_checksum(spec: DatasetSpec, *, offline: bool | None = None) -> str:
    """The sha256 a dataset's units are keyed by: declared in the spec, of its generator's
    arguments (``synthetic:``), or of its file (fetched into the cache if needed; hashed once)."""
    from czb.data import sources
    from czb.io import fetch
    from czb.io.cache import known_sha256
    if spec.sha256 is not None:
        return spec.sha256
    if spec.uri.startswith("synthetic:"):
        return sources.synthetic_digest(spec)
    if spec.uri.startswith("builtin:"):
        return known_sha256(sources.builtin_path(spec))
    return known_sha256(fetch.fetch(spec.uri, offline=offline))


def model_identity(spec: ModelSpec, *, resolve_images: bool = True) -> dict[str, Any]:
    """What a model's embeddings depend on.

    A docker model is identified by its image's ID where the engine can be reached here
    (a rebuilt image then makes new units), else by its tag, with a :class:`BenchWarning`.
    Parameters count by their resolved values (every declared one, defaults filled in).
    """
    parameters = resolve_parameters(spec)
    if spec.kind == "baseline":
        # In-process code: its version is czb's.
        return {"kind": "baseline", "implementation": spec.implementation, "parameters": parameters,
                "output": spec.output, "czb_version": czb.__version__}
    variant, weights = spec.variant()
    identity: dict[str, Any] = {
        "kind": "docker", "image": spec.image, "variant": variant, "parameters": parameters,
        "gene_id_type": spec.gene_id_type, "input": spec.input, "output": spec.output,
        "weights": [w.model_dump(mode="json") for w in weights.weights],
    }
    image_id = _image_id(spec) if resolve_images else None
    if image_id is None:
        warnings.warn(
            f"model {spec.name!r}: its image {spec.image!r} could not be inspected here, so its units are "
            "keyed by the tag; a rebuilt image under the same tag will not be re-run",
            BenchWarning, stacklevel=2)
    identity["image_id"] = image_id
    return identity


def _image_id(spec: ModelSpec) -> str | None:
    from czb.models.docker import engine as docker_engine
    try:
        return docker_engine.image_info(docker_engine.client(), spec.image, model=spec.name).id
    except CzbError:
        return None


def plan_suite(
    catalog: Catalog,
    name: str,
    *,
    offline: bool | None = None,
    resolve_images: bool = True,
) -> Plan:
    """Resolve suite ``name`` (and what it includes) into keyed units.

    Every name, task parameter and dataset is checked here, before anything runs:
    unknown names and bad parameters raise, and each dataset's checksum is resolved
    (:func:`dataset_checksum`).
    """
    resolved = [(matrix, *resolve_matrix(catalog, matrix)) for matrix in catalog.suite_matrices(name)]
    specs = {ds.name: ds for _, datasets, *_ in resolved for ds in datasets}
    checksums = {ds_name: dataset_checksum(ds, offline=offline) for ds_name, ds in specs.items()}
    identities: dict[str, dict[str, Any]] = {}
    plan = Plan(name, {}, {}, [])
    records: dict[tuple[str, str, str], RecordPlan] = {}

    def add(units: list[ScoreUnit]) -> None:
        plan.scores.update({u.key: u for u in units})
        first = units[0]
        record = RecordPlan(first.model, first.dataset_name, first.task.name, tuple(u.seed for u in units),
                            first.embed_keys, tuple(u.key for u in units))
        if records.setdefault((record.model, record.dataset, record.task), record) != record:
            msg = (f"suite {name!r} scores {record.model} on {record.dataset} with {record.task} twice, "
                   "differently (seeds or definitions differ between included suites)")
            raise CzbError(msg)

    for matrix, datasets, models, tasks, built in resolved:
        kinds = {t.name: built[t.name].info.kind for t in tasks}
        for model in models:
            if model.name not in identities:
                identities[model.name] = model_identity(model, resolve_images=resolve_images)
            if model.output == "predictions":  # scored on perturbation tasks only
                for ds in datasets:
                    dataset = {"sha256": checksums[ds.name], **ds.model_dump(
                        mode="json", exclude=set(DESCRIPTIVE_DATASET_FIELDS))}
                    for task in tasks:
                        if kinds[task.name] == "perturbation":
                            add(_score_units(task, built[task.name], matrix, model, (ds,),
                                             {"predictor": identities[model.name], "dataset": dataset},
                                             predictor=model))
                continue
            if not any(kind != "perturbation" for kind in kinds.values()):
                continue
            members = []
            for ds in datasets:
                embed_dataset = {"sha256": checksums[ds.name],
                                 **ds.model_dump(mode="json", include=set(EMBED_DATASET_FIELDS))}
                parts = {"model": identities[model.name], "dataset": embed_dataset, "seed": matrix.seeds[0]}
                embed = plan.embeds.setdefault(cache_key(parts),
                                               EmbedUnit(cache_key(parts), model, ds, matrix.seeds[0], parts))
                members.append(embed)
                for task in tasks:
                    if kinds[task.name] == "cell":
                        add(_embedding_units((embed,), task, built[task.name], matrix))
            for task in tasks:
                if kinds[task.name] == "multi_dataset":
                    add(_embedding_units(tuple(members), task, built[task.name], matrix))
    plan.records = list(records.values())
    return plan


def _score_units(
    task: TaskSpec, built: Any, matrix: SuiteSpec, model: ModelSpec, datasets: tuple[DatasetSpec, ...],
    reads: dict[str, Any], *, embed_keys: tuple[str, ...] = (), predictor: ModelSpec | None = None,
) -> list[ScoreUnit]:
    """A task's units, one per seed (one for a deterministic task). ``reads`` says what
    they score, hashed into their keys: embedding keys and datasets, or a predictor and
    its dataset."""
    seeds = matrix.seeds if built.info.stochastic else matrix.seeds[:1]
    exact = None if predictor is not None else matrix.exact
    units = []
    for seed in seeds:
        parts = {**reads, "task": task.implementation, "parameters": built.params.model_dump(mode="json"),
                 "seed": seed, "czb_version": czb.__version__}
        if predictor is None:
            parts["exact"] = exact
        units.append(ScoreUnit(cache_key(parts), embed_keys, model.name, datasets, task, seed, exact, parts,
                               predictor=predictor))
    return units


def _embedding_units(embeds: tuple[EmbedUnit, ...], task: TaskSpec, built: Any, matrix: SuiteSpec) -> list[ScoreUnit]:
    """A task's units on one embedding, or on a group's stacked embeddings."""
    reads = {"embeddings": [e.key for e in embeds],
             "datasets": [e.dataset.model_dump(mode="json", exclude=set(DESCRIPTIVE_DATASET_FIELDS)) for e in embeds]}
    return _score_units(task, built, matrix, embeds[0].model, tuple(e.dataset for e in embeds), reads,
                        embed_keys=tuple(e.key for e in embeds))


def resolve_matrix(
    catalog: Catalog, matrix: SuiteSpec
) -> tuple[list[DatasetSpec], list[ModelSpec], list[TaskSpec], dict[str, Any]]:
    """A suite's datasets, models (baselines added) and tasks (task suites expanded), and
    each task built with its parameters; unknown names and bad parameters raise here."""
    from czb.evaluation.registry import get_task

    datasets = catalog.resolve("dataset", matrix.datasets)
    tasks = catalog.resolve("task", matrix.tasks)
    built = {t.name: get_task(t.implementation)(**t.parameters) for t in tasks}
    models = catalog.resolve("model", _with_baselines(matrix, (b.info.kind for b in built.values())))
    multi = [t.name for t in tasks if built[t.name].info.kind == "multi_dataset"]
    if multi and len(datasets) < 2:
        msg = f"suite {matrix.name!r}: {', '.join(multi)} compare several datasets; give two or more"
        raise CzbError(msg)
    return datasets, models, tasks, built


def _with_baselines(matrix: SuiteSpec, kinds: Iterable[str]) -> list[str]:
    """The matrix's models plus the baselines its tasks are compared with, as ``czb run`` adds them."""
    from czb.pipeline.baselines import baselines_for
    wanted = baselines_for(kinds) if matrix.baseline else []
    return list(matrix.models) + [m for m in wanted if m not in matrix.models]
