"""Tables of ``czb run`` and ``czb list`` that fit the terminal, 80 columns included.

Nothing is cut: long names wrap (at spaces, else folded), numbers keep their columns.
Tables have no lines, so their columns get all the width; on a terminal headers are bold
and statuses coloured; piped or redirected (not a TTY) they are plain text at ``COLUMNS``
or 80 columns (:func:`czb.cli.common._console`).

``czb run`` prints, per dataset and task, one row per model with the task's headline
metric (:func:`headline_metric`); ``--wide`` prints every metric. The
perturbation-analysis hierarchy is split into as many tables as its model columns need.
Imported inside commands only: it imports rich.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from czb.cli.common import _console, _one_line

#: Style of a record's status on a terminal (no colour when piped).
STATUS_STYLES = {"ok": "green", "failed": "bold red", "not_applicable": "yellow"}
#: Width of the tables when stdout is not a terminal and ``COLUMNS`` is not set.
PIPED_WIDTH = 80
#: Spaces before a dataset's tasks, and before a task's table.
TASK_INDENT, TABLE_INDENT = 2, 4


def fit_widths(headers: Sequence[str], rows: Sequence[Sequence[Text]], *, whole: Iterable[str] = (),
               room: int, gap: int = 2, header: bool = True) -> list[int] | None:
    """Widths of the columns of a table that fits ``room`` columns (``gap`` between two)
    with no word folded and no ``whole`` cell wrapped: the widest columns narrowed to a
    common width, none below its longest word; ``None`` when even that does not fit."""
    from rich.cells import cell_len

    whole = set(whole)
    most, least = [], []
    for i, name in enumerate(headers):
        lines = [name if header else "", *(line for row in rows for line in row[i].plain.split("\n"))]
        most.append(max(map(cell_len, lines)))
        words = lines if name in whole else [w for line in lines for w in line.split()]
        least.append(max(map(cell_len, words), default=1))
    room -= gap * (len(headers) - 1)
    if sum(least) > room:
        return None

    def widths(level: int) -> list[int]:
        return [min(m, max(lo, level)) for m, lo in zip(most, least)]

    low, high = 0, max(most)  # the widest level that fits: sum(widths(level)) grows with level
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if sum(widths(mid)) <= room else (low, mid - 1)
    return widths(low)


def print_table(console, headers: Sequence[str], rows: Sequence[Sequence[Text]], *, numeric: Iterable[str] = (),
                whole: Iterable[str] = (), indent: int = 0, header: bool = True) -> None:
    """Print a table that wraps cells, never cuts them (:func:`fit_widths`; words folded
    only where no layout fits), without lines (bold headers on a terminal), ``indent``
    spaces in. ``numeric`` columns are right-aligned."""
    numeric = set(numeric)
    widths = fit_widths(headers, rows, whole=whole, room=console.width - indent, header=header)
    table = Table(box=None, pad_edge=False, header_style="bold underline", show_header=header)
    for i, name in enumerate(headers):
        table.add_column(name, justify="right" if name in numeric else "left", overflow="fold",
                         width=None if widths is None else widths[i])
    for row in rows:
        table.add_row(*row)
    show(console, indented(table, indent))


def show(console, renderable) -> None:
    """Print ``renderable``; piped, without the spaces rich pads lines with."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    console.out("\n".join(line.rstrip() for line in captured.get().splitlines()), highlight=False)


def text(value: object, style: str = "") -> Text:
    """A cell or line: one printable line (:func:`_one_line`), never read as markup."""
    return Text(_one_line(value), style=style)


def indented(renderable, spaces: int) -> Padding:
    """``renderable`` after ``spaces`` spaces, with no trailing spaces added."""
    return Padding(renderable, (0, 0, 0, spaces), expand=False)


