"""YAML specs of datasets, models, tasks and benchmark suites, validated with pydantic.

A spec file is a YAML mapping with any of the top-level sections ``datasets``,
``models``, ``tasks`` and ``suites``; each maps a name to that entry's fields::

    datasets:
      my_atlas:
        uri: s3://bucket/atlas.h5ad
        organism: human
        label_key: cell_type
        batch_key: [assay, donor_id]

Spec folders are read in order (bundled, ``CZB_CONFIG_PATH``, ``--config-dir``);
an entry in a later folder replaces the entry of the same name in an earlier one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from czb.errors import SpecError, UnknownNameError

BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: Build folders of the bundled model images (Dockerfile, entrypoint, requirements).
BUNDLED_CONTAINERS_DIR = Path(__file__).resolve().parent.parent / "containers"

#: What the name of a dataset, model, task, suite or weights variant, and each part of a
#: weights ``path``, may be: these become folder and file names (cache, store, results).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = "1-128 letters, digits, '_', '.' or '-', starting with a letter or digit, without '..'"


def is_valid_name(name: object) -> bool:
    """Whether ``name`` matches :data:`NAME_PATTERN` (and holds no ``..``)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def _shown(name: object) -> str:
    """``name`` for an error message: its repr, cut short (a name may be anything in a bad spec)."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it is valid (:func:`is_valid_name`).

    Raises
    ------
    ValueError
        It is not; the message names it (shortened) and gives the rule.
    """
    if not is_valid_name(name):
        msg = f"{what} {_shown(name)} is not a valid name ({NAME_RULE})"
        raise ValueError(msg)
    return name


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


class _Spec(BaseModel):
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


class DatasetSpec(_Spec):
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
                   f"got {_shown(value)}")
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
                msg = (f"weights paths {_shown(other)} and {_shown(item.path)} collide (the same path, "
                       "or one inside the other); each entry needs a place of its own")
                raise ValueError(msg)
            taken[parts] = item.path
            for folder in above:
                folders.setdefault(folder, item.path)
        return value


class ModelSpec(_Spec):
    """A model that turns a dataset into cell embeddings."""

    kind: Literal["baseline", "docker"]
    #: For ``baseline`` models: the registered in-process implementation.
    implementation: str | None = None
    #: For ``docker`` models: the image tag to run (``czb models build`` makes it).
    image: str | None = None
    #: For ``docker`` models: the build folder (Dockerfile + entrypoint), a folder name
    #: under the bundled ``containers/``, or a path relative to this spec's YAML file.
    container: str | None = None
    #: Run with a read-only root filesystem (``/tmp`` and ``/output`` stay writable).
    read_only_rootfs: bool = True
    #: What the model produces: cell ``embedding``\ s (cell-level and cross-species tasks)
    #: or expression ``predictions`` (perturbation tasks).
    output: Literal["embedding", "predictions"] = "embedding"
    gene_id_type: GeneIdType | Literal["any"] = "any"
    input: ExpressionKind | Literal["any"] = "any"
    output_dim: int | None = Field(default=None, gt=0)
    organisms: list[str] = Field(default_factory=list)  # empty: any organism
    resources: Resources = Field(default_factory=Resources)
    parameters: dict[str, Any] = Field(default_factory=dict)
    default_variant: str | None = None
    variants: dict[str, WeightsVariant] = Field(default_factory=dict)

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
        """The folder holding this model's Dockerfile and entrypoint."""
        if self.container is None:
            msg = f"model {self.name!r} has no container folder"
            raise SpecError(msg)
        candidates = []
        if self.source is not None:
            candidates.append(Path(self.source).parent / self.container)
        candidates.append(BUNDLED_CONTAINERS_DIR / self.container)
        for path in candidates:
            if (path / "Dockerfile").is_file():
                return path.resolve()
        msg = (
            f"model {self.name!r}: no Dockerfile in container folder {self.container!r} "
            f"(looked in {', '.join(str(p) for p in candidates)})"
        )
        raise SpecError(msg)


class TaskSpec(_Spec):
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


class SuiteSpec(_Spec):
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


