"""Across the datasets of a suite: is a model better than the baseline on datasets in
general, not only on one? A Wilcoxon signed-rank test of its per-dataset differences
(:func:`czb.report.significance.dataset_test`), per task, metric and model."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from czb.report import significance as sig
from czb.report.tables import Comparison, metric_label


@dataclass
class AcrossDatasets:
    """One model's differences from the baseline on one metric, over the datasets
    where both were scored.

    Attributes
    ----------
    differences
        Model − baseline per dataset (means over seeds), by dataset name.
    decision
        The Wilcoxon signed-rank test of them.
    """

    task: str
    metric: str
    params: dict
    model: str
    baseline: str
    differences: dict[str, float]
    decision: sig.Decision

    @property
    def label(self) -> str:
        return metric_label(self.metric, self.params)

    @property
    def median(self) -> float:
        return statistics.median(self.differences.values())

    @property
    def counts(self) -> tuple[int, int]:
        """Datasets where the model is above, and below, the baseline."""
        d = list(self.differences.values())
        return sum(x > 0 for x in d), sum(x < 0 for x in d)


def across_datasets(comparison: Comparison) -> list[AcrossDatasets]:
    """A row per (task, metric, model, baseline) scored on two or more datasets, in the
    order of the comparison's columns; each dataset's difference is model − baseline of
    the per-dataset means."""
    groups: dict[tuple, AcrossDatasets] = {}
    higher: dict[tuple, bool | None] = {}
    for c in comparison.columns:
        base = c.entries.get(c.baseline)
        if base is None or base.value is None or not math.isfinite(base.value):
            continue
        for model, e in c.entries.items():
            if model == c.baseline or e.value is None or not math.isfinite(e.value):
                continue
            key = (c.task, c.metric, repr(sorted(c.params.items())), model, c.baseline)
            row = groups.setdefault(key, AcrossDatasets(c.task, c.metric, dict(c.params), model, c.baseline, {},
                                                        sig.no_test("")))
            row.differences[c.dataset] = e.value - base.value
            higher[key] = c.higher_is_better
    rows = [row for row in groups.values() if len(row.differences) >= 2]
    for key, row in groups.items():
        row.decision = sig.dataset_test(list(row.differences.values()), higher_is_better=higher[key])
    return rows
