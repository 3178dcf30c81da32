"""A comparison as units of work, each keyed by its content: the plan that ``czb run``
and ``czb bench`` both execute (:mod:`czb.pipeline.execute`).

What is compared is one or more :class:`Matrix`: models × datasets × tasks × seeds (a
suite's, or ``czb run``'s arguments). Two kinds of unit:

- an **embed unit** turns one dataset into one model's embedding. Its key hashes what
  the embedding depends on: the model (docker image ID, weights checksums, variant and
  resolved parameters; for in-process baselines their implementation, parameters and
  czb's version; for a user's file its sha256), the dataset's content (its sha256 and
  the fields a model reads) and the seed;
- a **score unit** scores one task on one embedding for one seed (deterministic tasks:
  once); a task over several datasets (cross-species) scores the stacked embeddings of
  every dataset of its matrix. Its key adds the task's implementation and validated
  parameters, the datasets' annotations (label and batch columns...), the seed and
  czb's version. A perturbation task scores a predictor (a model with ``output:
  predictions``), which runs inside the unit: its key holds the predictor's identity and
  the dataset's checksum instead of an embedding's key.

A unit whose output is in the store is done and never runs again, so an interrupted
suite resumes where it stopped, a task added to a suite reuses its embeddings, and two
comparisons sharing cells share their work. Every model × dataset × task of a matrix
makes one result record (all seeds): from its units, or ``not_applicable`` with the
reason when the model does not produce what the task scores (a predictor on an
embedding task, an embedding on a perturbation task).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import czb
from czb.core.errors import CzbError, CzbWarning, DatasetError, UsageError
from czb.core.hashing import cache_key
from czb.evaluation.registry import get_task
from czb.evaluation.task import Task
from czb.pipeline.baselines import BASELINE_MODEL, baselines_for
from czb.specs.catalog import Catalog
from czb.specs.parameters import resolve_parameters
from czb.specs.schema import DatasetSpec, ModelSpec, SuiteSpec, TaskSpec

if TYPE_CHECKING:
    from czb.models.docker.request import RunOptions

#: Dataset fields a model's output depends on (besides the file's content).
EMBED_DATASET_FIELDS = ("organism", "layer", "gene_key", "gene_id_type", "expression", "batch_key")
#: Dataset fields that only descriptions are made of; every other field can change a score.
DESCRIPTIVE_DATASET_FIELDS = ("name", "description", "citation", "tags", "source", "uri", "sha256")


class PlanWarning(CzbWarning):
    """Something about a plan is weaker than it should be (e.g. an image keyed by tag)."""


@dataclass(frozen=True)
class Matrix:
    """Models × datasets × tasks × seeds to compare: one suite's matrix, or ``czb run``'s.

    ``baseline`` adds the baselines every comparison needs (:func:`baselines_for`);
    ``exact`` is the neighbour-graph choice (``None``: by size). ``file`` is a user's
    embedding file, planned as the first model.
    """

    name: str
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    baseline: bool = True
    exact: bool | None = None
    file: EmbeddingFile | None = None

    @classmethod
    def of_suite(cls, spec: SuiteSpec) -> Matrix:
        return cls(spec.name, tuple(spec.datasets), tuple(spec.models), tuple(spec.tasks), tuple(spec.seeds),
                   spec.baseline, spec.exact)


@dataclass(frozen=True)
class EmbeddingFile:
    """A user's file of embeddings (``czb run --embedding``), compared as a model named
    ``file:<file name>``; its units are keyed by the file's sha256 and ``key``."""

    path: Path
    key: str | None
    sha256: str

    @property
    def name(self) -> str:
        return f"file:{self.path.name}"

    @classmethod
    def open(cls, path: str | Path, key: str | None = None) -> EmbeddingFile:
        """Check the file's extension and existence (:func:`~czb.models.sources.source_for_file`)
        and hash it."""
        from czb.models.sources import source_for_file

        source = source_for_file(path, key=key)
        return cls(Path(path).resolve(), key, source.sha256)


#: What an embed unit runs: a model spec, or a user's file.
Embedder = ModelSpec | EmbeddingFile


