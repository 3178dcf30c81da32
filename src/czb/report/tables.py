"""Result records merged into comparison tables: models × metrics, each against its baseline.

Any set of result JSONs (several runs, sweeps, machines) is merged. A model is its name,
plus the parameters that tell apart variants of one name (a sweep); the same
(dataset, model, task) scored twice keeps the newest record and counts the older as
superseded. Every value is compared with the baseline of its kind (PCA for embeddings,
``control_mean`` for perturbation predictions) by a stated test
(:mod:`czb.report.significance`): paired seed by seed for stochastic metrics, by
bootstrap CIs over cells for deterministic per-cell means.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from czb.core import records as R
from czb.core.errors import CzbWarning, ResultsError
from czb.evaluation.metrics import aggregate as agg
from czb.evaluation.metrics import bio_floor
from czb.evaluation.registry import METRICS, MetricInfo, load_all
from czb.pipeline.baselines import reference_baseline
from czb.report import significance as sig
from czb.report.significance import Verdict

#: The model whose aggregates are shown beside every aggregate (the random embedding).
RANDOM_MODEL = "random"
#: How each verdict is shown next to a value.
VERDICT_MARKS: dict[str, str] = {"better": "▲", "worse": "▼", "same": "", "unknown": ""}
#: Beside the aggregates of a model whose label prediction is near chance.
FLOOR_FLAG = "⚠ bio near chance"


def metric_label(name: str, params: dict[str, Any]) -> str:
    """A metric's name with what tells apart metrics of that name: species pair,
    post-processing, knowledge source, classifier, cell types."""
    parts = []
    if "train_species" in params:
        parts.append(f"{params['train_species']}→{params.get('test_species')}")
    for key in ("postprocessing", "source", "classifier", "cell_types", "scaled"):
        if key in params:
            parts.append(str(params[key]))
    return name + (f" [{', '.join(parts)}]" if parts else "")


class ReportWarning(CzbWarning):
    """A result file found in a folder cannot be read; the report leaves it out."""


def find_results(paths: Iterable[str | Path]) -> list[tuple[Path, Path]]:
    """The result JSONs in ``paths`` (files, or folders searched recursively; for a czb
    store, its ``results/``), each with its results folder: the folder searched, or the
    folder of a file given.

    Raises
    ------
    ResultsError
        A path that does not exist, or a folder without result JSONs.
    """
    found = []
    for path in map(Path, paths):
        if _is_store(path):  # a czb store (czb run --output-dir, czb bench --store): its records
            path = path / "results"
        if path.is_dir():
            try:
                files = sorted(p for p in path.rglob("*.json") if not p.name.startswith(".tmp-"))
            except OSError as e:
                msg = f"{path}: cannot search this folder for results ({e.strerror or type(e).__name__})"
                raise ResultsError(msg) from None
            if not files:
                msg = f"{path}: no result JSONs in this folder"
                raise ResultsError(msg)
            found += [(file, path) for file in files]
        elif path.exists():
            found.append((path, path.parent))
        else:
            msg = f"{path}: no such file or folder"
            raise ResultsError(msg)
    if not found:
        msg = "no result files given"
        raise ResultsError(msg)
    return found


def _is_store(path: Path) -> bool:
    """Whether ``path`` is a czb store: its records are in ``results/``, beside unit
    outputs that are not records."""
    return (path / "results").is_dir() and (path / "suite.json").is_file()


def load_results(paths: Iterable[str | Path]) -> list[tuple[Path, Path, R.ResultRecord]]:
    """Every result JSON in ``paths`` (files, or folders searched recursively), with its
    results folder (:func:`find_results`) and its record.

    A file found in a folder that cannot be read (not JSON, too big or deep, not a czb
    result, written by a newer czb) is left out with one :class:`ReportWarning` naming
    it, never quoting it: one damaged file does not cost the report of the others.

    Raises
    ------
    ResultsError
        A path that does not exist, a folder without results, a file named in ``paths``
        that cannot be read, or no readable result at all.
    """
    paths = [Path(p) for p in paths]
    named = {p for p in paths if not p.is_dir()}
    loaded, skipped = [], 0
    for file, root in find_results(paths):
        try:
            loaded.append((file, root, R.read_result(file)))
        except ResultsError as e:
            if file in named:
                raise
            skipped += 1
            warnings.warn(f"{e}; left out of the report", ReportWarning, stacklevel=2)
    if not loaded:
        where = ", ".join(map(str, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        msg = f"{where}: none of the {skipped} result files found can be read (each is named above)"
        raise ResultsError(msg)
    return loaded


def read_results(paths: Iterable[str | Path]) -> list[tuple[Path, R.ResultRecord]]:
    """:func:`load_results` without the results folders: ``(file, record)`` pairs."""
    return [(file, record) for file, _, record in load_results(paths)]


@dataclass
class Entry:
    """One model's value of one metric, and how it compares with the baseline.

    Attributes
    ----------
    value, std
        Mean over seeds and their sample standard deviation (``None`` for one seed).
    values
        Per seed, aligned with ``seeds``.
    ci95
        95% CI of a value estimated from sampled cells.
    bootstrap
        Bootstrap 95% CI over cells (or donors) of a deterministic per-cell mean.
    difference
        Model − baseline: the mean over common seeds of the paired differences (a
        stochastic metric), or of the values (a deterministic one); ``None`` without both.
    verdict, test, p_value, difference_ci95
        The decision against the baseline (:mod:`czb.report.significance`): ▲/▼ when a
        stated test marks the difference, the test in words, its p-value or the 95% CI
        of the difference where it has one.
    """

    value: float | None
    std: float | None
    values: list[float | None]
    seeds: list[int]
    ci95: tuple[float, float] | None = None
    bootstrap: R.BootstrapRecord | None = None
    difference: float | None = None
    verdict: Verdict = "unknown"
    test: str = ""
    p_value: float | None = None
    difference_ci95: tuple[float, float] | None = None


@dataclass
class Column:
    """One metric of one task on one dataset, with every model's entry."""

    dataset: str
    task: str
    metric: str
    params: dict[str, Any]
    baseline: str
    higher_is_better: bool | None
    entries: dict[str, Entry] = field(default_factory=dict)
    #: Whether the metric combines others (:attr:`MetricInfo.aggregate`): shown with the
    #: random embedding's value (:meth:`random_text`) and the bio-conservation floor.
    aggregate: bool = False

    @property
    def label(self) -> str:
        return metric_label(self.metric, self.params)

    def random_text(self) -> str:
        """The random embedding's value of this aggregate (``random 0.4480``), ``random
        not run`` without one, ``""`` for a metric that is not an aggregate."""
        if not self.aggregate:
            return ""
        entry = self.entries.get(RANDOM_MODEL)
        if entry is None or entry.value is None or entry.value != entry.value:
            return "random not run"
        return f"random {entry.value:.4f}"

    def best(self) -> str | None:
        """The model with the best value (``None`` when the direction is unknown or no value)."""
        scored = {m: e.value for m, e in self.entries.items() if e.value is not None}
        if not scored or self.higher_is_better is None:
            return None
        return (max if self.higher_is_better else min)(scored, key=scored.get)


