"""The pydantic models of dataset, model, task and suite specs, and the organisms czb knows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from czb.core.errors import SpecError, UnknownNameError
from czb.specs.names import NAME_RULE, check_name, is_valid_name, shown
from czb.specs.parameters import ModelParameter, declarations

#: Build folders of the bundled model images (entrypoint, requirements; ``common/`` holds
#: their Dockerfile template and the contract module).
BUNDLED_CONTAINERS_DIR = Path(__file__).resolve().parent.parent / "containers"
#: Cells per forward pass of a docker model whose spec declares no ``batch_size``.
DEFAULT_BATCH_SIZE = 32


@dataclass(frozen=True)
class Organism:
    """An organism czb knows, with the prefix of its Ensembl gene IDs."""

    name: str
    scientific_name: str
    ensembl_prefix: str


# Prefixes as published by Ensembl (and used by cz-benchmarks' Organism enum).
ORGANISMS: dict[str, Organism] = {
    o.name: o
    for o in [
        Organism("human", "homo_sapiens", "ENSG"),
        Organism("mouse", "mus_musculus", "ENSMUSG"),
        Organism("rat", "rattus_norvegicus", "ENSRNOG"),
        Organism("zebrafish", "danio_rerio", "ENSDARG"),
        Organism("tropical_clawed_frog", "xenopus_tropicalis", "ENSXETG"),
        Organism("african_clawed_frog", "xenopus_laevis", "ENSXLAG"),
        Organism("mouse_lemur", "microcebus_murinus", "ENSMICG"),
        Organism("wild_boar", "sus_scrofa", "ENSSSCG"),
        Organism("crab_eating_macaque", "macaca_fascicularis", "ENSMFAG"),
        Organism("rhesus_macaque", "macaca_mulatta", "ENSMMUG"),
        Organism("platypus", "ornithorhynchus_anatinus", "ENSOANG"),
        Organism("opossum", "monodelphis_domestica", "ENSMODG"),
        Organism("gorilla", "gorilla_gorilla", "ENSGGOG"),
        Organism("chimpanzee", "pan_troglodytes", "ENSPTRG"),
        Organism("marmoset", "callithrix_jacchus", "ENSCJAG"),
        Organism("chicken", "gallus_gallus", "ENSGALG"),
        Organism("rabbit", "oryctolagus_cuniculus", "ENSOCUG"),
        Organism("naked_mole_rat", "heterocephalus_glaber", "ENSHGLG"),
        Organism("fruit_fly", "drosophila_melanogaster", "FBgn"),
        Organism("c_elegans", "caenorhabditis_elegans", "WBGene"),
        Organism("sea_lamprey", "petromyzon_marinus", "ENSPMAG"),
    ]
}

GeneIdType = Literal["ensembl", "symbol"]
ExpressionKind = Literal["raw_counts", "log_normalized"]


def _check_sha256(value: str | None) -> str | None:
    if value is not None and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower())):
        msg = "sha256 must be 64 hexadecimal characters"
        raise ValueError(msg)
    return value.lower() if value else value


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str = ""
    citation: str = ""
    #: The YAML file this entry came from (set by the loader; not part of the YAML).
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value)


class DatasetSpec(Spec):
    """Where a dataset lives and how to read it.

    ``uri`` schemes: a local path, ``file://``, ``https://``, ``http://``, ``s3://``
    (anonymous access), ``builtin:NAME`` (a file that ships with an installed
    package) and ``synthetic:GENERATOR`` (a seeded generator; ``params`` are its
    keyword arguments).
    """

    uri: str
    organism: str
    label_key: str
    #: One obs column, or several whose values are joined into one batch label
    #: (cz-benchmarks joins dataset_id, assay, suspension_type and donor_id).
    batch_key: str | list[str] | None = None
    #: Extra roles → obs columns, e.g. ``{time_point: age, donor: donor_id}``.
    extra_keys: dict[str, str] = Field(default_factory=dict)
    #: Declared order of string labels for ordered roles, e.g. ``{time_point: [young, old]}``.
    label_order: dict[str, list[str]] = Field(default_factory=dict)
    #: Perturbation screens: the label value (of ``condition`` when mapped, else of
    #: ``label_key``) that marks control cells, e.g. ``non-targeting``.
    control_label: str | None = None
    #: Perturbation screens: an obs column flagging control cells (bool, 0/1 or
    #: true/false strings); takes precedence over ``control_label``.
    control_key: str | None = None
    #: Known-relationship sources for perturbation recall (EFAAR database names,
    #: ``known_complexes`` or CSV paths); ``None``: the task's default.
    relationship_sources: list[str] | None = None
    expression: ExpressionKind = "raw_counts"
    #: Where the expression matrix lives: ``X`` (default), ``raw`` or a layer name.
    layer: str = "X"
    gene_id_type: GeneIdType = "ensembl"
    #: var column holding the gene IDs; ``None`` means ``var_names``.
    gene_key: str | None = None
    sha256: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)

    @field_validator("organism")
    @classmethod
    def _known_organism(cls, value: str) -> str:
        if value not in ORGANISMS:
            msg = f"unknown organism {value!r}; known: {', '.join(sorted(ORGANISMS))}"
            raise ValueError(msg)
        return value

    _hex = field_validator("sha256")(classmethod(lambda cls, v: _check_sha256(v)))

    @property
    def batch_keys(self) -> list[str]:
        """The batch columns as a list (empty when the dataset has no batches)."""
        if self.batch_key is None:
            return []
        return [self.batch_key] if isinstance(self.batch_key, str) else list(self.batch_key)


#: Upper bounds of the resources a spec may ask for: far beyond any machine, but numbers
#: the container engine (and a socket timeout) can take.
MAX_RESOURCE_GB = 1e6
MAX_TIMEOUT_S = 10**8


class Resources(BaseModel):
    """What a model needs to run: positive, finite amounts (``None``: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: bool = False
    memory_gb: float | None = Field(default=None, gt=0, le=MAX_RESOURCE_GB, allow_inf_nan=False)
    shm_gb: float | None = Field(default=None, gt=0, le=MAX_RESOURCE_GB, allow_inf_nan=False)
    timeout_s: int | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)