@dataclass(frozen=True)
class EmbedUnit:
    """Embed ``dataset`` with ``model`` (seeded with ``seed``)."""

    key: str
    model: Embedder
    dataset: DatasetSpec
    seed: int
    parts: dict[str, Any] = field(compare=False, repr=False)

    kind = "embed"

    @property
    def label(self) -> str:
        return f"{self.dataset.name}/{self.model.name}: embedding"

    @property
    def gpus(self) -> int:
        return 1 if isinstance(self.model, ModelSpec) and self.model.resources.gpu else 0

    @property
    def memory_gb(self) -> float | None:
        return self.model.resources.memory_gb if isinstance(self.model, ModelSpec) else None


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
    #: The embed unit of the dataset's PCA baseline, for a task comparing the embedding
    #: with the data before integration (:attr:`~czb.evaluation.task.Task.reads_pre_integration`).
    pre_integration: str | None = field(default=None, repr=False)

    kind = "score"

    @property
    def needs(self) -> tuple[str, ...]:
        """The embed units that must be done before this unit runs: its embeddings, then
        its pre-integration PCA (which it can do without when that fails)."""
        extra = self.pre_integration
        return self.embed_keys + ((extra,) if extra is not None and extra not in self.embed_keys else ())

    @property
    def dataset_name(self) -> str:
        return "+".join(d.name for d in self.datasets)

    @property
    def label(self) -> str:
        return f"{self.dataset_name}/{self.model}: {self.task.name} (seed {self.seed})"


@dataclass(frozen=True)
class RecordPlan:
    """One result record: a model × dataset (or group of datasets) × task, from the
    score units of its seeds; or, with ``not_applicable`` set, no unit and that reason."""

    model: str
    dataset: str
    task: str
    seeds: tuple[int, ...]
    embed_keys: tuple[str, ...]
    score_keys: tuple[str, ...]
    #: The member datasets' names (one, or a group's).
    members: tuple[str, ...] = ()
    not_applicable: str | None = None


@dataclass
class Plan:
    """Every unit of a comparison (deduplicated by key) and the records they make, with
    the specs they name (by name)."""

    suite: str
    embeds: dict[str, EmbedUnit]
    scores: dict[str, ScoreUnit]
    records: list[RecordPlan]
    models: dict[str, Embedder] = field(default_factory=dict)
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)
    #: Datasets whose checksums are not known yet (planned without the network): the
    #: keys of their units are placeholders.
    unresolved: set[str] = field(default_factory=set)

    @property
    def n_units(self) -> int:
        return len(self.embeds) + len(self.scores)

    @property
    def unit_keys(self) -> set[str]:
        """The keys of every unit, embed and score."""
        return set(self.embeds) | set(self.scores)

    def only(self, model: str) -> Plan:
        """The part of this plan that scores ``model``: its records and their units."""
        records = [r for r in self.records if r.model == model]
        scores = {k for r in records for k in r.score_keys}
        embeds = {k for key in scores for k in self.scores[key].needs}
        return Plan(self.suite, {k: u for k, u in self.embeds.items() if k in embeds},
                    {k: u for k, u in self.scores.items() if k in scores}, records,
                    self.models, self.datasets, self.tasks)