@dataclass
class Usage:
    """Runtime and peak memory of one model on one task."""

    runtime_s: float
    embedding_runtime_s: float
    peak_memory_mb: float


@dataclass
class Comparison:
    """Everything a report shows, from a set of result records."""

    records: list[R.ResultRecord]
    columns: list[Column]
    #: Models per dataset, baseline first, then in order of appearance.
    models: dict[str, list[str]]
    #: Records that are not ``ok`` (failed, not applicable), with their model labels.
    problems: list[tuple[str, R.ResultRecord]]
    usage: dict[tuple[str, str, str], Usage]
    #: Older records replaced by a newer one of the same dataset, model and task.
    superseded: list[R.ResultRecord]
    #: Datasets whose comparison lacks its baseline (it is shown as missing, not dropped).
    missing_baselines: dict[str, list[str]]
    #: Model label (:func:`model_labels`) of each record in ``records``, by ``id``.
    _labels: dict[int, str] = field(default_factory=dict, repr=False)
    #: ``(kNN label accuracy, chance)`` of each (dataset, task, model) whose record holds
    #: the bio-conservation floor (:mod:`czb.evaluation.metrics.bio_floor`).
    floors: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)

    def floor_flag(self, dataset: str, task: str, model: str) -> str:
        """``⚠ bio near chance`` when that model's floor is near chance
        (:func:`~czb.evaluation.metrics.bio_floor.near_chance`), else ``""``."""
        floor = self.floors.get((dataset, task, model))
        return FLOOR_FLAG if floor is not None and bio_floor.near_chance(*floor) else ""

    def floor_note(self, dataset: str, task: str, model: str) -> str:
        """The floor in words (``kNN label accuracy 0.116, chance 0.100``), or ``""``."""
        floor = self.floors.get((dataset, task, model))
        return "" if floor is None else f"kNN label accuracy {floor[0]:.3f}, chance {floor[1]:.3f}"

    def model_of(self, record: R.ResultRecord) -> str | None:
        """The model label of ``record``; ``None`` if it is not among :attr:`records`
        (superseded, or never compared)."""
        return self._labels.get(id(record))

    def tasks(self, dataset: str) -> list[str]:
        return list(dict.fromkeys(c.task for c in self.columns if c.dataset == dataset))

    def columns_of(self, dataset: str, task: str | None = None) -> list[Column]:
        return [c for c in self.columns if c.dataset == dataset and (task is None or c.task == task)]


