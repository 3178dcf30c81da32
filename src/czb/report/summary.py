"""Summary tables of result records, for the terminal (``czb run``) and the report.

The one summary so far is the perturbation-analysis table: :func:`hierarchy_table`
lays results out as Table 2 of Bendidi et al. (2024): one row per task metric (per
database for recall), one column per model, each cell the best value over the
post-processings with the post-processing that gave it, and the best model of each
row marked; :func:`hierarchy_grid` gives it as a grid for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from czb.core import records as R
from czb.evaluation.registry import METRICS, load_all

#: Rows of the table, in the paper's order (task, metric).
HIERARCHY_ROWS: tuple[tuple[str, str], ...] = (
    ("perturbation_ilisi", "ilisi_mean_normalized"),
    ("perturbation_linear_probe", "linear_probe_top1"),
    ("perturbation_linear_probe", "linear_probe_top5"),
    ("perturbation_consistency", "perturbation_consistency"),
    ("perturbation_knn", "knn_top1"),
    ("perturbation_knn", "knn_top5"),
    ("perturbation_recall", "relationship_recall"),
    ("perturbation_recall", "relationship_map"),
    ("perturbation_reconstruction", "reconstruction_spearman"),
    ("perturbation_reconstruction", "structural_integrity"),
)


@dataclass
class Cell:
    """The best value of one metric for one model, over post-processings."""

    value: float
    std: float | None
    postprocessing: str
    every: dict[str, float] = field(default_factory=dict)


@dataclass
class HierarchyRow:
    dataset: str
    task: str
    metric: str
    source: str | None
    higher_is_better: bool
    cells: dict[str, Cell]
    best_model: str | None

    @property
    def label(self) -> str:
        return self.metric + (f" [{self.source}]" if self.source else "")


def hierarchy_table(records: Sequence[R.ResultRecord]) -> list[HierarchyRow]:
    """Rows of the hierarchy table for every dataset with hierarchy results (ok records only)."""
    load_all()
    wanted = {metric: task for task, metric in HIERARCHY_ROWS}
    groups: dict[tuple, dict[str, dict[str, R.MetricRecord]]] = {}
    for r in records:
        if r.status != "ok" or r.task.implementation not in wanted.values():
            continue
        for m in r.metrics:
            if wanted.get(m.name) != r.task.implementation or "postprocessing" not in m.params:
                continue
            key = (r.dataset.name, r.task.implementation, m.name, m.params.get("source"))
            groups.setdefault(key, {}).setdefault(r.model.name, {})[m.params["postprocessing"]] = m
    order = {metric: i for i, (_, metric) in enumerate(HIERARCHY_ROWS)}
    rows = []
    for (dataset, task, metric, source), by_model in sorted(
            groups.items(), key=lambda kv: (kv[0][0], order[kv[0][2]], kv[0][3] or "")):
        higher = METRICS[metric].higher_is_better
        cells = {}
        for model, variants in by_model.items():
            finite = {pp: m for pp, m in variants.items() if m.value is not None and m.value == m.value}
            if not finite:
                continue
            pick = (max if higher else min)(finite, key=lambda pp: finite[pp].value)
            cells[model] = Cell(finite[pick].value, finite[pick].value_std_dev, pick,
                                {pp: m.value for pp, m in finite.items()})
        best = (max if higher else min)(cells, key=lambda m: cells[m].value) if cells else None
        rows.append(HierarchyRow(dataset, task, metric, source, higher, cells, best))
    return rows


def hierarchy_grid(records: Sequence[R.ResultRecord]) -> tuple[list[str], list[tuple[HierarchyRow, list[Cell | None], list[bool]]]]:
    """:func:`hierarchy_table` as a grid for display: the models (columns), and per row
    its cell for each model (``None``: not scored) and whether that model is the row's best
    (marked only when more than one model was scored)."""
    rows = hierarchy_table(records)
    models = list(dict.fromkeys(m for row in rows for m in row.cells))
    grid = [
        (row, [row.cells.get(m) for m in models], [m == row.best_model and len(row.cells) > 1 for m in models])
        for row in rows
    ]
    return models, grid