def dataset_checksum(spec: DatasetSpec, *, offline: bool | None = None, fetch_remote: bool = False,
                     progress: bool = False, network: bool = True) -> str | None:
    """The sha256 a dataset's units are keyed by: that of its generator's arguments
    (``synthetic:``), else of its file as it is now, checked against the spec's declared
    sha256 (a file edited in place is refused here, before any unit reuses work keyed by
    the declared content). A remote file is fetched into the cache when it has no
    declared sha256, or with ``fetch_remote``; otherwise its declared sha256 stands until
    a unit downloads it (and checks it). Files are hashed once (the cache remembers).
    Without ``network``, a remote file that would have to be downloaded is not, and its
    checksum is ``None`` (to be resolved).

    Raises
    ------
    DatasetError
        The file's content is not the declared one (:class:`~czb.core.errors.FetchError`
        for a local or fetched file, naming both checksums), or it cannot be fetched.
    """
    from czb.data import sources
    from czb.io import fetch
    from czb.io.cache import known_sha256
    if spec.uri.startswith("synthetic:"):
        return spec.sha256 or sources.synthetic_digest(spec)
    if spec.uri.startswith("builtin:"):
        digest = known_sha256(sources.builtin_path(spec))
        if spec.sha256 is not None and digest != spec.sha256:
            msg = f"dataset {spec.name!r}: its builtin file has sha256 {digest}, but the spec expects {spec.sha256}"
            raise DatasetError(msg)
        return digest
    if spec.sha256 is not None and fetch.is_remote(spec.uri) and not fetch_remote:
        return spec.sha256
    if not network and fetch.is_remote(spec.uri):
        return _cached_sha256(spec)
    return known_sha256(fetch.fetch(spec.uri, sha256=spec.sha256, offline=offline, progress=progress))


def _cached_sha256(spec: DatasetSpec) -> str | None:
    """The sha256 of a remote dataset's cached copy, or ``None`` when it is not cached."""
    from czb.core.errors import FetchError
    from czb.io import fetch
    from czb.io.cache import known_sha256

    try:
        return known_sha256(fetch.fetch(spec.uri, offline=True))
    except FetchError:
        return None


def model_identity(spec: Embedder, *, resolve_images: bool = True, options: RunOptions | None = None
                   ) -> dict[str, Any]:
    """What a model's embeddings (or predictions) depend on.

    A docker model is identified by its image's ID where the engine can be reached here
    (a rebuilt image then makes new units), else by its tag, with a :class:`PlanWarning`.
    Parameters count by their resolved values (every declared one, defaults filled in,
    then ``options``' overrides); a weights variant and local weights
    (``options.weights_dir``, by the checksum of its files) count too. A user's file
    is its sha256 and key.
    """
    if isinstance(spec, EmbeddingFile):
        return {"kind": "file", "sha256": spec.sha256, "key": spec.key}
    if spec.kind == "baseline":
        # In-process code: its version is czb's.
        return {"kind": "baseline", "implementation": spec.implementation, "parameters": resolve_parameters(spec),
                "output": spec.output, "czb_version": czb.__version__}
    overrides: dict[str, Any] = dict(options.parameters) if options is not None else {}
    if options is not None and options.batch_size:
        overrides["batch_size"] = options.batch_size
    variant, weights = spec.variant(options.variant if options is not None else None)
    identity: dict[str, Any] = {
        "kind": "docker", "image": spec.image, "variant": variant, "parameters": resolve_parameters(spec, overrides),
        "gene_id_type": spec.gene_id_type, "input": spec.input, "output": spec.output,
        "weights": [w.model_dump(mode="json") for w in weights.weights],
    }
    if options is not None and options.weights_dir is not None:
        identity["local_weights"] = _local_weights_checksum(spec, options.weights_dir)
    image_id = _image_id(spec) if resolve_images else None
    if image_id is None:
        warnings.warn(
            f"model {spec.name!r}: its image {spec.image!r} could not be inspected here, so its units are "
            "keyed by the tag; a rebuilt image under the same tag will not be re-run",
            PlanWarning, stacklevel=2)
    identity["image_id"] = image_id
    return identity


def _local_weights_checksum(spec: ModelSpec, folder: Path) -> str | None:
    from czb.models.weights import resolve_weights

    return resolve_weights(spec, weights_dir=folder).checksum


def _image_id(spec: ModelSpec) -> str | None:
    from czb.models.docker import engine as docker_engine
    try:
        return docker_engine.image_info(docker_engine.client(), spec.image, model=spec.name).id
    except CzbError:
        return None


def plan_suite(catalog: Catalog, name: str, *, offline: bool | None = None, resolve_images: bool = True,
               network: bool = True, checksums: Mapping[str, str] | None = None) -> Plan:
    """Resolve suite ``name`` (and what it includes) into keyed units (:func:`plan_matrices`)."""
    matrices = [Matrix.of_suite(spec) for spec in catalog.suite_matrices(name)]
    return plan_matrices(catalog, matrices, name=name, offline=offline, resolve_images=resolve_images,
                         network=network, checksums=checksums)