_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def marked_tests(columns: Iterable[Column]) -> list[str]:
    """The tests that made the marks of ``columns``, each once, in order of appearance;
    a mark's footnote is its test's place in this list (:func:`footnote`)."""
    return list(dict.fromkeys(e.test for c in columns for e in c.entries.values() if VERDICT_MARKS[e.verdict]))


def footnote(number: int) -> str:
    """Footnote ``number`` (1-based) as superscript digits."""
    return str(number).translate(_SUPERSCRIPT)


def model_labels(records: Sequence[R.ResultRecord]) -> dict[int, str]:
    """A label per record's model: its name, plus the parameters that differ between
    records of that name (a sweep), e.g. ``scvi [n_latent=10]``."""
    variants: dict[str, dict[str, set]] = {}
    for r in records:
        for key, value in r.model.parameters.items():
            variants.setdefault(r.model.name, {}).setdefault(key, set()).add(repr(value))
    labels = {}
    for r in records:
        varying = sorted(k for k, v in variants.get(r.model.name, {}).items() if len(v) > 1)
        shown = ", ".join(f"{k}={r.model.parameters.get(k)}" for k in varying)
        labels[id(r)] = r.model.name + (f" [{shown}]" if shown else "")
    return labels


def _decide(entry: Entry, base: Entry, info: MetricInfo | None,
            higher_is_better: bool | None) -> tuple[float | None, sig.Decision]:
    """(model − baseline, the decision on it) by the test that fits the metric."""
    if info is None:
        return None, sig.no_test("a metric this czb does not know")
    if info.stochastic:
        by_seed = dict(zip(base.seeds, base.values))
        pairs = [(v, by_seed[s]) for s, v in zip(entry.seeds, entry.values)
                 if s in by_seed and v is not None and by_seed[s] is not None]
        if not pairs:
            return None, sig.no_test("no seed scored by both")
        difference = statistics.fmean(a - b for a, b in pairs)
        return difference, sig.seed_test([a for a, _ in pairs], [b for _, b in pairs],
                                         higher_is_better=higher_is_better)
    if entry.value is None or base.value is None:
        return None, sig.no_test("no value")
    difference = entry.value - base.value
    if not info.per_cell_mean:
        return difference, sig.no_test("deterministic, not a per-cell mean")
    if entry.bootstrap is None or base.bootstrap is None:
        return difference, sig.no_test("per-cell mean without a bootstrap CI in its record (older czb)")
    over = entry.bootstrap.over if entry.bootstrap.over == base.bootstrap.over else "cells and donors"
    return difference, sig.ci_test((entry.value, *entry.bootstrap.ci95), (base.value, *base.bootstrap.ci95),
                                   over=over, higher_is_better=higher_is_better)


