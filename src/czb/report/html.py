"""The HTML report: one self-contained file (inline CSS and SVG, no network, no script)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

import czb
from czb.core import records as R
from czb.evaluation.metrics.bio_floor import NEAR_CHANCE
from czb.report import plots
from czb.report.plots import escape
from czb.report.significance import ALPHA, MIN_SEEDS
from czb.report.suite import across_datasets
from czb.report.tables import (
    SCALED,
    VERDICT_MARKS,
    Column,
    Comparison,
    Entry,
    footnote,
    marked_tests,
)

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; } td.model, th.model { text-align: left; white-space: nowrap; }
tr.baseline td { background: #f7f7f7; } td.best { font-weight: bold; }
.better { color: #0a7a32; } .worse { color: #b3261e; } .sd, .ci, .note { color: #666; font-size: .85em; }
.missing { color: #999; font-style: italic; } .plots { display: flex; flex-wrap: wrap; gap: 12px; }
.plot-title { font-size: 12px; font-weight: bold; } .bar-label, .bar-value, .tick, .legend { font-size: 11px; }
.axis { stroke: #999; } .error-bar { stroke: #222; stroke-width: 1.5; }
.baseline-line { stroke: #444; stroke-dasharray: 4 3; } details { margin: .5em 0; }
code { background: #f4f4f4; padding: 0 3px; } .table-wrap { overflow-x: auto; } th.task { text-align: left; }
.floor { color: #b36b00; font-size: .85em; white-space: nowrap; } .random { color: #666; font-weight: normal; }
ol.tests { color: #444; font-size: .9em; }
"""


@dataclass
class EmbeddingMap:
    """2-D coordinates of an embedding's sampled cells, with their labels and batches."""

    coordinates: np.ndarray
    labels: np.ndarray | None
    batches: np.ndarray | None
    n_cells: int


def _number(v: float | None) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _decision_text(column: Column, entry: Entry) -> str:
    """The comparison with the baseline in words, for a cell's tooltip."""
    text = f"Δ vs {column.baseline} = {entry.difference:+.4f}; {entry.test}"
    if entry.p_value is not None:
        text += f"; p = {entry.p_value:.3g}"
    if entry.difference_ci95 is not None:
        text += f"; 95% CI of Δ [{entry.difference_ci95[0]:+.4f}, {entry.difference_ci95[1]:+.4f}]"
    return text


def _entry_cell(comparison: Comparison, column: Column, model: str, entry: Entry | None, best: str | None,
                tests: list[str]) -> str:
    if entry is None:
        return '<td class="missing">—</td>'
    text = _number(entry.value)
    if entry.std is not None:
        text += f' <span class="sd">± {entry.std:.4f}</span>'
    elif entry.ci95 is not None:
        text += f' <span class="ci">[{entry.ci95[0]:.4f}, {entry.ci95[1]:.4f}]</span>'
    mark, title = VERDICT_MARKS[entry.verdict], []
    if entry.difference is not None:
        title.append(_decision_text(column, entry))
    if mark:
        text += f' <span class="{entry.verdict}">{mark}<sup>{footnote(tests.index(entry.test) + 1)}</sup></span>'
    if column.aggregate:
        floor = comparison.floor_note(column.dataset, column.task, model)
        flag = comparison.floor_flag(column.dataset, column.task, model)
        if flag:
            text += f' <span class="floor">{escape(flag)}</span>'
        title += [t for t in (column.random_text(), floor) if t]
    tooltip = f' title="{escape("; ".join(title))}"' if title else ""
    classes = "best" if model == best else ""
    values = " ".join(_number(v) for v in entry.values)
    return f'<td class="{classes}" data-model="{escape(model)}" data-values="{values}"{tooltip}>{text}</td>'


def _tests_list(tests: list[str]) -> str:
    """The footnotes of the marks: which test made them."""
    if not tests:
        return '<p class="note">No difference from the baseline is marked.</p>'
    items = "".join(f'<li value="{i}">{escape(t)}</li>' for i, t in enumerate(tests, 1))
    return f'<ol class="tests">{items}</ol>'