_SECTIONS: dict[str, type[_Spec]] = {
    "datasets": DatasetSpec, "models": ModelSpec, "tasks": TaskSpec, "suites": SuiteSpec,
}


def _format_validation_error(path: Path, section: str, name: str, error: ValidationError, line: int | None) -> str:
    problems = []
    for e in error.errors():
        loc = ".".join(str(p) for p in (section, name, *e["loc"]))
        problems.append(f"{loc}: {e['msg']}")
    return f"{path}: " + "; ".join(problems) + ("" if line is None else f" (line {line})")


#: The PyYAML loader: libyaml's (fast) when PyYAML was built with it.
_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
#: Lists and mappings nested deeper than this are refused before the YAML is composed
#: (libyaml's composer recurses in C: a deep enough document would crash the process).
#: Spec parameters are copied into results a few levels down, and result files are read
#: back only up to 64 levels (:data:`czb.runner.results.MAX_RESULT_DEPTH`): 32 leaves room.
MAX_YAML_DEPTH = 32
#: Nodes that aliases may add to one spec file, all aliases together (an alias adds the
#: size of what its anchor names): shared citations and weight files fit; quadratic alias
#: bombs (one big anchor, many aliases) do not.
MAX_ALIAS_NODES = 10_000


class _DuplicateKeyError(ValueError):
    def __init__(self, line: int, first: int):
        super().__init__(f"duplicate key (first given at line {first})")
        self.line = line


