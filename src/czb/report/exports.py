"""The comparison as CSV (one row per model and metric), Markdown and terminal tables."""

from __future__ import annotations

import csv
import io
import json
import math

from czb.core.terminal import printable
from czb.report.suite import across_datasets
from czb.report.tables import VERDICT_MARKS, Column, Comparison, footnote, marked_tests

CSV_COLUMNS = (
    "dataset", "task", "model", "metric", "params", "baseline", "value", "std", "n_seeds", "values",
    "ci95_low", "ci95_high", "bootstrap_ci95_low", "bootstrap_ci95_high", "difference_vs_baseline",
    "verdict", "test", "p_value", "difference_ci95_low", "difference_ci95_high", "random_value", "bio_floor",
    "higher_is_better",
)
#: What the marks mean, for every export.
LEGEND = ("▲/▼: better/worse than the baseline by the test in the footnote (stochastic metrics: a paired "
          "t-test over ≥ 3 seeds, p < 0.05; deterministic per-cell means: bootstrap 95% CIs over cells; "
          "other deterministic metrics are not tested); ↓: lower is better; aggregates show the random "
          "embedding's value, and ⚠ bio near chance marks a model whose kNN label accuracy is near chance.")
#: The ``dataset`` cell of the rows testing a model across datasets.
ACROSS = "across datasets"


#: First characters that make a spreadsheet read a cell as a formula (OWASP CSV
#: injection), with their full-width forms, which some spreadsheets accept too.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")


