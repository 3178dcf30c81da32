"""Every spec czb knows: the :class:`Catalog` of datasets, models, tasks and suites.

Spec folders are read in order (bundled, ``CZB_CONFIG_PATH``, ``--config-dir``);
an entry in a later folder replaces the entry of the same name in an earlier one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from czb.core.errors import SpecError, UnknownNameError
from czb.specs.loading import load_spec_file
from czb.specs.schema import SECTIONS, DatasetSpec, ModelSpec, SuiteSpec, TaskSpec

BUNDLED_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _spec_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        msg = f"spec folder {folder} does not exist or is not a folder"
        raise SpecError(msg)
    return sorted(p for p in folder.rglob("*") if p.suffix in {".yaml", ".yml"} and p.is_file())


class Catalog:
    """Every dataset, model and task spec czb knows about.

    Build it with :meth:`Catalog.load`; look entries up with :meth:`dataset`,
    :meth:`model` and :meth:`task`, which raise :class:`~czb.core.errors.UnknownNameError`
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
        from czb.core.settings import get_settings

        folders: list[Path] = [BUNDLED_CONFIG_DIR] if include_bundled else []
        folders += list(get_settings().config_path) + [Path(d) for d in extra_dirs]
        merged: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
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