def headline_metric(records: Sequence) -> str | None:
    """The label (:func:`~czb.report.tables.metric_label`) of the metric a compact table
    shows for records of one task: the task's headline
    (:attr:`~czb.evaluation.registry.TaskInfo.headline_metric`), else the first metric it
    lists that an ok record reports, in its first variant (e.g. the first classifier);
    the record's first metric for a task the registry does not know. ``None`` when no
    record has metrics."""
    from czb.core.errors import CzbError
    from czb.evaluation.registry import get_task
    from czb.report.tables import metric_label

    scored = [r for r in records if r.status == "ok" and r.metrics]
    if not scored:
        return None
    try:
        info = get_task(scored[0].task.implementation).info
        listed = (info.headline_metric, *info.metrics)
    except CzbError:
        listed = ()
    for name in (*listed, scored[0].metrics[0].name):
        for r in scored:
            for m in r.metrics:
                if m.name == name:
                    return metric_label(m.name, m.params)
    return None


def value_text(m) -> str:
    """``mean ± sd`` of a metric record (the mean alone for one seed; ``n/a`` when not finite)."""
    if m is None or m.value is None:
        return "n/a"
    return f"{m.value:.4f}" + ("" if m.value_std_dev is None else f" ± {m.value_std_dev:.4f}")


def print_results(records: Sequence, *, wide: bool = False) -> None:
    """Print run results per dataset and task: a row per model with the task's headline
    metric, or with ``wide`` a row per model and metric; Δ is the difference from the
    baseline (:func:`czb.pipeline.baselines.baseline_differences`), ▲/▼ beside it when
    the report's test marks it (:func:`czb.report.tables.compare`). A record that did not
    score gets its status, and its reason on wrapped lines below the table."""
    from czb.pipeline.baselines import baseline_differences
    from czb.report.tables import VERDICT_MARKS, compare, metric_label

    console = _console(piped_width=PIPED_WIDTH)
    diffs = baseline_differences(records)
    comparison = compare(records)
    marks = {(c.dataset, c.task, c.metric, repr(sorted(c.params.items())), model): VERDICT_MARKS[e.verdict]
             for c in comparison.columns for model, e in c.entries.items()}
    shown = "every metric" if wide else "each task's headline metric"
    console.print(text(f"czb results: {shown}, mean ± sd over seeds" + ("" if wide else " (--wide: all)")))
    console.print(text("Δ = model - pca (perturbation: control_mean); ▲/▼: by a test (see czb report)"))
    groups: dict[str, dict[str, list]] = {}
    for r in records:
        groups.setdefault(r.dataset.name, {}).setdefault(r.task.name, []).append(r)
    for dataset, tasks in groups.items():
        console.print()
        console.print(text(dataset, "bold"))
        for task, group in tasks.items():
            headline = None if wide else headline_metric(group)
            title = task if headline is None else f"{task}: {headline}"
            console.print(indented(text(title, "bold cyan"), TASK_INDENT))
            headers = ["model", "metric", "value", "Δ", "status"] if wide else ["model", "value", "Δ", "status"]
            rows = []
            for r in group:
                status = text(r.status, STATUS_STYLES.get(r.status, ""))
                model = text(r.model.name)
                metrics = [m for m in r.metrics
                           if wide or metric_label(m.name, m.params) == headline] if r.status == "ok" else []
                if not metrics:
                    empty = text("n/a" if r.status == "ok" else "")
                    rows.append([model, *([text("")] if wide else []), empty, text(""), status])
                for m in metrics[: None if wide else 1]:
                    key = (r.dataset.name, r.task.name, m.name,
                           tuple(sorted((k, str(v)) for k, v in m.params.items())), r.model.name)
                    d = diffs.get(key)
                    mark = marks.get((r.dataset.name, r.task.name, m.name, repr(sorted(m.params.items())),
                                      comparison.model_of(r)), "")
                    label = [text(metric_label(m.name, m.params))] if wide else []
                    delta = "" if d is None else f"{d:+.4f}" + (f" {mark}" if mark else "")
                    rows.append([model, *label, text(value_text(m)), text(delta), status])
            print_table(console, headers, rows, numeric=("value", "Δ"), whole=("value", "Δ", "status"),
                        indent=TABLE_INDENT)
            reasons: dict[tuple[str, str], list[str]] = {}
            for r in group:
                if r.status != "ok":
                    reasons.setdefault((r.status, r.error or "no reason recorded"), []).append(r.model.name)
            for (status, error), models in reasons.items():
                line = text(f"{', '.join(models)} {status}: {error}", STATUS_STYLES.get(status, ""))
                show(console, indented(line, TABLE_INDENT + 2))


