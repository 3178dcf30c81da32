"""End to end through the runner: datasets -> baselines -> tasks -> records."""

import pytest

from czb.pipeline.run import run_benchmark
from czb.specs.catalog import Catalog
from czb.specs.schema import DatasetSpec


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


# ----------------------------------------------------------------------------- several datasets


def test_cross_species_tasks_score_stacked_embeddings_of_each_dataset(tmp_path):
    from czb.core.records import read_result

    catalog = Catalog.load()
    out = run_benchmark(
        catalog,
        datasets=["synthetic_species_human", "synthetic_species_mouse"],
        tasks=["embedding", "cross_species_integration", "cross_species_label_prediction"],
        models=["random"],
        seeds=(0,),
        n_jobs=2,
        output_dir=tmp_path,
    )
    by_key = {(r.dataset.name, r.model.name, r.task.name): r for r in out}
    group = "synthetic_species_human+synthetic_species_mouse"
    # Per-dataset tasks once per dataset, cross-species tasks once per model on the group.
    assert set(by_key) == {
        (d, m, t)
        for m in ("random", "pca")
        for d, t in [("synthetic_species_human", "embedding"), ("synthetic_species_mouse", "embedding"),
                     (group, "cross_species_integration"), (group, "cross_species_label_prediction")]
    }
    record = by_key[(group, "random", "cross_species_integration")]
    assert record.status == "ok", record.error
    assert [m.name for m in record.dataset.members] == ["synthetic_species_human", "synthetic_species_mouse"]
    assert record.dataset.n_cells == 1200
    transfer = by_key[(group, "random", "cross_species_label_prediction")]
    pairs = {(m.params["train_species"], m.params["test_species"]) for m in transfer.metrics}
    assert {("human", "mouse"), ("mouse", "human")} <= pairs
    # Written and read back with the members.
    stem = group.replace("+", "-")  # file names keep letters, digits, '_', '.', '-'
    written = [read_result(p) for p in (tmp_path / "results").glob(f"{stem}__random__cross_species_integration__*.json")]
    assert len(written) == 1 and len(written[0].dataset.members) == 2


def test_cross_species_needs_several_datasets():
    from czb.core.errors import CzbError

    with pytest.raises(CzbError, match="give two or more datasets"):
        run_benchmark(Catalog.load(), datasets=["synthetic_species_human"],
                      tasks=["cross_species_integration"], models=["random"], seeds=(0,))


def test_a_member_without_embedding_fails_the_group_and_says_which():
    import numpy as np

    from czb.core.records import DatasetRecord, ModelRecord
    from czb.models.embedding import Embedding
    from czb.pipeline.groups import GroupMember, stack_members
    from czb.pipeline.scoring import Embedded
    roles = {"labels": np.array(["a", "b"] * 20, dtype=object), "batch": None}

    def member(name, organism, embedded):
        record = DatasetRecord(name=name, uri=f"x:{name}", sha256=None, n_cells=40, n_genes=10)
        return GroupMember(record, embedded, {**roles, "species": np.full(40, organism, dtype=object)})

    model = ModelRecord(name="m", kind="docker", image_digest="sha256:1")
    ok = Embedded(model, Embedding(values=np.zeros((40, 4), np.float32), model="m", kind="docker"))
    failed = Embedded(model, None, "failed", "container failed (exit code 1)")
    not_applicable = Embedded(model, None, "not_applicable", "m supports human; dataset b is mouse")
    group, stacked, _ = stack_members([member("a", "human", ok), member("b", "mouse", failed)])
    assert group.name == "a+b" and stacked.status == "failed" and "b: container failed" in stacked.error
    _, stacked, _ = stack_members([member("a", "human", ok), member("b", "mouse", not_applicable)])
    assert stacked.status == "not_applicable" and "b: m supports human" in stacked.error
    wide = Embedded(model, Embedding(values=np.zeros((40, 8), np.float32), model="m", kind="docker"))
    _, stacked, _ = stack_members([member("a", "human", ok), member("b", "mouse", wide)])
    assert stacked.status == "failed" and "differ in dimension" in stacked.error
    _, stacked, stacked_roles = stack_members([member("a", "human", ok), member("b", "mouse", ok)])
    assert stacked.embedding.values.shape == (80, 4) and list(stacked_roles["dataset"][[0, 40]]) == ["a", "b"]