def plan_matrices(
    catalog: Catalog,
    matrices: Sequence[Matrix],
    *,
    name: str,
    offline: bool | None = None,
    resolve_images: bool = True,
    options: RunOptions | None = None,
    fetch_remote: bool = False,
    progress: bool = False,
    network: bool = True,
    checksums: Mapping[str, str] | None = None,
) -> Plan:
    """Every unit and record of ``matrices``, deduplicated by key.

    Every name, task parameter and dataset is checked here, before anything runs:
    unknown names and bad parameters raise, and each dataset's checksum is resolved
    (:func:`dataset_checksum`). ``options`` are the run's model choices (variant, local
    weights, parameters) that count in docker models' identities; ``fetch_remote`` and
    ``progress`` are :func:`dataset_checksum`'s; without ``network`` nothing is
    downloaded, and the datasets whose checksums that leaves unknown are in
    :attr:`Plan.unresolved` (their units' keys are not final: a dry run). ``checksums``
    are datasets' sha256 already computed elsewhere (by a worker:
    :func:`czb.pipeline.execute.plan_on_workers`). Records come per
    matrix, per dataset, per model, per task; tasks over several datasets last.
    """
    resolved = [(matrix, *resolve_matrix(catalog, matrix)) for matrix in matrices]
    plan = Plan(name, {}, {}, [])
    for _, datasets, models, tasks, _ in resolved:
        plan.datasets.update((d.name, d) for d in datasets)
        plan.models.update((m.name, m) for m in models)
        plan.tasks.update((t.name, t) for t in tasks)
    for model in plan.models.values():
        _check_model(model, options)
    known = dict(checksums or {})
    checksums = {ds_name: known[ds_name] if ds_name in known else dataset_checksum(
                     ds, offline=offline, fetch_remote=fetch_remote, progress=progress, network=network)
                 for ds_name, ds in plan.datasets.items()}
    plan.unresolved = {ds_name for ds_name, checksum in checksums.items() if checksum is None}
    identities = {m.name: model_identity(m, resolve_images=resolve_images, options=options)
                  for m in plan.models.values()}
    records: dict[tuple[str, str, str], RecordPlan] = {}

    def add(record: RecordPlan, units: Sequence[ScoreUnit] = ()) -> None:
        plan.scores.update({u.key: u for u in units})
        if records.setdefault((record.model, record.dataset, record.task), record) != record:
            msg = (f"{name!r} scores {record.model} on {record.dataset} with {record.task} twice, "
                   "differently (seeds or definitions differ between included suites)")
            raise CzbError(msg)

    def add_units(units: list[ScoreUnit]) -> None:
        first = units[0]
        add(RecordPlan(first.model, first.dataset_name, first.task.name, tuple(u.seed for u in units),
                       first.embed_keys, tuple(u.key for u in units), tuple(d.name for d in first.datasets)), units)

    def add_unscored(model: Embedder, members: Sequence[DatasetSpec], task: TaskSpec, seeds: tuple[int, ...],
                     reason: str) -> None:
        add(RecordPlan(model.name, "+".join(d.name for d in members), task.name, seeds, (), (),
                       tuple(d.name for d in members), reason))

    def embed_unit(model: Embedder, ds: DatasetSpec, seed: int) -> EmbedUnit:
        if model.name not in identities:
            identities[model.name] = model_identity(model, resolve_images=resolve_images, options=options)
        parts = {"model": identities[model.name], "seed": seed, "dataset": {
            "sha256": checksums[ds.name], **ds.model_dump(mode="json", include=set(EMBED_DATASET_FIELDS))}}
        key = cache_key(parts)
        return plan.embeds.setdefault(key, EmbedUnit(key, model, ds, seed, parts))

    def pre_integration(ds: DatasetSpec, matrix: Matrix) -> str:
        """The key of the dataset's PCA baseline unit (planned here when the matrix has
        no baselines): the representation before integration."""
        pca = plan.models.get(BASELINE_MODEL) or catalog.resolve("model", [BASELINE_MODEL])[0]
        return embed_unit(pca, ds, matrix.seeds[0]).key

    for matrix, datasets, models, tasks, built in resolved:
        kinds = {t.name: built[t.name].info.kind for t in tasks}
        members: dict[str, list[EmbedUnit]] = {m.name: [] for m in models}
        for ds in datasets:
            for model in models:
                identity = identities[model.name]
                predicts = isinstance(model, ModelSpec) and model.output == "predictions"
                embed = None
                if not predicts and any(kinds[t.name] != "perturbation" for t in tasks):
                    embed = embed_unit(model, ds, matrix.seeds[0])
                    members[model.name].append(embed)
                for task in tasks:
                    kind = kinds[task.name]
                    if kind == "multi_dataset":
                        continue
                    if predicts and kind == "perturbation":
                        dataset = {"sha256": checksums[ds.name], **ds.model_dump(
                            mode="json", exclude=set(DESCRIPTIVE_DATASET_FIELDS))}
                        add_units(_score_units(task, built[task.name], matrix, model.name, (ds,),
                                               {"predictor": identity, "dataset": dataset}, predictor=model))
                    elif predicts or kind == "perturbation":
                        add_unscored(model, (ds,), task, _seeds(built[task.name], matrix), _mismatch(model))
                    else:
                        pre = pre_integration(ds, matrix) if built[task.name].reads_pre_integration else None
                        add_units(_embedding_units(model.name, (embed,), task, built[task.name], matrix, pre=pre))
        for model in models:
            for task in tasks:
                if kinds[task.name] != "multi_dataset":
                    continue
                if isinstance(model, ModelSpec) and model.output == "predictions":
                    add_unscored(model, datasets, task, _seeds(built[task.name], matrix), _mismatch(model))
                else:
                    add_units(_embedding_units(model.name, tuple(members[model.name]), task, built[task.name],
                                               matrix))
    plan.records = list(records.values())
    return plan