def column_chunks(first: int, others: Sequence[int], room: int, gap: int = 2) -> list[list[int]]:
    """Indices of ``others`` in runs that fit ``room`` columns beside a first column of
    width ``first`` (``gap``: the space between two columns); a column too wide for any
    run gets one of its own (and wraps)."""
    chunks: list[list[int]] = []
    used = first
    for i, width in enumerate(others):
        if chunks and used + gap + width <= room:
            chunks[-1].append(i)
            used += gap + width
        else:
            chunks.append([i])
            used = first + gap + width
    return chunks


def print_hierarchy(records: Sequence) -> None:
    """Table 2 of Bendidi et al. (2024): best post-processing per model and metric, per
    dataset; models beyond the width go to further tables below."""
    from rich.cells import cell_len

    from czb.report.summary import hierarchy_grid

    models, grid = hierarchy_grid(records)
    if not grid:
        return
    console = _console(piped_width=PIPED_WIDTH)
    console.print()
    console.print(text("perturbation-analysis hierarchy: best post-processing per model"))
    console.print(text("(* best model of the row; ↓ lower is better)"))
    datasets: dict[str, list] = {}
    for row, cells, best in grid:
        label = row.label + ("" if row.higher_is_better else " ↓")
        shown = ["" if cell is None else f"{cell.value:.3f} ({cell.postprocessing})" + (" *" if is_best else "")
                 for cell, is_best in zip(cells, best)]
        datasets.setdefault(row.dataset, []).append((label, shown, best))
    for dataset, rows in datasets.items():
        console.print()
        console.print(indented(text(dataset, "bold"), TASK_INDENT))
        first = max(cell_len("metric"), *(cell_len(_one_line(label)) for label, _, _ in rows))
        widths = [max(cell_len(_one_line(m)), *(cell_len(shown[i]) for _, shown, _ in rows))
                  for i, m in enumerate(models)]
        for n, chunk in enumerate(column_chunks(first, widths, console.width - TABLE_INDENT)):
            if n:
                console.print()
            cells = [[text(label), *(text(shown[i], "bold" if best[i] else "") for i in chunk)]
                     for label, shown, best in rows]
            print_table(console, ["metric", *(_one_line(models[i]) for i in chunk)], cells, indent=TABLE_INDENT)


def print_listing(title: str, rows: Sequence[dict], *, whole: Iterable[str] = (), note: str = "") -> None:
    """``czb list``'s table: a column per key of ``rows`` (``whole`` ones do not wrap); a
    cell that is a list of strings shows one per line. Too many columns for the width
    (a word would be folded): one block of ``field value`` lines per row instead."""
    console = _console(piped_width=PIPED_WIDTH)
    console.print(text(title, "bold"))
    headers = list(rows[0]) if rows else ["name"]
    cells = [[Text("\n").join(map(text, v)) if isinstance(v, list) else text(v) for v in row.values()]
             for row in rows]
    if fit_widths(headers, cells, whole=whole, room=console.width) is not None:
        print_table(console, headers, cells, whole=whole)
    else:
        for row, shown in zip(rows, cells):
            fields = [[text(k, "bold"), v] for k, v in zip(headers[1:], shown[1:]) if v.plain]
            console.print(shown[0], style="bold")
            print_table(console, ["field", "value"], fields, whole=("field",), indent=TASK_INDENT, header=False)
    if note:
        show(console, text(note))