def test_ordered_string_time_points_run_through_the_declared_order(tmp_path):
    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from czb.core.errors import DatasetError
    from czb.data.reading import load_dataset
    from czb.data.synthetic.cells import planted_cells
    from czb.data.validation import validate_dataset

    cells = planted_cells(n_cells=300, n_genes=200, n_time_points=3, seed=0)
    stage = np.array(["young", "middle", "old"])[cells.obs["time_point"].astype(int).to_numpy()]
    obs = pd.DataFrame({"cell_type": cells.obs["cell_type"].to_numpy(), "age_group": stage}, index=cells.obs_names)
    path = tmp_path / "aged.h5ad"
    ad.AnnData(X=sp.csr_matrix(cells.X), obs=obs, var=cells.var).write_h5ad(path)
    spec = DatasetSpec(name="aged", uri=str(path), organism="human", label_key="cell_type",
                       extra_keys={"time_point": "age_group"},
                       label_order={"time_point": ["young", "middle", "old"]})
    ds = load_dataset(spec)
    validate_dataset(ds)
    np.testing.assert_array_equal(ds.role("time_point"), cells.obs["time_point"].astype(int).to_numpy())

    catalog = Catalog.load()
    catalog.datasets["aged"] = spec
    (record,) = [r for r in run_benchmark(catalog, datasets=["aged"], tasks=["sequential_organization"],
                                          models=["pca"], seeds=(0,)) if r.model.name == "pca"]
    assert record.status == "ok", record.error

    wrong = spec.model_copy(update={"label_order": {"time_point": ["young", "old"]}})
    with pytest.raises(DatasetError, match=r"values \['middle'\] that are not in label_order"):
        validate_dataset(load_dataset(wrong))


# ----------------------------------------------------------------------------- perturbation predictors


def test_perturbation_tasks_score_predictors_beside_both_baselines():
    from czb.pipeline.baselines import baseline_differences
    catalog = Catalog.load()
    out = run_benchmark(
        catalog,
        datasets=["synthetic_perturbations"],
        tasks=["perturbation_expression_shift", "clustering"],
        models=["additive_linear", "random"],
        seeds=(0,),
        n_jobs=2,
    )
    by_key = {(r.model.name, r.task.name): r for r in out}
    # Both perturbation baselines and PCA are added; each model gets every task, and the
    # ones it cannot serve are not_applicable rather than missing.
    assert set(by_key) == {(m, t) for m in ("additive_linear", "random", "pca", "control_mean")
                           for t in ("perturbation_expression_shift", "clustering")}
    assert by_key[("additive_linear", "clustering")].status == "not_applicable"
    assert by_key[("random", "perturbation_expression_shift")].status == "not_applicable"
    additive = by_key[("additive_linear", "perturbation_expression_shift")]
    control = by_key[("control_mean", "perturbation_expression_shift")]
    assert additive.status == control.status == "ok", (additive.error, control.error)
    assert additive.model.image_digest == "in-process"
    # Planted additive effects: the additive baseline clearly beats "no change".
    assert additive.metric("mse_top20_de").value < 0.2 * control.metric("mse_top20_de").value
    assert additive.metric("pearson_delta_top20_de").value > 0.9
    diffs = baseline_differences(out)
    delta = [v for k, v in diffs.items() if k[1] == "perturbation_expression_shift" and k[2] == "pearson_delta_top20_de"]
    assert len(delta) == 1 and delta[0] > 0.9  # compared with control_mean, not pca


def test_perturbation_dataset_needs_conditions_and_a_control_label():
    from czb.core.errors import DatasetError
    from czb.data.reading import load_dataset
    from czb.models.predictors import perturbation_data

    spec = Catalog.load().dataset("synthetic_perturbations")
    with pytest.raises(DatasetError, match="need control_label"):
        perturbation_data(load_dataset(spec.model_copy(update={"control_label": None})))
    with pytest.raises(DatasetError, match="no cell has condition 'control'"):
        perturbation_data(load_dataset(spec.model_copy(update={"control_label": "control"})))
    with pytest.raises(DatasetError, match=r"extra_keys: \{condition: <obs column>\}"):
        perturbation_data(load_dataset(spec.model_copy(update={"extra_keys": {}})))


def test_predictor_specs_are_checked():
    from czb.core.errors import SpecError
    from czb.models.predictors import predictor_for_model
    from czb.specs.schema import ModelSpec

    spec = Catalog.load().model("additive_linear")
    assert predictor_for_model(spec).describe()["implementation"] == "additive_linear"
    with pytest.raises(SpecError, match="unknown predictor implementation 'gears'"):
        predictor_for_model(spec.model_copy(update={"implementation": "gears"}))
    with pytest.raises(SpecError, match="takes no parameters"):
        predictor_for_model(spec.model_copy(update={"parameters": {"k": 1}}))
    docker = ModelSpec(name="scgenept", kind="docker", image="x:1", container="scgenept", output="predictions")
    assert predictor_for_model(docker).produces == "predictions"