def _check_model(model: Embedder, options: RunOptions | None) -> None:
    """Build the model's source once, so that a bad parameter or run option fails now,
    before any dataset is fetched (a source does no work until it runs)."""
    from czb.models.predictors import predictor_for_model
    from czb.models.sources import source_for_model

    if isinstance(model, ModelSpec):
        build = predictor_for_model if model.output == "predictions" else source_for_model
        build(model, options)


def _mismatch(model: Embedder) -> str:
    """Why a model is not scored on a task of the other kind (embedding vs prediction)."""
    if isinstance(model, ModelSpec) and model.output == "predictions":
        return f"{model.name} predicts perturbation responses; this task scores embeddings"
    return f"{model.name} produces embeddings; this task scores perturbation predictions"


def _seeds(built: Task, matrix: Matrix) -> tuple[int, ...]:
    """The seeds a task runs with: all of the matrix's, or the first for a deterministic task."""
    return matrix.seeds if built.info.stochastic else matrix.seeds[:1]


def _score_units(
    task: TaskSpec, built: Task, matrix: Matrix, model: str, datasets: tuple[DatasetSpec, ...],
    reads: dict[str, Any], *, embed_keys: tuple[str, ...] = (), predictor: ModelSpec | None = None,
    pre: str | None = None,
) -> list[ScoreUnit]:
    """A task's units, one per seed (one for a deterministic task). ``reads`` says what
    they score, hashed into their keys: embedding keys and datasets, or a predictor and
    its dataset."""
    exact = None if predictor is not None else matrix.exact
    units = []
    for seed in _seeds(built, matrix):
        parts = {**reads, "task": task.implementation, "parameters": built.params.model_dump(mode="json"),
                 "seed": seed, "czb_version": czb.__version__}
        if predictor is None:
            parts["exact"] = exact
        units.append(ScoreUnit(cache_key(parts), embed_keys, model, datasets, task, seed, exact, parts,
                               predictor=predictor, pre_integration=pre))
    return units