class WeightFile(BaseModel):
    """One published file of a model's weights, staged by ``czb models fetch-weights``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Published location: ``https://``, ``http://``, ``s3://`` (anonymous) or a local path.
    uri: str
    #: Where the file goes, relative to the weights folder mounted at ``/weights``.
    path: str
    sha256: str | None = None
    #: Unpack a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive into ``path`` (a folder).
    extract: bool = False

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        # Each part is a plain name ("." parts are dropped by Path): no "..", no absolute path.
        parts = Path(value).parts
        if not parts or Path(value).is_absolute() or not all(is_valid_name(p) for p in parts):
            msg = (f"path must be relative and stay inside the weights folder, each part {NAME_RULE}; "
                   f"got {shown(value)}")
            raise ValueError(msg)
        return value

    _hex = field_validator("sha256")(classmethod(lambda cls, v: _check_sha256(v)))


class WeightsVariant(BaseModel):
    """A published set of weights of a model (e.g. scGPT ``whole_human``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    license: str = ""
    organisms: list[str] = Field(default_factory=list)  # empty: the model's organisms
    weights: list[WeightFile] = Field(default_factory=list)

    @field_validator("organisms")
    @classmethod
    def _known_organisms(cls, value: list[str]) -> list[str]:
        unknown = [o for o in value if o not in ORGANISMS]
        if unknown:
            msg = f"unknown organism(s) {', '.join(unknown)}; known: {', '.join(sorted(ORGANISMS))}"
            raise ValueError(msg)
        return value

    @field_validator("weights")
    @classmethod
    def _distinct_paths(cls, value: list[WeightFile]) -> list[WeightFile]:
        # Each file needs a place of its own in the weights folder: the same path twice,
        # or a file where another entry needs a folder, cannot both be staged. Compared
        # without case, so a spec stages the same way on a case-insensitive disk.
        taken: dict[tuple[str, ...], str] = {}  # every entry's parts -> its path
        folders: dict[tuple[str, ...], str] = {}  # every folder above an entry -> that entry's path
        for item in value:
            parts = tuple(part.casefold() for part in Path(item.path).parts)
            above = [parts[:i] for i in range(1, len(parts))]
            other = taken.get(parts) or folders.get(parts) or next(
                (taken[folder] for folder in above if folder in taken), None)
            if other is not None:
                msg = (f"weights paths {shown(other)} and {shown(item.path)} collide (the same path, "
                       "or one inside the other); each entry needs a place of its own")
                raise ValueError(msg)
            taken[parts] = item.path
            for folder in above:
                folders.setdefault(folder, item.path)
        return value


class ModelSpec(Spec):
    """A model that turns a dataset into cell embeddings.

    ``parameters`` declares what the model's code reads (:class:`ModelParameter`; the
    shorthand ``name: value`` declares a parameter of the value's type). Every docker
    model has a ``batch_size`` (the contract's field, at least 1): declared, or 32.
    """

    kind: Literal["baseline", "docker"]
    #: For ``baseline`` models: the registered in-process implementation.
    implementation: str | None = None
    #: For ``docker`` models: the image tag to run (``czb models build`` makes it).
    image: str | None = None
    #: For ``docker`` models: the build folder (entrypoint, and a Dockerfile unless the
    #: bundled template builds it), a folder name
    #: under the bundled ``containers/``, or a path relative to this spec's YAML file.
    container: str | None = None
    #: Run with a read-only root filesystem (``/tmp`` and ``/output`` stay writable).
    read_only_rootfs: bool = True
    #: For ``docker`` models: whether czb's CI builds the image. ``false`` for an image
    #: whose build needs more than CI reaches (scGenePT's code from GitHub); its
    #: entrypoint is tested against a stand-in instead. Shown by ``czb list models``.
    ci_built: bool = True
    #: What the model produces: cell ``embedding``\ s (cell-level and cross-species tasks)
    #: or expression ``predictions`` (perturbation tasks).
    output: Literal["embedding", "predictions"] = "embedding"
    gene_id_type: GeneIdType | Literal["any"] = "any"
    input: ExpressionKind | Literal["any"] = "any"
    output_dim: int | None = Field(default=None, gt=0)
    organisms: list[str] = Field(default_factory=list)  # empty: any organism
    resources: Resources = Field(default_factory=Resources)
    parameters: dict[str, ModelParameter] = Field(default_factory=dict)
    default_variant: str | None = None
    variants: dict[str, WeightsVariant] = Field(default_factory=dict)

    _declared = field_validator("parameters", mode="before")(classmethod(lambda cls, v: declarations(v)))

    @model_validator(mode="before")
    @classmethod
    def _contract_batch_size(cls, data: Any) -> Any:
        """A docker model's ``batch_size``: declared (at least 1 unless it says otherwise) or
        :data:`DEFAULT_BATCH_SIZE`, so ``--batch-size`` applies to every docker model."""
        if not isinstance(data, dict) or data.get("kind") != "docker":
            return data
        try:
            declared = declarations(data.get("parameters") or {})
        except ValueError:
            return data  # refused by the field's own validation, which names the field
        if not isinstance(declared, dict):
            return data
        given = declared.get("batch_size", {"type": "int", "default": DEFAULT_BATCH_SIZE,
                                            "description": "cells per forward pass"})
        if isinstance(given, dict) and given.get("type") == "int" and given.get("minimum") is None:
            given = {**given, "minimum": 1}
        return {**data, "parameters": {**declared, "batch_size": given}}

    @field_validator("variants")
    @classmethod
    def _valid_variant_names(cls, value: dict[str, WeightsVariant]) -> dict[str, WeightsVariant]:
        for name in value:
            check_name(name, "variant")
        return value

    @model_validator(mode="after")
    def _complete(self) -> ModelSpec:
        if self.kind == "docker":
            missing = [f for f in ("image", "container") if getattr(self, f) is None]
            if missing:
                msg = f"a docker model needs {' and '.join(missing)}"
                raise ValueError(msg)
            batch = self.parameters.get("batch_size")
            if batch is not None and batch.type != "int":
                msg = "parameter batch_size (cells per forward pass) must be an int"
                raise ValueError(msg)
        elif self.implementation is None:
            msg = "a baseline model needs an implementation"
            raise ValueError(msg)
        if self.variants and self.default_variant is None:
            msg = f"default_variant is required when variants are given ({', '.join(self.variants)})"
            raise ValueError(msg)
        if self.default_variant is not None and self.default_variant not in self.variants:
            msg = f"default_variant {self.default_variant!r} is not one of the variants ({', '.join(self.variants) or 'none'})"
            raise ValueError(msg)
        unknown = [o for o in self.organisms if o not in ORGANISMS]
        if unknown:
            msg = f"unknown organism(s) {', '.join(unknown)}; known: {', '.join(sorted(ORGANISMS))}"
            raise ValueError(msg)
        return self

    def variant(self, name: str | None = None) -> tuple[str, WeightsVariant]:
        """The named variant (default: ``default_variant``) and its weights."""
        name = name or self.default_variant
        if not self.variants and name in (None, "default"):
            return "default", WeightsVariant()
        if name not in self.variants:
            raise UnknownNameError("weights variant", name, self.variants, owner=f"model {self.name!r}")
        return name, self.variants[name]

    def container_dir(self) -> Path:
        """The folder holding this model's entrypoint, and its Dockerfile unless the bundled
        template (``containers/common/Dockerfile``) builds it."""
        if self.container is None:
            msg = f"model {self.name!r} has no container folder"
            raise SpecError(msg)
        candidates = []
        if self.source is not None:
            candidates.append(Path(self.source).parent / self.container)
        candidates.append(BUNDLED_CONTAINERS_DIR / self.container)
        for path in candidates:
            if (path / "Dockerfile").is_file() or (path / "entrypoint.py").is_file():
                return path.resolve()
        msg = (
            f"model {self.name!r}: no Dockerfile or entrypoint.py in container folder "
            f"{self.container!r} "
            f"(looked in {', '.join(str(p) for p in candidates)})"
        )
        raise SpecError(msg)


class TaskSpec(Spec):
    """A task: a registered implementation plus its default parameters, or a suite
    (``includes``: names of other task specs run together, e.g. ``perturbation_hierarchy``)."""

    implementation: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    includes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> TaskSpec:
        if (self.implementation is None) == (not self.includes):
            msg = "a task spec needs exactly one of implementation (a task) or includes (a suite of task specs)"
            raise ValueError(msg)
        if self.includes and self.parameters:
            msg = "a suite (includes) takes no parameters; set them on the included task specs"
            raise ValueError(msg)
        return self


class SuiteSpec(Spec):
    """A benchmark suite for ``czb bench``: the matrix models × datasets × tasks × seeds,
    plus the suites it includes (their matrices keep their own seeds)::

        suites:
          tabula_sapiens:
            models: [scgpt, uce, scvi]
            datasets: [tsv2_blood, tsv2_bladder]
            tasks: [clustering, embedding, label_prediction, batch_integration]
            seeds: [0, 1, 2]
          everything:
            includes: [tabula_sapiens, other_suites.yaml]

    ``includes`` holds suite names, or YAML files (relative to this one) whose every
    suite is included. ``tasks`` may name task suites (``perturbation_hierarchy``).
    """

    includes: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    datasets: list[str] = Field(default_factory=list)
    tasks: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    #: Add the baselines every comparison needs (``pca`` for embeddings), as ``czb run`` does.
    baseline: bool = True
    #: Exact neighbour graphs and silhouettes at any size (``true``), approximate ones
    #: at any size (``false``), or by size (unset).
    exact: bool | None = None

    @model_validator(mode="after")
    def _something_to_run(self) -> SuiteSpec:
        axes = {"models": self.models, "datasets": self.datasets, "tasks": self.tasks}
        given = [k for k, v in axes.items() if v]
        if given and len(given) < 3:
            missing = [k for k in axes if k not in given]
            msg = f"a suite's matrix needs models, datasets and tasks; {' and '.join(missing)} missing"
            raise ValueError(msg)
        if not given and not self.includes:
            msg = "a suite needs a matrix (models, datasets, tasks) or includes"
            raise ValueError(msg)
        if not self.seeds or min(self.seeds) < 0 or len(set(self.seeds)) != len(self.seeds):
            msg = f"seeds must be distinct non-negative integers, got {self.seeds}"
            raise ValueError(msg)
        return self


SECTIONS: dict[str, type[Spec]] = {
    "datasets": DatasetSpec, "models": ModelSpec, "tasks": TaskSpec, "suites": SuiteSpec,
}
