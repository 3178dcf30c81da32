"""End to end through the runner: datasets -> baselines -> tasks -> records."""

import pytest

from czb.runner.run import run_benchmark
from czb.runner.specs import Catalog, DatasetSpec


@pytest.fixture(scope="module")
def records():
    """PCA and random on the planted synthetic fixture, all four cell-level tasks."""
    catalog = Catalog.load()
    out = run_benchmark(
        catalog,
        datasets=["synthetic_cells"],
        tasks=["clustering", "embedding", "label_prediction", "batch_integration"],
        models=["random"],
        seeds=(0, 1),
        n_jobs=2,
    )
    return {(r.model.name, r.task.name): r for r in out}


def test_pca_baseline_is_added_and_every_record_is_ok(records):
    assert {m for m, _ in records} == {"random", "pca"}
    assert all(r.status == "ok" for r in records.values()), [r.error for r in records.values()]


@pytest.mark.parametrize(
    ("task", "metric", "params", "margin"),
    [
        ("clustering", "adjusted_rand_index", {}, 0.3),
        ("clustering", "normalized_mutual_info", {}, 0.3),
        ("embedding", "silhouette_score", {}, 0.1),
        ("label_prediction", "mean_fold_accuracy", {"classifier": "MEAN(knn,lr,rf)"}, 0.3),
        ("batch_integration", "scib_overall", {}, 0.05),
    ],
)
def test_pca_clearly_beats_random_on_planted_structure(records, task, metric, params, margin):
    pca = records[("pca", task)].metric(metric, **params).value
    rnd = records[("random", task)].metric(metric, **params).value
    assert pca > rnd + margin, (pca, rnd)


def test_random_is_at_chance(records):
    clustering = records[("random", "clustering")]
    assert abs(clustering.metric("adjusted_rand_index").value) < 0.05
    accuracy = records[("random", "label_prediction")].metric("mean_fold_accuracy", classifier="lr").value
    n_types = 6
    assert accuracy == pytest.approx(1 / n_types, abs=0.08)


@pytest.mark.slow
def test_clustering_beyond_8192_cells():
    """cz-benchmarks 0.15.1 crashes in clustering at >= 8,192 cells with scipy 1.17; we must not."""
    spec = DatasetSpec(
        name="big_synthetic",
        uri="synthetic:planted_cells",
        organism="human",
        label_key="cell_type",
        batch_key="batch",
        params={"n_cells": 9000, "n_genes": 600, "seed": 1},
    )
    catalog = Catalog.load()
    catalog.datasets[spec.name] = spec
    catalog.tasks["clustering_fixed"] = catalog.task("clustering").model_copy(
        update={"name": "clustering_fixed", "parameters": {"resolution_sweep": False}}
    )
    (record,) = run_benchmark(
        catalog, datasets=[spec.name], tasks=["clustering_fixed"], models=["pca"], seeds=(0,), n_jobs=2
    )
    assert record.status == "ok", record.error
    assert record.dataset.n_cells == 9000
    assert record.metric("normalized_mutual_info").value > 0.5
