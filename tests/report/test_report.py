"""``czb report``: merging results, paired comparison with the baseline, exports, the HTML
report (opened in headless Chromium), and the numpy UMAP layout of its maps."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from czb.cli import app
from czb.core import records as R
from czb.report import exports
from czb.report.html import render_html, scaled_scores
from czb.report.layout import curve_parameters, umap_layout
from czb.report.tables import compare, metric_label, model_labels

REPO = Path(__file__).resolve().parents[2]


def record(model: str, task: str, metrics: dict[str, list[float]], *, seeds=(0, 1, 2), status="ok",
           error=None, dataset="toy", created="2026-01-01T00:00:00+00:00", parameters=None, params=None,
           ci95=None, bootstrap=None, computation=None) -> R.ResultRecord:
    """A result record with ``metrics`` {name: per-seed values}; ``bootstrap``: the
    bootstrap CI (low, high) over cells of every metric."""
    return R.ResultRecord(
        czb_version="0.test", created_at=created, command=f"czb run --model {model}",
        host=R.HostRecord(python="3.11", platform="linux", n_threads=2),
        dataset=R.DatasetRecord(name=dataset, uri="file:///toy.h5ad", sha256="ab" * 32, n_cells=300, n_genes=50),
        model=R.ModelRecord(name=model, kind="baseline" if model == "pca" else "docker",
                            image_digest="in-process" if model == "pca" else "sha256:" + "cd" * 32,
                            parameters=parameters or {}),
        task=R.TaskRecord(name=task, implementation=task), seeds=list(seeds), status=status, error=error,
        metrics=[R.MetricRecord(name=name, value=float(np.mean(v)), values_raw=v,
                                value_std_dev=float(np.std(v, ddof=1)) if len(v) > 1 else None,
                                params=params or {}, ci95=ci95,
                                bootstrap=None if bootstrap is None else R.BootstrapRecord(
                                    ci95=list(bootstrap), over="cells", n_units=300, n_resamples=1000))
                 for name, v in metrics.items()],
        runtime_s=1.5, embedding_runtime_s=2.0, peak_memory_mb=100.0, computation=computation or {},
    )


# ----------------------------------------------------------------------------- comparison


def test_paired_verdicts_against_the_baseline():
    from scipy import stats

    records = [
        record("pca", "clustering", {"adjusted_rand_index": [0.50, 0.60, 0.55]}),
        # +0.10 on every seed: the same difference each time, the model is better.
        record("good", "clustering", {"adjusted_rand_index": [0.60, 0.70, 0.65]}),
        # Differences +0.05, -0.05, +0.02: a paired t-test finds nothing.
        record("noisy", "clustering", {"adjusted_rand_index": [0.55, 0.55, 0.57]}),
        record("bad", "clustering", {"adjusted_rand_index": [0.30, 0.41, 0.33]}),
    ]
    c = compare(records)
    (column,) = c.columns
    assert [column.entries[m].verdict for m in ("good", "noisy", "bad")] == ["better", "same", "worse"]
    good = column.entries["good"]
    assert good.difference == pytest.approx(0.10) and good.p_value == 0.0
    assert good.test == "paired t-test over 3 seeds: the same difference on every seed"
    noisy = column.entries["noisy"]
    assert noisy.difference == pytest.approx(np.mean([0.05, -0.05, 0.02]))
    assert noisy.p_value == pytest.approx(stats.ttest_rel([0.55, 0.55, 0.57], [0.50, 0.60, 0.55]).pvalue)
    assert noisy.test == "paired t-test over 3 seeds (marks at p < 0.05)"
    bad = column.entries["bad"]
    assert bad.p_value == pytest.approx(stats.ttest_rel([0.30, 0.41, 0.33], [0.50, 0.60, 0.55]).pvalue)
    assert bad.p_value < 0.05
    assert column.entries["pca"].verdict == "unknown" and column.best() == "good"
    assert c.models["toy"][0] == "pca"  # the baseline row first


def test_seeds_are_paired_not_pooled():
    # The model beats PCA on every seed, by less than either's seed-to-seed SD: paired, it is better.
    records = [
        record("pca", "clustering", {"adjusted_rand_index": [0.30, 0.60, 0.90]}),
        record("m", "clustering", {"adjusted_rand_index": [0.31, 0.61, 0.91]}),
    ]
    assert compare(records).columns[0].entries["m"].verdict == "better"


def test_fewer_than_three_seeds_are_not_tested():
    # Two seeds, +0.4 on both: a t-test over two seeds says too little, so no mark.
    records = [
        record("pca", "clustering", {"adjusted_rand_index": [0.5, 0.5]}, seeds=(0, 1)),
        record("m", "clustering", {"adjusted_rand_index": [0.9, 0.9]}, seeds=(0, 1)),
    ]
    entry = compare(records).columns[0].entries["m"]
    assert entry.verdict == "unknown" and entry.test == "not enough seeds (2 < 3)"
    assert entry.difference == pytest.approx(0.4)


def test_deterministic_values_are_tested_by_their_bootstrap_cis_or_not_at_all():
    records = [
        # Per-cell means with bootstrap CIs: 0.40 vs 0.50 apart, 0.49 overlapping.
        record("pca", "embedding", {"silhouette_score": [0.50]}, seeds=(0,), bootstrap=(0.49, 0.51)),
        record("m", "embedding", {"silhouette_score": [0.40]}, seeds=(0,), bootstrap=(0.39, 0.41)),
        record("close", "embedding", {"silhouette_score": [0.49]}, seeds=(0,), bootstrap=(0.48, 0.50)),
        # Per-cell means of an older czb: no bootstrap CI, no test.
        record("pca", "embedding", {"silhouette_score": [0.5]}, seeds=(0,), dataset="old"),
        record("m", "embedding", {"silhouette_score": [0.4]}, seeds=(0,), dataset="old"),
        # A deterministic median (iLISI) is not a per-cell mean: its difference only.
        record("pca", "batch_integration", {"ilisi_normalized": [0.5]}, seeds=(0,), bootstrap=(0.49, 0.51)),
        record("m", "batch_integration", {"ilisi_normalized": [0.1]}, seeds=(0,), bootstrap=(0.09, 0.11)),
    ]
    c = compare(records)
    new, old = (next(col for col in c.columns if col.dataset == d and col.metric == "silhouette_score")
                for d in ("toy", "old"))
    m = new.entries["m"]
    assert m.verdict == "worse" and m.test == "bootstrap 95% CIs over cells, combined as independent (conservative)"
    assert m.difference == pytest.approx(-0.1)
    assert m.difference_ci95 == pytest.approx((-0.1 - np.hypot(0.01, 0.01), -0.1 + np.hypot(0.01, 0.01)))
    assert new.entries["close"].verdict == "same"  # CI of the difference: -0.01 ± 0.014
    assert old.entries["m"].verdict == "unknown" and "without a bootstrap CI" in old.entries["m"].test
    ilisi = next(col for col in c.columns if col.metric == "ilisi_normalized").entries["m"]
    assert ilisi.verdict == "unknown" and ilisi.test == "no test: deterministic, not a per-cell mean"
    assert ilisi.difference == pytest.approx(-0.4)


def test_lower_is_better_metrics_flip_the_verdict(monkeypatch):
    import dataclasses

    from czb.evaluation.registry import METRICS, load_all

    load_all()
    lower = next(name for name, info in METRICS.items() if not info.higher_is_better)
    monkeypatch.setitem(METRICS, lower, dataclasses.replace(METRICS[lower], stochastic=True))  # seed-tested
    records = [record("pca", "t", {lower: [1.0, 1.1, 1.2]}), record("m", "t", {lower: [0.5, 0.6, 0.7]})]
    assert compare(records).columns[0].entries["m"].verdict == "better"


def test_newest_record_wins_and_sweeps_get_labels():
    old = record("pca", "embedding", {"silhouette_score": [0.1]}, seeds=(0,), created="2026-01-01T00:00:00+00:00")
    new = record("pca", "embedding", {"silhouette_score": [0.2]}, seeds=(0,), created="2026-02-01T00:00:00+00:00")
    a = record("scvi", "embedding", {"silhouette_score": [0.3]}, seeds=(0,), parameters={"n_latent": 10})
    b = record("scvi", "embedding", {"silhouette_score": [0.4]}, seeds=(0,), parameters={"n_latent": 30})
    c = compare([old, new, a, b])
    assert c.superseded == [old]
    assert c.columns[0].entries["pca"].value == 0.2
    assert sorted(model_labels([a, b]).values()) == ["scvi [n_latent=10]", "scvi [n_latent=30]"]
    assert set(c.models["toy"]) == {"pca", "scvi [n_latent=10]", "scvi [n_latent=30]"}


def test_failed_runs_and_missing_baselines_are_kept():
    records = [
        record("m", "embedding", {"silhouette_score": [0.4]}, seeds=(0,)),
        record("broken", "embedding", {}, seeds=(0,), status="failed", error="embedding failed: out of memory"),
    ]
    c = compare(records)
    assert [(m, r.error) for m, r in c.problems] == [("broken", "embedding failed: out of memory")]
    assert c.missing_baselines == {"toy": ["pca"]}
    assert c.models["toy"][0] == "pca"  # still a row, shown empty


def test_scaled_view_and_aggregates():
    records = [
        record("pca", "t", {"silhouette_score": [0.5], "adjusted_rand_index": [0.2]}, seeds=(0,)),
        record("a", "t", {"silhouette_score": [0.7], "adjusted_rand_index": [0.6]}, seeds=(0,)),
        record("b", "t", {"silhouette_score": [0.6], "adjusted_rand_index": [0.1]}, seeds=(0,)),
    ]
    tasks, scores = scaled_scores(compare(records), "toy")
    assert tasks == ["t"]
    # silhouette scaled: pca 0, a 1, b 0.5; ARI: pca 0.2, a 1, b 0 → means.
    assert scores["a"] == {"t": 1.0, "overall": 1.0}
    assert scores["pca"]["t"] == pytest.approx((0.0 + 0.2) / 2)
    assert scores["b"]["t"] == pytest.approx((0.5 + 0.0) / 2)


def test_metric_labels_tell_variants_apart():
    assert metric_label("mean_fold_accuracy", {"classifier": "knn"}) == "mean_fold_accuracy [knn]"
    assert metric_label("accuracy", {"train_species": "human", "test_species": "mouse"}) == "accuracy [human→mouse]"


# ----------------------------------------------------------------------------- exports


def _toy_records():
    return [
        record("pca", "clustering", {"adjusted_rand_index": [0.50, 0.60, 0.55]}),
        record("good", "clustering", {"adjusted_rand_index": [0.60, 0.70, 0.65]}),
        record("broken", "clustering", {}, status="failed", error="model container exited with code 137"),
    ]


def test_csv_holds_raw_values_and_problems():
    rows = list(csv.DictReader(io.StringIO(exports.to_csv(compare(_toy_records())))))
    good = next(r for r in rows if r["model"] == "good")
    assert float(good["value"]) == pytest.approx(0.65) and good["verdict"] == "better"
    assert [float(x) for x in good["values"].split()] == [0.6, 0.7, 0.65]
    assert float(good["difference_vs_baseline"]) == pytest.approx(0.1)
    assert good["test"] == "paired t-test over 3 seeds: the same difference on every seed"
    assert float(good["p_value"]) == 0.0 and good["random_value"] == good["bio_floor"] == ""
    broken = next(r for r in rows if r["model"] == "broken")
    assert broken["verdict"] == "failed: model container exited with code 137" and broken["value"] == ""


def test_markdown_table():
    text = exports.to_markdown(compare(_toy_records()))
    assert "| task | metric | pca | broken | good |" in text or "| task | metric | pca | good | broken |" in text
    assert "0.6500 ± 0.0500 ▲¹" in text
    assert "¹ paired t-test over 3 seeds: the same difference on every seed" in text
    assert "| toy | broken | clustering | failed | model container exited with code 137 |" in text


# ----------------------------------------------------------------------------- HTML


def test_html_report_is_self_contained_and_complete():
    text = render_html(compare(_toy_records()), command="czb report out/ -o r.html")
    assert "<script" not in text and "http://" not in text and "https://" not in text  # opens offline
    assert text.count('class="plot"') == 1  # one metric → one bar chart
    assert 'data-model="pca"' in text and 'class="baseline"' in text
    assert "model container exited with code 137" in text
    assert "sha256:" + "cd" * 32 in text and "ab" * 32 in text  # image digest, dataset checksum
    assert "czb report out/ -o r.html" in text and "czb run --model good" in text
    assert '<span class="better">▲<sup>¹</sup></span>' in text
    assert '<li value="1">paired t-test over 3 seeds: the same difference on every seed</li>' in text
    assert 'title="Δ vs pca = +0.1000; paired t-test over 3 seeds: the same difference on every seed; p = 0"' in text


def test_html_hierarchy_section_marks_the_best_post_processing():
    from czb.report.summary import HIERARCHY_ROWS

    task, metric = HIERARCHY_ROWS[1]
    recs = [
        record(m, task, {metric: [v]}, seeds=(0,), params={"postprocessing": pp})
        for m, pp, v in [("pca", "centered", 0.2), ("pca", "tvn", 0.3), ("m", "centered", 0.5), ("m", "tvn", 0.4)]
    ]
    # One record per model holds both post-processings.
    merged = [recs[0].model_copy(update={"metrics": recs[0].metrics + recs[1].metrics}),
              recs[2].model_copy(update={"metrics": recs[2].metrics + recs[3].metrics})]
    text = render_html(compare(merged))
    assert "Perturbation-analysis hierarchy" in text
    assert re.search(r'class="best"[^>]*>0\.500 <span class="note">\(centered\)', text)
    assert "centered 0.200, tvn 0.300" in text  # every variant available


# ----------------------------------------------------------------------------- layout


def test_curve_parameters_match_umap_defaults():
    a, b = curve_parameters(0.1, 1.0)
    assert a == pytest.approx(1.577, abs=0.01) and b == pytest.approx(0.895, abs=0.01)  # umap-learn's values


def test_umap_layout_keeps_planted_clusters_apart():
    from sklearn.manifold import trustworthiness
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 900)
    X = rng.normal(0, 4, size=(6, 20))[labels] + rng.normal(size=(900, 20))
    Y = umap_layout(X, n_epochs=200)
    assert Y.shape == (900, 2) and np.isfinite(Y).all()
    assert trustworthiness(X, Y, n_neighbors=15) > 0.9
    assert cross_val_score(KNeighborsClassifier(15), Y, labels, cv=3).mean() > 0.97
    np.testing.assert_array_equal(Y, umap_layout(X, n_epochs=200))  # deterministic for a seed
    noise = umap_layout(rng.normal(size=(900, 20)), n_epochs=200)
    assert cross_val_score(KNeighborsClassifier(15), noise, labels, cv=3).mean() < 0.3  # chance is 1/6


# ----------------------------------------------------------------------------- CLI, end to end


@pytest.fixture(scope="module")
def run_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result = CliRunner().invoke(app, ["run", "--model", "random", "--task", "embedding", "--task", "clustering",
                                      "--task", "batch_integration", "--dataset", "synthetic_cells_tiny",
                                      # three seeds: enough for the paired t-test that marks stochastic metrics
                                      "--seeds", "0,1,2", "--n-jobs", "1", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_run_keeps_an_embedding_sample_for_maps(run_output):
    recs = [R.read_result(p) for p in sorted((run_output / "results").glob("*.json"))]
    samples = {r.model.name: r.embedding_sample for r in recs}
    assert set(samples) == {"pca", "random"} and all(samples.values())
    with np.load(run_output / "results" / samples["pca"]) as f:
        assert f["X"].shape[0] == 300 and f["labels"].shape == (300,) and f["batches"].shape == (300,)


def test_cli_report_formats(run_output, tmp_path):
    html_path = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(run_output), "-o", str(html_path)])
    assert result.exit_code == 0, result.output
    text = html_path.read_text()
    assert text.count('class="plot"') > 10 and 'data-plot="map-synthetic_cells_tiny-random-label"' in text
    table = CliRunner().invoke(app, ["report", str(run_output), "--format", "table"])
    assert table.exit_code == 0 and "silhouette_score" in table.stdout and "random" in table.stdout
    md = CliRunner().invoke(app, ["report", str(run_output), "--format", "md"])
    assert md.exit_code == 0 and md.stdout.startswith("Mean ± sd")
    rows = list(csv.DictReader(io.StringIO(CliRunner().invoke(app, ["report", str(run_output), "--format",
                                                                     "csv"]).stdout)))
    assert {r["model"] for r in rows} == {"pca", "random"}


def test_cli_report_errors_are_one_line(tmp_path):
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.json"), "--format", "csv"])
    assert missing.exit_code == 1 and "nope.json: no such file or folder" in missing.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hello": 1}))
    corrupt = CliRunner().invoke(app, ["report", str(bad), "--format", "csv"])
    assert corrupt.exit_code == 1 and "bad.json: not a czb result" in corrupt.stderr
    no_output = CliRunner().invoke(app, ["report", str(bad)])
    assert no_output.exit_code == 2 and "--output" in no_output.stderr


# ----------------------------------------------------------------------------- a real browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


#: Injected by the test only (the report itself has no script): records each plot's laid-out
#: size and drawn marks, and each summary table's cells, into an element --dump-dom returns.
PROBE = """<script>
window.addEventListener("load", () => {
  const plots = [...document.querySelectorAll("svg.plot")].map(svg => {
    const box = svg.getBoundingClientRect();
    return {id: svg.dataset.plot, width: box.width, height: box.height,
            marks: svg.querySelectorAll("rect, circle, line").length};
  });
  const cells = [...document.querySelectorAll("table.summary tbody tr")].map(tr =>
      [...tr.querySelectorAll("td")].map(td => td.textContent.trim()));
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({plots, cells});
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.browser
def test_report_renders_in_headless_chromium(run_output, tmp_path):
    chromium = _chromium()
    if chromium is None:
        if os.environ.get("CZB_REQUIRE_BROWSER"):
            pytest.fail("CZB_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium (apt-get install chromium)")
    report = tmp_path / "report.html"
    assert CliRunner().invoke(app, ["report", str(run_output), "-o", str(report)]).exit_code == 0
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<")
                       .replace("&gt;", ">"))
    plots = probe["plots"]
    assert len(plots) == report.read_text().count('class="plot"') > 10
    for plot in plots:  # every plot laid out with a size and something drawn
        assert plot["width"] > 100 and plot["height"] > 50 and plot["marks"] > 0, plot
    maps = [p for p in plots if p["id"].startswith("map-")]
    assert len(maps) == 4 and all(p["marks"] >= 300 for p in maps)  # pca and random, by label and batch
    rows = {cells[0]: cells for cells in probe["cells"]}
    assert set(rows) == {"pca", "random"}
    assert any("▼" in cell for cell in rows["random"])  # random is worse than PCA somewhere, and marked
    artefacts = Path(os.environ.get("CZB_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artefacts.mkdir(parents=True, exist_ok=True)
    shot = artefacts / "report.png"
    done = subprocess.run([*flags, "--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}",
                           report.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]
