"""The report's marks: which test made each (paired t over seeds, bootstrap CIs over
cells, Wilcoxon over datasets), the random embedding beside every aggregate, the
bio-conservation floor flag, and records written before these fields."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import numpy as np
import pytest
from scipy import stats
from test_report import record

from czb.core import records as R
from czb.evaluation.registry import METRICS, load_all
from czb.report import exports
from czb.report import significance as sig
from czb.report.html import render_html
from czb.report.suite import across_datasets
from czb.report.tables import FLOOR_FLAG, compare

# ----------------------------------------------------------------------------- tests


def test_seed_test_is_scipys_paired_t_test():
    model, base = [0.61, 0.72, 0.64, 0.70], [0.50, 0.60, 0.58, 0.62]
    d = sig.seed_test(model, base, higher_is_better=True)
    assert d.p_value == pytest.approx(stats.ttest_rel(model, base).pvalue) and d.p_value < 0.05
    assert d.verdict == "better" and d.test == "paired t-test over 4 seeds (marks at p < 0.05)"
    assert sig.seed_test(model, base, higher_is_better=False).verdict == "worse"
    assert sig.seed_test(model, base, higher_is_better=None).verdict == "unknown"
    # |mean difference| > sd of the differences (the old rule's mark), yet p = 0.06: not marked.
    noisy = sig.seed_test([0.1, 0.3, 0.0], [0.0, 0.0, 0.0], higher_is_better=True)
    assert noisy.p_value == pytest.approx(stats.ttest_1samp([0.1, 0.3, 0.0], 0).pvalue)
    assert noisy.p_value > 0.05
    assert noisy.verdict == "same"


def test_seed_test_needs_three_seeds_and_handles_constant_differences():
    assert sig.seed_test([0.9, 0.9], [0.1, 0.1], higher_is_better=True) == sig.Decision(
        "unknown", "not enough seeds (2 < 3)")
    same = sig.seed_test([0.5, 0.6, 0.7], [0.4, 0.5, 0.6], higher_is_better=True)  # +0.1 on every seed
    assert (same.verdict, same.p_value) == ("better", 0.0)
    none = sig.seed_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], higher_is_better=True)
    assert (none.verdict, none.p_value) == ("same", 1.0)


def test_ci_test_combines_asymmetric_cis_as_independent():
    d = sig.ci_test((0.50, 0.47, 0.52), (0.45, 0.44, 0.49), over="cells", higher_is_better=True)
    below, above = np.hypot(0.03, 0.04), np.hypot(0.02, 0.01)
    assert d.ci95 == pytest.approx((0.05 - below, 0.05 + above))
    assert d.verdict == "same" and d.p_value is None  # 0.05 - 0.05 < 0
    apart = sig.ci_test((0.60, 0.59, 0.61), (0.45, 0.44, 0.46), over="donors", higher_is_better=True)
    assert apart.verdict == "better" and "over donors" in apart.test


def test_dataset_test_is_scipys_wilcoxon_and_needs_six_datasets():
    d = [0.02, 0.05, -0.01, 0.03, 0.04, 0.06, 0.01]
    decision = sig.dataset_test(d, higher_is_better=True)
    assert decision.p_value == pytest.approx(stats.wilcoxon(d).pvalue) and decision.p_value < 0.05
    assert decision.verdict == "better" and decision.test == "Wilcoxon signed-rank over 7 datasets (marks at p < 0.05)"
    assert sig.dataset_test(d[:5], higher_is_better=True).test == "not enough datasets (5 < 6)"
    six = sig.dataset_test([-0.1] * 6, higher_is_better=True)  # all worse: the smallest p of six, 2/64
    assert six.verdict == "worse" and six.p_value == pytest.approx(2 / 64)
    assert sig.dataset_test([0.0] * 6, higher_is_better=True).verdict == "same"


# ----------------------------------------------------------------------------- report


@pytest.fixture
def aggregates(monkeypatch):
    """scIB's totals declared aggregates (as their module declares them)."""
    load_all()
    for name in ("scib_overall", "scib_bio_conservation"):
        monkeypatch.setitem(METRICS, name, dataclasses.replace(METRICS[name], aggregate=True))


def floor(accuracy, chance=0.11):
    return {"bio_floor": {"metric": "knn_label_accuracy", "accuracy": accuracy, "chance": chance}}


def _integration(random=True):
    out = [
        record("pca", "batch_integration", {"scib_overall": [0.434, 0.436, 0.435]}, computation=floor(0.917)),
        record("m", "batch_integration", {"scib_overall": [0.50, 0.51, 0.49]}, computation=floor(0.90)),
    ]
    if random:
        out.append(record("random", "batch_integration", {"scib_overall": [0.448, 0.447, 0.449]},
                          computation=floor(0.116)))
    return out


def test_random_value_and_floor_flag_beside_every_aggregate(aggregates):
    c = compare(_integration())
    (column,) = c.columns
    assert column.aggregate and column.random_text() == "random 0.4480"
    assert c.floor_flag("toy", "batch_integration", "random") == FLOOR_FLAG
    assert c.floor_flag("toy", "batch_integration", "m") == ""
    html = render_html(c)
    assert '<span class="random">random 0.4480</span>' in html
    assert html.count(f'<span class="floor">{FLOOR_FLAG}</span>') == 2  # the legend's, and random's row
    assert "kNN label accuracy 0.116, chance 0.110" in html
    md = exports.to_markdown(c)
    assert "scib_overall (random 0.4480)" in md and FLOOR_FLAG in md
    rows = {r["model"]: r for r in csv.DictReader(io.StringIO(exports.to_csv(c)))}
    assert rows["m"]["random_value"] == "0.4480"
    assert rows["random"]["bio_floor"] == "near chance: kNN label accuracy 0.116, chance 0.110"
    assert rows["pca"]["bio_floor"].startswith("above chance")
    assert "random not run" in render_html(compare(_integration(random=False)))