def _num(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else repr(float(v))


def csv_text(value: object) -> str:
    """A text cell from a record (names, parameters, errors) made inert for spreadsheets
    and terminals: one that starts like a formula gets a leading ``'``; control
    characters other than line breaks are shown escaped (:func:`~czb.core.terminal.printable`).
    Numbers czb computed are written with :func:`_num` and never pass through here."""
    # A lone CR is not quoted by the csv module (its line ends are LF) but ends a row in
    # spreadsheets: make it a LF, which is quoted.
    text = "" if value is None else str(value).replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(map(printable, text.split("\n")))
    # Some spreadsheets skip leading spaces before reading a formula.
    return "'" + text if text.lstrip(" ").startswith(FORMULA_STARTS) else text


def to_csv(comparison: Comparison) -> str:
    """Long format: one row per (dataset, task, model, metric), raw values, the decision
    against the baseline with its ``test``; failed and not-applicable runs as rows with
    their status in ``verdict`` and no value; then a row per model and metric tested
    across datasets (``dataset``: ``across datasets: a, b, ...``, ``values``: the
    per-dataset differences, ``difference_vs_baseline``: their median)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def row(**cells: object) -> list[object]:
        return [cells.get(name, "") for name in CSV_COLUMNS]

    for c in comparison.columns:
        for model in comparison.models[c.dataset]:
            e = c.entries.get(model)
            if e is None:
                continue
            random = c.random_text()
            floor = comparison.floor_note(c.dataset, c.task, model) if c.aggregate else ""
            flag = comparison.floor_flag(c.dataset, c.task, model)
            writer.writerow(row(
                dataset=csv_text(c.dataset), task=csv_text(c.task), model=csv_text(model), metric=csv_text(c.metric),
                params=csv_text(json.dumps(c.params, sort_keys=True)), baseline=csv_text(c.baseline),
                value=_num(e.value), std=_num(e.std), n_seeds=len(e.values), values=" ".join(_num(v) for v in e.values),
                ci95_low=_num(e.ci95[0]) if e.ci95 else "", ci95_high=_num(e.ci95[1]) if e.ci95 else "",
                bootstrap_ci95_low=_num(e.bootstrap.ci95[0]) if e.bootstrap else "",
                bootstrap_ci95_high=_num(e.bootstrap.ci95[1]) if e.bootstrap else "",
                difference_vs_baseline=_num(e.difference), verdict=e.verdict, test=csv_text(e.test),
                p_value=_num(e.p_value),
                difference_ci95_low=_num(e.difference_ci95[0]) if e.difference_ci95 else "",
                difference_ci95_high=_num(e.difference_ci95[1]) if e.difference_ci95 else "",
                random_value=random.removeprefix("random ") if random else "",
                bio_floor=csv_text(f"{'near chance' if flag else 'above chance'}: {floor}" if floor else ""),
                higher_is_better="" if c.higher_is_better is None else str(c.higher_is_better).lower(),
            ))
    for model, r in comparison.problems:
        writer.writerow(row(dataset=csv_text(r.dataset.name), task=csv_text(r.task.name), model=csv_text(model),
                            n_seeds=0, verdict=csv_text(f"{r.status}: {r.error or ''}")))
    for a in across_datasets(comparison):
        writer.writerow(row(
            dataset=csv_text(f"{ACROSS}: {', '.join(a.differences)}"), task=csv_text(a.task), model=csv_text(a.model),
            metric=csv_text(a.metric), params=csv_text(json.dumps(a.params, sort_keys=True)),
            baseline=csv_text(a.baseline), values=" ".join(_num(v) for v in a.differences.values()),
            difference_vs_baseline=_num(a.median), verdict=a.decision.verdict, test=csv_text(a.decision.test),
            p_value=_num(a.decision.p_value),
        ))
    return out.getvalue()


def _cell(comparison: Comparison, column: Column, model: str, tests: list[str]) -> str:
    e = column.entries.get(model)
    if e is None:
        return "—"
    text = "n/a" if e.value is None else f"{e.value:.4f}"
    if e.std is not None:
        text += f" ± {e.std:.4f}"
    mark = VERDICT_MARKS[e.verdict]
    text += f" {mark}{footnote(tests.index(e.test) + 1)}" if mark else ""
    flag = comparison.floor_flag(column.dataset, column.task, model) if column.aggregate else ""
    return text + (f" {flag}" if flag else "")


def _rows(comparison: Comparison, dataset: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Metrics as rows, models as columns (long metric lists stay readable in a terminal),
    and the tests whose footnotes the marks carry."""
    models = comparison.models[dataset]
    columns = comparison.columns_of(dataset)
    tests = marked_tests(columns)
    header = ["task", "metric", *models]
    rows = [[c.task, c.label + (" ↓" if c.higher_is_better is False else "")
             + (f" ({c.random_text()})" if c.aggregate else ""),
             *(_cell(comparison, c, model, tests) for model in models)]
            for c in columns]
    return header, rows, tests


def _notes(tests: list[str]) -> list[str]:
    return [f"{footnote(i)} {test}" for i, test in enumerate(tests, 1)]


def _across_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    header = ["task", "metric", "model", "baseline", "datasets", "median Δ", "above/below", "p", "test"]
    rows = []
    for a in across_datasets(comparison):
        mark = VERDICT_MARKS[a.decision.verdict]
        above, below = a.counts
        p = "" if a.decision.p_value is None else f"{a.decision.p_value:.3g}"
        rows.append([a.task, a.label, a.model, a.baseline, str(len(a.differences)),
                     f"{a.median:+.4f}" + (f" {mark}" if mark else ""), f"{above}/{below}", p, a.decision.test])
    return header, rows


def markdown_text(text: object) -> str:
    """Text from a record as one inert Markdown table cell: lines joined, control
    characters shown escaped (:func:`~czb.core.terminal.printable`), HTML special characters
    as entities, table pipes, backticks, brackets and backslashes escaped."""
    text = printable("" if text is None else text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in ("\\", "`", "|", "[", "]", "*"):
        text = text.replace(char, "\\" + char)
    return text


def to_markdown(comparison: Comparison) -> str:
    """One Markdown table per dataset (metrics × models), then the failed runs; every
    text from a record is escaped (:func:`markdown_text`)."""
    escape = markdown_text

    parts = [f"Mean ± sd over seeds; {LEGEND}\n"]
    for dataset in comparison.models:
        if not comparison.columns_of(dataset):
            continue
        header, rows, tests = _rows(comparison, dataset)
        parts.append(f"## {escape(dataset)}\n")
        parts.append("| " + " | ".join(map(escape, header)) + " |")
        parts.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
        parts += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
        parts.append("")
        parts += [escape(note) + "  " for note in _notes(tests)]
        parts.append("")
    header, rows = _across_rows(comparison)
    if rows:
        parts.append("## Across datasets\n")
        parts.append("Per model and metric, the per-dataset differences from the baseline, tested together.\n")
        parts.append("| " + " | ".join(header) + " |")
        parts.append("|" + "|".join(["---"] * 4 + ["---:"] * 4 + ["---"]) + "|")
        parts += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
        parts.append("")
    if comparison.problems:
        parts.append("## Failed and not-applicable runs\n")
        parts.append("| dataset | model | task | status | reason |\n|---|---|---|---|---|")
        parts += [f"| {escape(r.dataset.name)} | {escape(m)} | {escape(r.task.name)} | {r.status} | "
                  f"{escape(r.error or '')} |" for m, r in comparison.problems]
        parts.append("")
    return "\n".join(parts)


def print_table(comparison: Comparison, console=None) -> None:
    """Terminal summary (rich): per dataset, metrics × models, then failed runs; every
    text from a record is shown as it is (no markup, no control characters:
    :func:`~czb.core.terminal.printable`)."""
    from rich.console import Console
    from rich.markup import escape as escape_markup
    from rich.table import Table

    def escape(text: object) -> str:
        return escape_markup(printable(text).strip())

    console = console or Console()
    for dataset in comparison.models:
        if not comparison.columns_of(dataset):
            continue
        header, rows, tests = _rows(comparison, dataset)
        table = Table(title=f"{escape(dataset)} (mean ± sd; ▲/▼ vs baseline by the test in the footnote)",
                      caption="\n".join(map(escape, _notes(tests))) or None)
        for i, name in enumerate(header):
            table.add_column(escape(name), justify="left" if i < 2 else "right")
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    header, rows = _across_rows(comparison)
    if rows:
        table = Table(title="across datasets: per-dataset differences from the baseline, tested together")
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*map(escape, row))
        console.print(table)
    if comparison.problems:
        table = Table(title="failed and not-applicable runs")
        for name in ("dataset", "model", "task", "status", "reason"):
            table.add_column(name)
        for model, r in comparison.problems:
            table.add_row(escape(r.dataset.name), escape(model), escape(r.task.name), r.status, escape(r.error or ""))
        console.print(table)
