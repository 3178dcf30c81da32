"""The comparison as CSV (one row per model and metric), Markdown and terminal tables."""

from __future__ import annotations

import csv
import io
import json
import math

from czb.core.terminal import printable
from czb.report.tables import VERDICT_MARKS, Column, Comparison

CSV_COLUMNS = (
    "dataset", "task", "model", "metric", "params", "baseline", "value", "std", "n_seeds", "values",
    "ci95_low", "ci95_high", "difference_vs_baseline", "spread", "verdict", "higher_is_better",
)


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
    """Long format: one row per (dataset, task, model, metric), raw values; failed and
    not-applicable runs as rows with their status in ``verdict`` and no value."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in comparison.columns:
        for model in comparison.models[c.dataset]:
            e = c.entries.get(model)
            if e is None:
                continue
            writer.writerow([
                *map(csv_text, (c.dataset, c.task, model, c.metric, json.dumps(c.params, sort_keys=True),
                                c.baseline)),
                _num(e.value), _num(e.std), len(e.values), " ".join(_num(v) for v in e.values),
                _num(e.ci95[0]) if e.ci95 else "", _num(e.ci95[1]) if e.ci95 else "",
                _num(e.difference), _num(e.spread), e.verdict,
                "" if c.higher_is_better is None else str(c.higher_is_better).lower(),
            ])
    for model, r in comparison.problems:
        writer.writerow([csv_text(r.dataset.name), csv_text(r.task.name), csv_text(model), "", "", "", "", "", 0,
                         "", "", "", "", "", csv_text(f"{r.status}: {r.error or ''}"), ""])
    return out.getvalue()


def _cell(column: Column, model: str) -> str:
    e = column.entries.get(model)
    if e is None:
        return "—"
    text = "n/a" if e.value is None else f"{e.value:.4f}"
    if e.std is not None:
        text += f" ± {e.std:.4f}"
    mark = VERDICT_MARKS[e.verdict]
    return text + (f" {mark}" if mark else "")


def _rows(comparison: Comparison, dataset: str) -> tuple[list[str], list[list[str]]]:
    """Metrics as rows, models as columns (long metric lists stay readable in a terminal)."""
    models = comparison.models[dataset]
    header = ["task", "metric", *models]
    rows = [[c.task, c.label + (" ↓" if c.higher_is_better is False else ""),
             *(_cell(c, model) for model in models)]
            for c in comparison.columns_of(dataset)]
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

    parts = ["Mean ± sd over seeds; ▲/▼: better/worse than the baseline by more than the seed-to-seed "
             "spread of the paired differences; ↓: lower is better.\n"]
    for dataset in comparison.models:
        if not comparison.columns_of(dataset):
            continue
        header, rows = _rows(comparison, dataset)
        parts.append(f"## {escape(dataset)}\n")
        parts.append("| " + " | ".join(map(escape, header)) + " |")
        parts.append("|" + "|".join(["---", "---"] + ["---:"] * (len(header) - 2)) + "|")
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
        header, rows = _rows(comparison, dataset)
        table = Table(title=f"{escape(dataset)} (mean ± sd; ▲/▼ vs baseline beyond the seed spread)")
        for i, name in enumerate(header):
            table.add_column(escape(name), justify="left" if i < 2 else "right")
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