def test_a_metric_that_is_not_an_aggregate_shows_no_random(aggregates):
    records = [record(m, "clustering", {"adjusted_rand_index": [0.5, 0.6, 0.7]}, computation=floor(0.1))
               for m in ("pca", "random")]
    c = compare(records)
    assert c.columns[0].random_text() == "" and "(random " not in exports.to_markdown(c)
    assert render_html(c).count(FLOOR_FLAG) == 1  # the legend's only: the floor shows beside aggregates


def test_every_export_names_the_test_of_each_mark():
    records = [
        record("pca", "clustering", {"adjusted_rand_index": [0.50, 0.60, 0.55]}),
        record("m", "clustering", {"adjusted_rand_index": [0.61, 0.70, 0.67]}),
        record("pca", "embedding", {"silhouette_score": [0.5]}, seeds=(0,), bootstrap=(0.49, 0.51)),
        record("m", "embedding", {"silhouette_score": [0.4]}, seeds=(0,), bootstrap=(0.39, 0.41)),
    ]
    c = compare(records)
    t_test = "paired t-test over 3 seeds (marks at p < 0.05)"
    ci = "bootstrap 95% CIs over cells, combined as independent (conservative)"
    html = render_html(c)
    assert f'<li value="1">{t_test.replace("<", "&lt;")}</li><li value="2">{ci}</li>' in html
    assert '<span class="worse">▼<sup>²</sup></span>' in html and "95% CI of Δ [" in html
    md = exports.to_markdown(c)
    assert f"¹ {t_test.replace('<', '&lt;')}" in md and f"² {ci}" in md and "0.4000 ▼²" in md
    tests = {(r["task"], r["model"]): r["test"] for r in csv.DictReader(io.StringIO(exports.to_csv(c)))}
    assert tests[("clustering", "m")] == t_test and tests[("embedding", "m")] == ci


def test_across_datasets_section_tests_per_dataset_differences():
    names = [f"d{i}" for i in range(6)]
    records = []
    for i, d in enumerate(names):
        records += [record("pca", "clustering", {"adjusted_rand_index": [0.5, 0.5, 0.5]}, dataset=d),
                    record("m", "clustering", {"adjusted_rand_index": [0.6 + 0.01 * i] * 3}, dataset=d),
                    record("few", "clustering", {"adjusted_rand_index": [0.7] * 3}, dataset=d)
                    if i < 3 else None]
    c = compare([r for r in records if r is not None])
    rows = {a.model: a for a in across_datasets(c)}
    assert rows["m"].decision.verdict == "better" and rows["m"].decision.p_value == pytest.approx(2 / 64)
    assert list(rows["m"].differences) == names and rows["m"].counts == (6, 0)
    assert rows["few"].decision.test == "not enough datasets (3 < 6)"
    html = render_html(c)
    assert "<h2>Across datasets</h2>" in html and "Wilcoxon signed-rank over 6 datasets" in html
    assert "## Across datasets" in exports.to_markdown(c)
    across = [r for r in csv.DictReader(io.StringIO(exports.to_csv(c))) if r["dataset"].startswith("across")]
    m = next(r for r in across if r["model"] == "m")
    assert m["dataset"] == "across datasets: " + ", ".join(names) and m["verdict"] == "better"
    assert float(m["difference_vs_baseline"]) == pytest.approx(0.125)  # median of 0.10 ... 0.15


def test_records_without_the_new_fields_still_load_and_report(tmp_path):
    new = record("m", "embedding", {"silhouette_score": [0.4]}, seeds=(0,), bootstrap=(0.39, 0.41))
    data = json.loads(R.result_json(new))
    assert data["metrics"][0]["bootstrap"]["over"] == "cells"
    (tmp_path / "new.json").write_text(json.dumps(data))
    del data["metrics"][0]["bootstrap"]  # as an older czb wrote it
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert R.read_result(tmp_path / "new.json").metrics[0].bootstrap.ci95 == [0.39, 0.41]
    old = R.read_result(tmp_path / "old.json")
    assert old.metrics[0].bootstrap is None and old.schema_version == R.SCHEMA_VERSION
    base = record("pca", "embedding", {"silhouette_score": [0.5]}, seeds=(0,))
    entry = compare([base, old]).columns[0].entries["m"]
    assert entry.verdict == "unknown" and "older czb" in entry.test
    assert "older czb" in render_html(compare([base, old]))
    data["metrics"][0]["bootstrap"] = {"ci95": [0.5, 0.4], "over": "cells", "n_units": 10, "n_resamples": 10}
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="bootstrap"):
        R.read_result(tmp_path / "bad.json")


def test_run_table_shows_marks_beside_the_difference(capsys, monkeypatch):
    from czb.cli.tables import print_results

    monkeypatch.setenv("COLUMNS", "80")
    records = [record("pca", "clustering", {"adjusted_rand_index": [0.50, 0.60, 0.55]}),
               record("m", "clustering", {"adjusted_rand_index": [0.30, 0.41, 0.33]}),
               record("same", "clustering", {"adjusted_rand_index": [0.55, 0.55, 0.57]})]
    print_results(records)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ")}
    assert "-0.2033 ▼" in rows["m"]
    assert "+0.0067" in rows["same"] and not {"▲", "▼"} & set(rows["same"])  # p = 0.88: no mark
    assert all(len(line) <= 80 for line in out.splitlines())