def _embedding_units(model: str, embeds: tuple[EmbedUnit, ...], task: TaskSpec, built: Task, matrix: Matrix,
                     *, pre: str | None = None) -> list[ScoreUnit]:
    """A task's units on ``model``'s embedding, or on a group's stacked embeddings (shared
    with any model of the same identity); ``pre``: the pre-integration PCA unit they read."""
    reads = {"embeddings": [e.key for e in embeds],
             "datasets": [e.dataset.model_dump(mode="json", exclude=set(DESCRIPTIVE_DATASET_FIELDS)) for e in embeds]}
    if pre is not None:
        reads["pre_integration"] = pre
    return _score_units(task, built, matrix, model, tuple(e.dataset for e in embeds), reads,
                        embed_keys=tuple(e.key for e in embeds), pre=pre)


def resolve_matrix(
    catalog: Catalog, matrix: Matrix, *, warn: bool = True
) -> tuple[list[DatasetSpec], list[Embedder], list[TaskSpec], dict[str, Task]]:
    """A matrix's datasets, models (its file first, baselines added) and tasks (task
    suites expanded), and each task built with its parameters; unknown names and bad
    parameters raise here, as does a task over several datasets given one. Tasks ``all``
    keeps those the models and datasets can be scored on, saying what it skipped (unless
    not ``warn``: a check before planning)."""
    datasets = catalog.resolve("dataset", list(matrix.datasets))
    tasks = catalog.resolve("task", list(matrix.tasks))
    built = {t.name: get_task(t.implementation)(**t.parameters) for t in tasks}
    asked: list[Embedder] = [matrix.file] if matrix.file is not None else []
    asked += catalog.resolve("model", list(matrix.models)) if matrix.models else []
    if "all" in matrix.tasks:
        tasks = _applicable(tasks, built, asked, n_datasets=len(datasets), where=matrix.name, warn=warn)
    multi = [t.name for t in tasks if built[t.name].info.kind == "multi_dataset"]
    if multi and len(datasets) < 2:
        msg = (f"{', '.join(multi)} compare(s) several datasets (e.g. one per species): give two or more "
               f"datasets (in {matrix.name!r})")
        raise UsageError(msg)
    # The baselines every comparison on these tasks needs, unless asked for already.
    known = {m.name for m in asked}
    wanted = [n for n in baselines_for(built[t.name].info.kind for t in tasks) if n not in known]
    models = asked + (catalog.resolve("model", wanted) if matrix.baseline and wanted else [])
    return datasets, models, tasks, {t.name: built[t.name] for t in tasks}


def _applicable(tasks: list[TaskSpec], built: dict[str, Task], models: Sequence[Embedder], *, n_datasets: int,
                where: str, warn: bool) -> list[TaskSpec]:
    """The tasks of ``all`` that the models and datasets can be scored on: perturbation
    prediction only with a predictor among the models, embedding tasks only with an
    embedding model, tasks over several datasets only with two or more. What is left out
    is said in one :class:`PlanWarning` line."""
    predicts = [isinstance(m, ModelSpec) and m.output == "predictions" for m in models]
    why = {"perturbation": "no model predicts perturbation responses" if not any(predicts) else None,
           "cell": "no model produces embeddings" if all(predicts) and predicts else None,
           "multi_dataset": "they compare two or more datasets" if n_datasets < 2 else None}
    if all(predicts) and predicts:
        why["multi_dataset"] = why["cell"]
    kept, skipped = [], {}
    for task in tasks:
        reason = why.get(built[task.name].info.kind)
        if reason is None:
            kept.append(task)
        else:
            skipped.setdefault(reason, []).append(task.name)
    if skipped and warn:
        said = "; ".join(f"{', '.join(names)} ({reason})" for reason, names in skipped.items())
        warnings.warn(f"tasks 'all' in {where!r}: skipped {said}", PlanWarning, stacklevel=3)
    if not kept:
        msg = f"tasks 'all' in {where!r}: none applies to these models and datasets"
        raise UsageError(msg)
    return kept