def compare(records: Sequence[R.ResultRecord]) -> Comparison:
    """Merge ``records`` into a :class:`Comparison`."""
    load_all()
    labels = model_labels(records)
    newest: dict[tuple, R.ResultRecord] = {}
    superseded = []
    for r in records:
        key = (r.dataset.name, labels[id(r)], r.task.name, repr(sorted(r.task.parameters.items())))
        held = newest.get(key)
        if held is None or r.created_at > held.created_at:
            if held is not None:
                superseded.append(held)
            newest[key] = r
        else:
            superseded.append(r)
    newest_ids = {id(r) for r in newest.values()}
    kept = [r for r in records if id(r) in newest_ids]

    columns: dict[tuple, Column] = {}
    models: dict[str, list[str]] = {}
    problems, usage = [], {}
    floors: dict[tuple[str, str, str], tuple[float, float]] = {}
    baselines: dict[str, set[str]] = {}
    for r in kept:
        model = labels[id(r)]
        baseline = reference_baseline(r)
        baselines.setdefault(r.dataset.name, set()).add(baseline)
        models.setdefault(r.dataset.name, [])
        if model not in models[r.dataset.name]:
            models[r.dataset.name].append(model)
        usage[(r.dataset.name, model, r.task.name)] = Usage(r.runtime_s, r.embedding_runtime_s, r.peak_memory_mb)
        if r.status != "ok":
            problems.append((model, r))
            continue
        for m in r.metrics:
            key = (r.dataset.name, r.task.name, m.name, repr(sorted(m.params.items())))
            info = METRICS.get(m.name)
            column = columns.setdefault(key, Column(
                r.dataset.name, r.task.name, m.name, dict(m.params), baseline,
                None if info is None else info.higher_is_better, aggregate=bool(info and info.aggregate)))
            values = list(m.values_raw) if m.values_raw else [m.value]
            seeds = list(r.seeds[: len(values)]) if len(r.seeds) >= len(values) else list(range(len(values)))
            column.entries[model] = Entry(m.value, m.value_std_dev, values, seeds,
                                          tuple(m.ci95) if m.ci95 else None, m.bootstrap)
        floor = bio_floor.floor_from_note(r.computation.get(bio_floor.NOTE_KEY))
        if floor is not None:
            floors[(r.dataset.name, r.task.name, model)] = floor

    for column in columns.values():
        base = column.entries.get(column.baseline)
        info = METRICS.get(column.metric)
        for model, entry in column.entries.items():
            if base is None or model == column.baseline:
                continue
            entry.difference, decision = _decide(entry, base, info, column.higher_is_better)
            entry.verdict, entry.test, entry.p_value, entry.difference_ci95 = (
                decision.verdict, decision.test, decision.p_value, decision.ci95)

    scaled = scaled_totals(list(columns.values()), models)
    missing = {}
    for dataset, wanted in baselines.items():
        absent = sorted(b for b in wanted if b not in models[dataset])
        if absent:
            missing[dataset] = absent
        # The baseline first (a missing one still gets its row, marked missing).
        models[dataset] = sorted(wanted) + [m for m in models[dataset] if m not in wanted]
    return Comparison(kept, [*columns.values(), *scaled], models, problems, usage, superseded, missing,
                      {id(r): labels[id(r)] for r in kept}, floors)


#: The ``params`` of the columns :func:`scaled_totals` adds.
SCALED = {"scaled": "min-max over the models compared"}


def scaled_totals(columns: Sequence[Column], models: dict[str, list[str]]) -> list[Column]:
    """scib-metrics' Benchmarker totals (every metric min-max scaled across the models
    compared, :func:`~czb.evaluation.metrics.aggregate.scaled_scib_totals`) of each dataset
    and task whose columns hold the scIB groups' metrics, as columns labelled
    ``[min-max over the models compared]`` beside the raw totals. They rank the models of
    this comparison only, so they carry no test against the baseline."""
    totals = {agg.SCIB_BIO_CONSERVATION.name, agg.SCIB_BATCH_CORRECTION.name, agg.SCIB_OVERALL.name}
    reporting = {(c.dataset, c.task) for c in columns if c.metric in totals}  # tasks with scIB totals
    groups: dict[tuple[str, str], dict[str, Column]] = {}
    for c in columns:
        if ((c.dataset, c.task) in reporting and c.metric in (*agg.BIO_METRICS, *agg.BATCH_METRICS)
                and c.params.get("cell_types") != "within_species"):
            groups.setdefault((c.dataset, c.task), {}).setdefault(c.metric, c)
    out = []
    for (dataset, task), by_metric in groups.items():
        names = [m for m in models.get(dataset, []) if any(m in c.entries for c in by_metric.values())]
        if len(names) < 2:  # scaling needs two models or more
            continue
        per_model = {m: {metric: c.entries[m].value for metric, c in by_metric.items()
                         if m in c.entries and c.entries[m].value is not None} for m in names}
        scaled = agg.scaled_scib_totals(per_model, bio=[n for n in agg.BIO_METRICS if n in by_metric],
                                        batch=[n for n in agg.BATCH_METRICS if n in by_metric])
        baseline = next(iter(by_metric.values())).baseline
        for metric in (agg.SCIB_BIO_CONSERVATION.name, agg.SCIB_BATCH_CORRECTION.name, agg.SCIB_OVERALL.name):
            column = Column(dataset, task, metric, dict(SCALED), baseline, True, aggregate=True)
            for m in names:
                value = scaled[m][metric]
                value = value if value == value else None  # NaN: nothing to scale
                column.entries[m] = Entry(value, None, [value], [], test="no test: scaled across the models compared")
            out.append(column)
    return out
