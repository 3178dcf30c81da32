"""The report shows scib-metrics' Benchmarker totals (min-max scaled across the models
compared) beside the raw totals, labelled as such."""

from __future__ import annotations

import numpy as np
import pytest

from czb.evaluation.metrics import aggregate as agg
from czb.pipeline.run import run_benchmark
from czb.report.html import render_html
from czb.report.tables import SCALED, compare
from czb.specs.catalog import Catalog


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return run_benchmark(Catalog.load(), datasets=["synthetic_cells_tiny"], tasks=["batch_integration"],
                         models=["random", "harmony"], seeds=[0], output_dir=tmp_path_factory.mktemp("out"),
                         n_jobs=1)


def test_scaled_totals_are_the_benchmarkers_of_the_raw_values(records):
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    comparison = compare(records)
    scaled = {c.metric: c for c in comparison.columns if c.params == SCALED}
    assert set(scaled) == {agg.SCIB_BIO_CONSERVATION.name, agg.SCIB_BATCH_CORRECTION.name, agg.SCIB_OVERALL.name}
    raw = {r.model.name: {m.name: m.value for m in r.metrics if not m.params} for r in records}
    expected = agg.scaled_scib_totals(raw)
    for metric, column in scaled.items():
        assert set(column.entries) == {"pca", "random", "harmony"}
        for model, entry in column.entries.items():
            assert entry.value == pytest.approx(expected[model][metric], abs=1e-12)
            assert entry.verdict == "unknown" and "scaled" in entry.test
    # Scaled, the models span [0, 1] on each metric: the best total is at most 1.
    overall = [e.value for e in scaled[agg.SCIB_OVERALL.name].entries.values()]
    assert max(overall) <= 1 and min(overall) >= 0 and np.ptp(overall) > 0
    # The raw totals are still there, unscaled.
    assert any(c.metric == agg.SCIB_OVERALL.name and not c.params for c in comparison.columns)


def test_report_labels_the_scaled_totals(records):
    html = render_html(compare(records))
    assert "scib_overall [min-max over the models compared]" in html


def test_one_model_has_no_scaled_totals(records):
    only = [r for r in records if r.model.name == "pca"]
    assert not [c for c in compare(only).columns if c.params == SCALED]