def _summary_table(comparison: Comparison, dataset: str) -> str:
    models = comparison.models[dataset]
    by_task = {task: comparison.columns_of(dataset, task) for task in comparison.tasks(dataset)}
    columns = [c for cols in by_task.values() for c in cols]
    best = [c.best() for c in columns]
    tests = marked_tests(columns)
    head1 = ['<th class="model" rowspan="2">model</th>']
    head2 = []
    for task, cols in by_task.items():
        head1.append(f'<th class="task" colspan="{len(cols)}">{escape(task)}</th>')
        head2 += [f'<th title="{escape(c.metric)}">{escape(c.label)}{"" if c.higher_is_better is not False else " ↓"}'
                  + (f'<br><span class="random">{escape(c.random_text())}</span>' if c.aggregate else "")
                  + "</th>" for c in cols]
    head1.append('<th rowspan="2">embedding s</th><th rowspan="2">scoring s</th><th rowspan="2">peak MB</th>')
    rows = []
    baselines = {c.baseline for c in columns}
    for model in models:
        cells = [f'<td class="model">{escape(model)}</td>']
        cells += [_entry_cell(comparison, c, model, c.entries.get(model), b, tests) for c, b in zip(columns, best)]
        usage = [u for (d, m, _), u in comparison.usage.items() if d == dataset and m == model]
        if usage:
            cells.append(f"<td>{max(u.embedding_runtime_s for u in usage):.1f}</td>"
                         f"<td>{sum(u.runtime_s for u in usage):.1f}</td>"
                         f"<td>{max(u.peak_memory_mb for u in usage):.0f}</td>")
        else:
            cells.append('<td class="missing" colspan="3">not run</td>')
        css = ' class="baseline"' if model in baselines else ""
        rows.append(f'<tr{css} data-model="{escape(model)}">{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table class="summary" data-dataset="{escape(dataset)}"><thead>'
            f'<tr>{"".join(head1)}</tr><tr>{"".join(head2)}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            + _tests_list(tests))


def _across_datasets(comparison: Comparison) -> str:
    """Per model and metric, the per-dataset differences from the baseline tested together."""
    rows = across_datasets(comparison)
    if not rows:
        return ""
    body = []
    for a in rows:
        mark = VERDICT_MARKS[a.decision.verdict]
        above, below = a.counts
        each = ", ".join(f"{d} {v:+.4f}" for d, v in a.differences.items())
        p = "" if a.decision.p_value is None else f"{a.decision.p_value:.3g}"
        body.append(
            f'<tr data-model="{escape(a.model)}"><td class="model">{escape(a.task)}</td>'
            f'<td class="model">{escape(a.label)}</td><td class="model">{escape(a.model)}</td>'
            f'<td class="model">{escape(a.baseline)}</td><td>{len(a.differences)}</td>'
            f'<td title="{escape(each)}">{a.median:+.4f}'
            + (f' <span class="{a.decision.verdict}">{mark}</span>' if mark else "")
            + f'</td><td>{above}/{below}</td><td>{p}</td><td class="model">{escape(a.decision.test)}</td></tr>')
    return ("<h2>Across datasets</h2><p>Per model and metric, its difference from the baseline on each dataset "
            "(the mean over seeds of each), tested together by a two-sided Wilcoxon signed-rank test: ▲/▼ at "
            "p &lt; 0.05; it needs six datasets to reach that. Hover the median for every dataset's difference.</p>"
            '<div class="table-wrap"><table class="across"><thead><tr><th class="model">task</th>'
            '<th class="model">metric</th><th class="model">model</th><th class="model">baseline</th>'
            "<th>datasets</th><th>median Δ</th><th>above/below</th><th>p</th><th class=\"model\">test</th></tr>"
            f'</thead><tbody>{"".join(body)}</tbody></table></div>')


def scaled_scores(comparison: Comparison, dataset: str) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """scIB-style view: each metric min-max scaled over the models (1 = best, 0 = worst),
    a task's score the unweighted mean of its metrics' scaled values, and ``overall``
    the unweighted mean of the task scores.

    Returns
    -------
    The task names, and per model ``{task or "overall": score}``.
    """
    tasks = comparison.tasks(dataset)
    out: dict[str, dict[str, float | None]] = {m: {} for m in comparison.models[dataset]}
    for task in tasks:
        per_model: dict[str, list[float]] = {m: [] for m in out}
        for c in comparison.columns_of(dataset, task):
            values = {m: e.value for m, e in c.entries.items() if e.value is not None and math.isfinite(e.value)}
            if len(values) < 2 or c.higher_is_better is None or c.params == SCALED:  # scaled already
                continue
            lo, hi = min(values.values()), max(values.values())
            for m, v in values.items():
                scaled = 0.5 if hi == lo else (v - lo) / (hi - lo)
                per_model[m].append(scaled if c.higher_is_better else 1.0 - scaled)
        for m, scaled in per_model.items():
            out[m][task] = float(np.mean(scaled)) if scaled else None
    for m, scores in out.items():
        finite = [s for s in scores.values() if s is not None]
        scores["overall"] = float(np.mean(finite)) if finite else None
    return tasks, out


def _scaled_table(comparison: Comparison, dataset: str) -> str:
    tasks, scores = scaled_scores(comparison, dataset)
    head = "".join(f"<th>{escape(t)}</th>" for t in tasks)
    rows = "".join(
        f'<tr data-model="{escape(m)}"><td class="model">{escape(m)}</td>'
        + "".join(f"<td>{_number(s.get(t))}</td>" for t in [*tasks, "overall"]) + "</tr>"
        for m, s in sorted(scores.items(), key=lambda kv: -(kv[1]["overall"] or -1.0))
    )
    return (f'<div class="table-wrap"><table class="scaled"><thead><tr><th class="model">model</th>{head}'
            f"<th>overall</th></tr></thead><tbody>{rows}</tbody></table></div>")


def _bar_charts(comparison: Comparison, dataset: str) -> str:
    charts = []
    for i, c in enumerate(comparison.columns_of(dataset)):
        bars = []
        for model in comparison.models[dataset]:
            e = c.entries.get(model)
            if e is None:
                continue
            error = e.std if e.std is not None else (None if e.ci95 is None else (e.ci95[1] - e.ci95[0]) / 2)
            bars.append((model, e.value, error))
        if bars:
            charts.append(plots.bar_chart(f"{c.task}: {c.label}", bars, baseline=c.baseline,
                                          higher_is_better=c.higher_is_better, plot_id=f"bar-{dataset}-{i}"))
    return f'<div class="plots">{"".join(charts)}</div>'


def _maps(maps: Mapping[tuple[str, str], EmbeddingMap], dataset: str, models: list[str],
          notes: Mapping[tuple[str, str], str] | None = None) -> str:
    figures = []
    skipped = "".join(f"<li>{escape(model)}: map not shown, {escape(notes[(dataset, model)])}.</li>"
                      for model in models if notes and (dataset, model) in notes)
    skipped = f'<ul class="note">{skipped}</ul>' if skipped else ""
    for model in models:
        m = maps.get((dataset, model))
        if m is None:
            continue
        for what, groups in (("label", m.labels), ("batch", m.batches)):
            if groups is not None:
                figures.append(plots.scatter_map(f"{model} — {what} ({len(m.coordinates)} of {m.n_cells} cells)",
                                                 m.coordinates, groups, plot_id=f"map-{dataset}-{model}-{what}"))
    if not figures:
        return ('<p class="note">No embedding samples were found next to these results (runs without --output-dir).'
                f"</p>{skipped}")
    return f'<div class="plots">{"".join(figures)}</div>{skipped}'


def _hierarchy(records: list[R.ResultRecord]) -> str:
    from czb.report.summary import hierarchy_grid

    models, grid = hierarchy_grid(records)
    if not grid:
        return ""
    head = "".join(f"<th>{escape(m)}</th>" for m in models)
    body = []
    for row, cells, best in grid:
        html_cells = []
        for cell, is_best in zip(cells, best):
            if cell is None:
                html_cells.append('<td class="missing">—</td>')
                continue
            every = ", ".join(f"{pp} {v:.3f}" for pp, v in sorted(cell.every.items()))
            html_cells.append(f'<td class="{"best" if is_best else ""}" title="every post-processing: '
                              f'{escape(every)}">{cell.value:.3f} <span class="note">({escape(cell.postprocessing)})'
                              f'</span><details><summary class="note">all</summary>{escape(every)}</details></td>')
        arrow = "" if row.higher_is_better else " ↓"
        body.append(f'<tr><td class="model">{escape(row.dataset)}</td><td class="model">{escape(row.label)}{arrow}'
                    f'</td>{"".join(html_cells)}</tr>')
    return ("<h2>Perturbation-analysis hierarchy</h2><p>As Table 2 of Bendidi et al. (2024): per model the best "
            "value over post-processings (in brackets), bold the best model of each row; every variant under "
            "“all”.</p>"
            f'<table class="hierarchy"><thead><tr><th class="model">dataset</th><th class="model">metric</th>{head}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _problems(comparison: Comparison) -> str:
    if not comparison.problems and not comparison.missing_baselines:
        return "<h2>Failed and not-applicable runs</h2><p>None.</p>"
    rows = "".join(
        f'<tr class="{escape(r.status)}"><td class="model">{escape(r.dataset.name)}</td>'
        f'<td class="model">{escape(model)}</td><td class="model">{escape(r.task.name)}</td>'
        f'<td class="model">{escape(r.status)}</td><td class="model">{escape(r.error or "")}</td></tr>'
        for model, r in comparison.problems
    )
    missing = "".join(
        f"<li>{escape(dataset)}: no results for the baseline {', '.join(map(escape, names))}; its row is shown empty"
        f"</li>" for dataset, names in comparison.missing_baselines.items()
    )
    return ("<h2>Failed and not-applicable runs</h2>"
            + (f"<ul>{missing}</ul>" if missing else "")
            + ('<table class="problems"><thead><tr><th class="model">dataset</th><th class="model">model</th>'
               '<th class="model">task</th><th class="model">status</th><th class="model">reason</th></tr></thead>'
               f"<tbody>{rows}</tbody></table>" if rows else ""))


def _provenance(comparison: Comparison, command: str) -> str:
    records = comparison.records
    versions = sorted({r.czb_version for r in records})
    created = sorted(r.created_at for r in records)
    models = {}
    for r in records:
        models.setdefault((r.model.name, r.model.kind, r.model.image_digest), None)
    datasets = {}
    for r in records:
        datasets.setdefault((r.dataset.name, r.dataset.uri, r.dataset.sha256, r.dataset.n_cells, r.dataset.n_genes),
                            None)
    commands = sorted({r.command for r in records if r.command})
    hosts = sorted({f"{r.host.platform}, Python {r.host.python}, {r.host.n_threads} threads" for r in records})
    model_rows = "".join(f'<tr><td class="model">{escape(n)}</td><td class="model">{escape(k)}</td>'
                         f'<td class="model"><code>{escape(d)}</code></td></tr>' for n, k, d in models)
    dataset_rows = "".join(f'<tr><td class="model">{escape(n)}</td><td class="model">{escape(u)}</td>'
                           f'<td class="model"><code>{escape(s or "not recorded")}</code></td><td>{c}</td><td>{g}</td>'
                           f"</tr>" for n, u, s, c, g in datasets)
    superseded = (f"<p>{len(comparison.superseded)} older result(s) of the same dataset, model and task were "
                  "replaced by newer ones.</p>" if comparison.superseded else "")
    return (
        "<h2>Provenance</h2>"
        f"<p>czb version(s) of the runs: {', '.join(map(escape, versions))}; report by czb {escape(czb.__version__)}"
        f"{f' ({escape(command)})' if command else ''}. Runs from {escape(created[0])} to {escape(created[-1])}; "
        f"{len(records)} results.</p>{superseded}"
        '<h3>Models</h3><table class="provenance"><thead><tr><th class="model">model</th><th class="model">kind</th>'
        f'<th class="model">image digest</th></tr></thead><tbody>{model_rows}</tbody></table>'
        '<h3>Datasets</h3><table class="provenance"><thead><tr><th class="model">dataset</th><th class="model">uri</th>'
        f'<th class="model">sha256</th><th>cells</th><th>genes</th></tr></thead><tbody>{dataset_rows}</tbody></table>'
        f"<h3>Commands</h3><ul>{''.join(f'<li><code>{escape(c)}</code></li>' for c in commands)}</ul>"
        f"<h3>Hosts</h3><ul>{''.join(f'<li>{escape(h)}</li>' for h in hosts)}</ul>"
    )


READING = f"""
<p><b>Reading the tables.</b> Values are raw: the mean over seeds with the standard deviation across
seeds (± sd), or for a value estimated from sampled cells its 95% confidence interval in brackets.
↓ marks a metric where lower is better; bold is the best model of a column. Every model is compared
with the baseline of its kind (PCA for embeddings, <code>control_mean</code> for perturbation
predictions), and ▲ (better) or ▼ (worse) marks a difference only when a stated test finds it: for a
metric that depends on the seed, a two-sided paired t-test over the seeds both ran, at p &lt; {ALPHA}
(with fewer than {MIN_SEEDS} seeds: no test); for a deterministic mean of per-cell values, the bootstrap
95% CIs over cells (or donors) of the two values, combined as independent (conservative: both are
scored on the same cells), when the CI of the difference excludes 0; other deterministic metrics are
not tested, only their difference shown. The footnote of each mark names its test; hover a cell for
the difference, the test and its p-value or CI.</p>
<p><b>Aggregates.</b> scIB's totals average unscaled metrics, so they can rank an embedding that keeps
no biology above one that does: a random embedding mixes batches perfectly. Beside every aggregate
the random embedding's own value is shown (<i>random not run</i> without one), and
<span class="floor">⚠ bio near chance</span> marks a model whose leave-one-out kNN label accuracy is
near chance (chance-corrected below {NEAR_CHANCE}), whatever its aggregate.</p>
<p><b>Scaled view.</b> Only a view of the raw values: each metric min-max scaled across the models of
the dataset (1 = best, 0 = worst, direction respected), a task score the unweighted mean of its
metrics, and <i>overall</i> the unweighted mean of the task scores (every task weighs the same).
Scaled scores depend on which models are compared. Batch integration's own <code>scib_overall</code>
is scIB's weighted total (0.6 bio conservation + 0.4 batch correction).</p>
"""


def render_html(comparison: Comparison, *, maps: Mapping[tuple[str, str], EmbeddingMap] | None = None,
                command: str = "", title: str = "czb report",
                notes: Mapping[tuple[str, str], str] | None = None) -> str:
    """The report as one HTML document; every text that comes from a result file is
    HTML-escaped. ``notes``: why the map of a (dataset, model) is not shown."""
    maps = maps or {}
    body = [f"<h1>{escape(title)}</h1>", READING]
    for dataset in comparison.models:
        if not comparison.columns_of(dataset) and not any(r.dataset.name == dataset for _, r in comparison.problems):
            continue
        body.append(f'<h2 id="{escape(dataset)}">Dataset {escape(dataset)}</h2>')
        if comparison.columns_of(dataset):
            body += ["<h3>Summary</h3>", _summary_table(comparison, dataset),
                     "<h3>Scaled view</h3>", _scaled_table(comparison, dataset),
                     "<h3>Metrics</h3>", _bar_charts(comparison, dataset)]
        body += ["<h3>Embeddings</h3>", _maps(maps, dataset, comparison.models[dataset], notes)]
    body += [_across_datasets(comparison), _hierarchy(comparison.records), _problems(comparison),
             _provenance(comparison, command)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")


__all__ = ["EmbeddingMap", "render_html", "scaled_scores"]