class _SpecLoader(_BaseLoader):
    """A safe loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # "<<" merges; explicit keys override it
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKeyError(line, seen[key])
                    seen[key] = line
                except TypeError:  # an unhashable key: the base constructor refuses it
                    continue
        return super().construct_mapping(node, deep=deep)


def _check_yaml_shape(text: str, path: Path) -> None:
    """Refuse deep nesting, recursive aliases, aliases of lists or mappings that hold
    aliases themselves (how alias bombs grow exponentially), and aliases that add more
    than :data:`MAX_ALIAS_NODES` nodes in total; from the event stream, before anything
    is built from it."""
    anchors: dict[str, tuple[int, bool]] = {}  # anchor -> (nodes, holds an alias)
    open_anchors: set[str] = set()
    stack: list[list[Any]] = []  # [anchor, nodes so far, holds an alias] per open list or mapping
    added = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) >= MAX_YAML_DEPTH:
                msg = f"{path}:{line}: lists and mappings nested more than {MAX_YAML_DEPTH} levels deep"
                raise SpecError(msg)
            stack.append([event.anchor, 1, False])
            if event.anchor:
                open_anchors.add(event.anchor)
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size, holds_alias = stack.pop()
            if anchor:
                anchors[anchor] = (size, holds_alias)
                open_anchors.discard(anchor)
            if stack:
                stack[-1][1] += size
                stack[-1][2] = stack[-1][2] or holds_alias
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor:
                anchors[event.anchor] = (1, False)
            if stack:
                stack[-1][1] += 1
        elif isinstance(event, yaml.AliasEvent):
            if event.anchor in open_anchors:
                msg = f"{path}:{line}: an alias refers to a list or mapping that contains it (recursive YAML)"
                raise SpecError(msg)
            size, holds_alias = anchors.get(event.anchor, (1, False))
            if holds_alias:
                msg = (f"{path}:{line}: an alias refers to a list or mapping that holds aliases itself; "
                       "nested aliases are refused (they can expand exponentially)")
                raise SpecError(msg)
            added += size
            if added > MAX_ALIAS_NODES:
                msg = (f"{path}:{line}: YAML aliases expand to more than {MAX_ALIAS_NODES:,} nodes; "
                       "write the entries out instead")
                raise SpecError(msg)
            if stack:
                stack[-1][1] += size
                stack[-1][2] = True


def load_yaml(path: Path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """Read a YAML spec file safely.

    The file must be a regular file of at most ``CZB_MAX_SPEC_MB``. Aliases (to share a
    citation or a weights file) are allowed while they cannot explode: an alias may not
    name a list or mapping that holds aliases itself, and all aliases together may add at
    most :data:`MAX_ALIAS_NODES` nodes. Nesting is limited to :data:`MAX_YAML_DEPTH`
    levels, and a key given twice in one mapping is an error.

    Returns
    -------
    The data, and the line of each key of the first two levels (``(section,)`` and
    ``(section, name)``), for error messages.

    Raises
    ------
    SpecError
        Naming the file (and line where there is one); never quoting its content.
    """
    from czb.settings import get_settings
    from czb.untrusted import read_bounded

    max_bytes = int(get_settings().max_spec_mb * 1e6)
    try:
        raw = read_bounded(path, max_bytes)
    except OSError as e:
        msg = f"{path}: cannot read spec file ({e.strerror or type(e).__name__})"
        raise SpecError(msg) from None
    except ValueError as e:
        msg = f"{path}: cannot read spec file ({e}; CZB_MAX_SPEC_MB raises the limit)"
        raise SpecError(msg) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"{path}: not valid YAML (not UTF-8 text at byte {e.start})"
        raise SpecError(msg) from None
    try:
        _check_yaml_shape(text, path)
        loader = _SpecLoader(text)
        try:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except _DuplicateKeyError as e:
        msg = f"{path}:{e.line}: {e}"
        raise SpecError(msg) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "cannot be parsed"
        msg = f"{path}{where}: not valid YAML ({problem[:120]})"
        raise SpecError(msg) from None
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines[(str(key.value),)] = key.start_mark.line + 1
            if isinstance(value, yaml.MappingNode):
                for inner, _ in value.value:
                    lines.setdefault((str(key.value), str(inner.value)), inner.start_mark.line + 1)
    return data, lines


def load_spec_file(path: Path) -> dict[str, dict[str, _Spec]]:
    """Read one YAML spec file into ``{section: {name: spec}}``.

    Every entry name must be valid (:data:`NAME_PATTERN`): names become folder and file
    names. Errors name the file, the line, the section and the entry.
    """
    path = Path(path)
    raw, lines = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        msg = f"{path}: a spec file must be a mapping with sections {sorted(_SECTIONS)}"
        raise SpecError(msg)
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:  # not quoted: a file that is no spec at all must not be echoed
        line = lines.get((str(unknown[0]),))
        msg = (f"{path}: {len(unknown)} unknown section(s); expected any of {sorted(_SECTIONS)}"
               + ("" if line is None else f" (the first at line {line})"))
        raise SpecError(msg)
    out: dict[str, dict[str, _Spec]] = {}
    for section, entries in raw.items():
        cls = _SECTIONS[section]
        if entries is None:
            entries = {}
        if not isinstance(entries, dict):
            msg = f"{path}: {section} must map names to entries"
            raise SpecError(msg)
        out[section] = {}
        for name, fields in entries.items():
            if isinstance(name, (int, float)) and not isinstance(name, bool):
                name = str(name)  # e.g. a dataset called 2024
            line = lines.get((section, str(name)))
            at_line = "" if line is None else f" (line {line})"
            if not is_valid_name(name):
                msg = f"{path}: {section}: name {_shown(name)} is not a valid name ({NAME_RULE}){at_line}"
                raise SpecError(msg)
            if not isinstance(fields, dict):
                msg = f"{path}: {section}.{name} must be a mapping of fields{at_line}"
                raise SpecError(msg)
            try:
                out[section][name] = cls(name=name, source=path, **fields)
            except ValidationError as e:
                raise SpecError(_format_validation_error(path, section, name, e, line)) from None
            except TypeError as e:  # e.g. a field named "name" repeated inside the entry
                msg = f"{path}: {section}.{name}: {e}{at_line}"
                raise SpecError(msg) from None
    return out


def _spec_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        msg = f"spec folder {folder} does not exist or is not a folder"
        raise SpecError(msg)
    return sorted(p for p in folder.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


class Catalog:
    """Every dataset, model and task spec czb knows about.

    Build it with :meth:`Catalog.load`; look entries up with :meth:`dataset`,
    :meth:`model` and :meth:`task`, which raise :class:`~czb.errors.UnknownNameError`
    with the closest matches.
    """

    def __init__(
        self,
        datasets: dict[str, DatasetSpec],
        models: dict[str, ModelSpec],
        tasks: dict[str, TaskSpec],
        suites: dict[str, SuiteSpec] | None = None,
    ):
        self.datasets = datasets
        self.models = models
        self.tasks = tasks
        self.suites = suites or {}

    @classmethod
    def load(
        cls, extra_dirs: Iterable[Path] = (), *, include_bundled: bool = True, extra_files: Iterable[Path] = ()
    ) -> Catalog:
        """Read the bundled specs, then ``CZB_CONFIG_PATH``, then ``extra_dirs``, then
        ``extra_files`` (e.g. a suite file with its own datasets and models).

        Later folders and files override earlier ones entry by entry.
        """
        from czb.settings import get_settings

        folders: list[Path] = [BUNDLED_CONFIG_DIR] if include_bundled else []
        folders += list(get_settings().config_path) + [Path(d) for d in extra_dirs]
        merged: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
        for path in [p for folder in folders for p in _spec_files(folder)] + [Path(f) for f in extra_files]:
            for section, entries in load_spec_file(path).items():
                merged[section].update(entries)
        return cls(merged["datasets"], merged["models"], merged["tasks"], merged["suites"])

    def suite(self, name: str) -> SuiteSpec:
        return self._get(self.suites, "suite", name)

    def suite_matrices(self, name: str, seen: tuple[str, ...] = ()) -> list[SuiteSpec]:
        """The suites with a matrix that running suite ``name`` runs: itself and
        everything it includes, recursively (files included are read on the way)."""
        if name in seen:
            msg = f"suite {name!r} includes itself (via {' -> '.join(seen)})"
            raise SpecError(msg)
        suite = self.suite(name)
        out = [suite] if suite.models else []
        for included in suite.includes:
            if Path(included).suffix in (".yaml", ".yml"):
                base = Path(suite.source).parent if suite.source is not None else Path.cwd()
                entries = load_spec_file(base / included)
                for section, specs in entries.items():
                    table = getattr(self, section)
                    for spec_name, spec in specs.items():
                        table.setdefault(spec_name, spec)  # the including file's entries win
                for spec_name in entries.get("suites", {}):
                    out += self.suite_matrices(spec_name, (*seen, name))
            else:
                out += self.suite_matrices(included, (*seen, name))
        return out

    def dataset(self, name: str) -> DatasetSpec:
        return self._get(self.datasets, "dataset", name)

    def model(self, name: str) -> ModelSpec:
        return self._get(self.models, "model", name)

    def task(self, name: str) -> TaskSpec:
        return self._get(self.tasks, "task", name)

    @staticmethod
    def _get(entries: dict[str, Any], kind: str, name: str) -> Any:
        try:
            return entries[name]
        except KeyError:
            raise UnknownNameError(kind, name, entries) from None

    def resolve(self, kind: str, names: Sequence[str]) -> list[Any]:
        """Look up several names of one kind; ``"all"`` expands to every entry."""
        table = {"dataset": self.datasets, "model": self.models, "task": self.tasks, "suite": self.suites}[kind]
        if list(names) == ["all"]:
            specs = list(table.values())
        else:
            specs = [self._get(table, kind, n) for n in names]
        if kind != "task":
            return specs
        return self._expand_suites(specs)

    def _expand_suites(self, specs: Sequence[TaskSpec], seen: tuple[str, ...] = ()) -> list[TaskSpec]:
        """Replace each suite by the task specs it includes (recursively, each task once)."""
        out: dict[str, TaskSpec] = {}
        for spec in specs:
            if not spec.includes:
                out.setdefault(spec.name, spec)
                continue
            if spec.name in seen:
                msg = f"task suite {spec.name!r} includes itself (via {' -> '.join(seen)})"
                raise SpecError(msg)
            members = [self._get(self.tasks, "task", n) for n in spec.includes]
            for member in self._expand_suites(members, (*seen, spec.name)):
                out.setdefault(member.name, member)
        return list(out.values())
