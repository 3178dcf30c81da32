"""No confident wrong numbers (issue 17): degenerate embeddings are refused, metrics on
degenerate groupings are not applicable (with the reason), and cells without a label are
left out and counted, never a class called "nan".

Runs go through the command line on crafted inputs: embedding files for
``pbmc68k_reduced`` (700 cells, shipped with scanpy) and small ``.h5ad`` datasets
declared in a ``--config-dir``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_clean_exit, invoke

from czb.core.errors import EmbeddingError, EmbeddingWarning
from czb.core.missing import missing_mask
from czb.core.records import read_result
from czb.evaluation.applicability import group_problem, topk_problem
from czb.evaluation.context import EvaluationContext
from czb.evaluation.registry import get_task
from czb.evaluation.runner import evaluate, run_task
from czb.models.embedding import check_embedding

PBMC = ["--dataset", "pbmc68k_reduced", "--offline", "--seeds", "0", "--n-jobs", "1"]
PBMC_CELLS = 700
LABEL_TASKS = ["clustering", "embedding", "label_prediction", "batch_integration"]


def records_in(folder: Path) -> list:
    return [read_result(p) for p in sorted((Path(folder) / "results").glob("*.json"))]


@pytest.fixture(scope="module")
def pbmc_pca() -> np.ndarray:
    import scanpy as sc

    return np.asarray(sc.datasets.pbmc68k_reduced().obsm["X_pca"], dtype=np.float64)


# ----------------------------------------------------------------------------- degenerate embeddings


def _degenerate(pca: np.ndarray) -> dict[str, tuple[np.ndarray, str]]:
    rng = np.random.default_rng(0)
    half = pca.copy()
    half[::2] = half[0]  # half the rows repeat one row
    return {
        "zeros": (np.zeros((PBMC_CELLS, 10)), "same vector"),
        "identical_rows": (np.tile(rng.normal(size=8), (PBMC_CELLS, 1)), "same vector"),
        "tiny_variance": (pca * 1e-8, "total variance"),
        "scaled_1e-20": (pca * 1e-20, "total variance"),
        "offset_swamps_spread": (pca * 1e-4 + 1e3, "spread"),
        "half_duplicates": (half, "repeat another row"),
        "integer_constant": (np.full((PBMC_CELLS, 4), 7, dtype=np.int64), "same vector"),
        # float32 squared distances overflow: every metric came out at its chance value, status ok
        "scaled_1e18": (pca * 1e18, "rescale it"),
        "one_huge_row": (np.vstack([pca[:-1], np.full((1, pca.shape[1]), 3e38)]), "rescale it"),
    }


@pytest.mark.parametrize("case", list(_degenerate(np.ones((PBMC_CELLS, 2)))))
def test_degenerate_embedding_file_is_a_failed_record_not_a_score(tmp_path, pbmc_pca, case):
    values, reason = _degenerate(pbmc_pca)[case]
    path = tmp_path / f"{case}.npy"
    np.save(path, values)
    out = tmp_path / "out"
    result = invoke("run", "--embedding", path, "--task", "clustering", "--task", "embedding", *PBMC,
                    "--output-dir", out)
    assert_clean_exit(result, 1)
    records = records_in(out)
    assert {r.task.name for r in records} == {"clustering", "embedding"}
    for r in records:
        assert r.model.name == f"file:{case}.npy"
        assert r.status == "failed" and r.metrics == []
        assert reason in r.error and str(path) in r.error and "\n" not in r.error
    assert f"failed: pbmc68k_reduced/file:{case}.npy: embedding failed: {path}" in result.stderr


def test_sound_embeddings_pass(pbmc_pca):
    rng = np.random.default_rng(1)
    for values in (pbmc_pca, pbmc_pca + 1e3, pbmc_pca * 1e-5, rng.integers(0, 1000, (PBMC_CELLS, 5))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = check_embedding(values, name="m")
        assert out.dtype == np.float32 and out.shape == np.shape(values)


def test_large_but_safe_scales_score_as_the_unscaled_embedding(tmp_path, pbmc_pca):
    """Below the overflow bound the scale-free metrics do not move: no number is wrong."""
    values = {}
    for scale in (1.0, 1e12):
        path = tmp_path / f"x{scale:g}.npy"
        np.save(path, pbmc_pca * scale)
        out = tmp_path / f"out{scale:g}"
        result = invoke("run", "--embedding", path, "--task", "embedding", "--task", "clustering", *PBMC,
                        "--no-baseline", "--output-dir", out)
        assert_clean_exit(result, 0)
        values[scale] = {(r.task.name, m.name): m.value for r in records_in(out) for m in r.metrics}
    assert values[1e12].keys() == values[1.0].keys()
    for key, value in values[1.0].items():
        assert values[1e12][key] == pytest.approx(value, abs=1e-6), key


def test_a_few_duplicate_rows_warn_and_pass(pbmc_pca):
    values = pbmc_pca.copy()
    values[:30] = values[30]  # 30 of 700 rows (4%) repeat another
    with pytest.warns(EmbeddingWarning, match=r"m: 30 of 700 rows \(4.3%\) repeat another row"):
        check_embedding(values, name="m")
    values[:80] = values[80]  # 80 of 700 (11%): refused
    with pytest.raises(EmbeddingError, match=r"m: 80 of 700 rows \(11%\) repeat another row"):
        check_embedding(values, name="m")


def test_negative_zero_is_the_same_row():
    values = np.array([[0.0, 1.0], [-0.0, 1.0], [2.0, 3.0]])
    with pytest.raises(EmbeddingError, match="1 of 3 rows"):
        check_embedding(values, name="m")


def test_one_row_is_refused():
    with pytest.raises(EmbeddingError, match="m: the embedding has 1 row"):
        check_embedding(np.ones((1, 3)), name="m")


def test_degenerate_check_is_one_cheap_pass():
    import time

    values = np.random.default_rng(0).standard_normal((1_000_000, 50), dtype=np.float32)
    start = time.perf_counter()
    assert check_embedding(values, name="m") is values  # no copy
    assert time.perf_counter() - start < 10  # ~1 s on 2 busy cores


def test_a_baseline_producing_a_constant_embedding_fails(tmp_path, monkeypatch):
    from czb.models import baselines
    def constant_pca(x, n_comps, *, info, **_):
        info["n_comps"] = n_comps
        return np.zeros((x.shape[0], n_comps))

    monkeypatch.setattr(baselines, "sparse_pca", constant_pca)
    out = tmp_path / "out"
    result = invoke("run", "--model", "pca", "--task", "embedding", *PBMC, "--output-dir", out)
    assert_clean_exit(result, 1)
    (record,) = records_in(out)
    assert record.model.name == "pca" and record.status == "failed"
    assert "pca: all 700 rows of the embedding are the same vector" in record.error


# ----------------------------------------------------------------------------- the rule, against scikit-learn


@pytest.mark.parametrize("labels", [
    ["a"] * 10,                          # one label
    [f"c{i}" for i in range(10)],        # one label per cell
    [f"c{i}" for i in range(9)] + ["c0"],  # n - 1 labels
    ["a"] * 5 + ["b"] * 5,
    ["a", "b"],                          # 2 cells, 2 labels
    ["a", "b", "b"],
    ["a"] * 9 + ["b"],
])
def test_group_rule_is_scikit_learns_silhouette_rule(labels):
    from sklearn.metrics import silhouette_score

    X = np.random.default_rng(0).normal(size=(len(labels), 3))
    try:
        silhouette_score(X, labels)
        defined = True
    except ValueError:
        defined = False
    assert (group_problem(np.array(labels)) is None) == defined
    # Every label task follows the rule: not applicable exactly where it is undefined.
    for task in ("clustering", "embedding"):
        (r,) = evaluate(X, labels=np.array(labels), tasks=[task], seeds=(0,))
        assert (r.status == "ok") == defined, (task, r.error)
        if not defined:
            assert r.status == "not_applicable" and "not defined" in r.error


def test_group_messages_give_counts_not_values():
    secret = "SECRET-LABEL"
    one = group_problem(np.array([secret] * 4))
    each = group_problem(np.array([f"{secret}{i}" for i in range(4)]))
    assert one == "all 4 scored cells have the same label (1 label; at least 2 are needed)"
    assert each == "each of the 4 scored cells has its own label (4 labels for 4 cells; at most 3 can be scored)"
    assert group_problem(np.array([]), what="batch") == "no cell has a batch"


def test_topk_needs_more_classes_than_k():
    assert topk_problem(5, 5) is not None and topk_problem(6, 5) is None
    assert topk_problem(1, 1) is not None and topk_problem(2, 1) is None


def test_batch_silhouette_without_batches_within_labels_is_left_out_with_its_reason():
    from conftest import planted_embedding

    X, labels, _ = planted_embedding(300)
    batches = np.char.add("batch-of-", labels)  # every label in one batch: nothing to compare within labels
    (r,) = evaluate(X, labels=labels, batches=batches, tasks=["batch_integration"], seeds=(0,))
    assert r.status == "ok"
    names = {m.name for m in r.metrics}
    assert {"batch_silhouette", "scib_batch_correction", "scib_overall"}.isdisjoint(names)
    assert {"silhouette_score", "ilisi_normalized", "scib_bio_conservation"} <= names
    assert all(np.isfinite(m.value) for m in r.metrics)
    reasons = r.computation["not_applicable"]
    assert "no label has its cells in 2 or more batches" in reasons["batch_silhouette"]
    assert "batch_silhouette" in reasons["scib_overall"]


def test_one_batch_is_not_applicable():
    from conftest import planted_embedding

    X, labels, _ = planted_embedding(200)
    (r,) = evaluate(X, labels=labels, batches=np.full(200, "b"), tasks=["batch_integration"], seeds=(0,))
    assert r.status == "not_applicable" and "same batch" in r.error and r.metrics == []


def test_time_points_one_value_and_one_per_cell():
    X = np.random.default_rng(0).normal(size=(200, 5))
    task = get_task("sequential_organization")()
    same = run_task(task, EvaluationContext(X, roles={"time_point": np.zeros(200)}), (0,))
    assert same.status == "not_applicable" and "same time point" in same.error
    continuous = run_task(task, EvaluationContext(X, roles={"time_point": np.linspace(0, 1, 200)}), (0,))
    assert continuous.status == "ok"
    assert [m.name for m in continuous.metrics] == ["sequential_alignment"]
    assert "own time point" in continuous.computation["not_applicable"]["silhouette_score"]


def test_label_prediction_with_one_usable_class_is_not_applicable():
    X = np.random.default_rng(0).normal(size=(60, 3))
    labels = np.array(["a"] * 50 + [f"r{i}" for i in range(10)])
    (r,) = evaluate(X, labels=labels, tasks=["label_prediction"], seeds=(0,))
    assert r.status == "not_applicable" and "at least 2 labels with >= 10 cells" in r.error


def test_cross_species_scores_need_two_shared_types_and_skip_a_one_label_species():
    from test_cross_species import context, planted_species

    X, labels, species, _ = planted_species(species=("human", "mouse"))
    one_shared = labels.copy()
    one_shared[species == "mouse"] = "B"  # the only type both species have
    r = run_task(get_task("cross_species_integration")(), context(X, one_shared, species), (0,))
    assert r.status == "not_applicable" and "same shared cell type" in r.error

    X, labels, species, _ = planted_species(species=("human", "mouse", "macaque"))
    labels = labels.copy()
    labels[species == "macaque"] = "B"  # macaque: one label, no silhouette of its own
    r = run_task(get_task("cross_species_integration")(), context(X, labels, species), (0,))
    assert r.status == "ok", r.error
    within = r.metric("silhouette_score", cell_types="within_species")
    assert within.params["n_species_scored"] == 2 and np.isfinite(within.value)


# ----------------------------------------------------------------------------- missing labels


def test_missing_values_are_recognised_in_every_column_kind():
    cases = {
        "categorical": (pd.Series(pd.Categorical(["a", None, "b", "a"])), [False, True, False, False]),
        "object": (np.array(["a", None, np.nan, "", "  ", "NaN", "x"], dtype=object),
                   [False, True, True, True, True, True, False]),
        "float": (np.array([1.0, np.nan, 2.0]), [False, True, False]),
        "text": (np.array(["a", "nan", "None", "<NA>"]), [False, True, True, True]),
        "nullable int": (pd.Series([1, None, 2], dtype="Int64"), [False, True, False]),
        "int": (np.array([0, 1, 2]), [False, False, False]),
    }
    for name, (values, expected) in cases.items():
        assert missing_mask(values).tolist() == expected, name


def test_cells_without_a_label_are_left_out_and_counted():
    from conftest import planted_embedding

    from czb.evaluation.metrics.silhouette import silhouette_label

    X, labels, batches = planted_embedding(400)
    labels = labels.astype(object)
    labels[:50] = None
    labels[50:60] = np.nan
    results = evaluate(X, labels=labels, batches=batches, tasks=["embedding", "batch_integration"], seeds=(0,))
    for r in results:
        assert r.status == "ok" and r.computation["cells_without_label"] == 60
    expected = silhouette_label(X[60:], labels[60:].astype(str)).value
    assert results[0].metric("silhouette_score").value == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- through the CLI, on crafted datasets


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> Path:
    """A config dir declaring .h5ad datasets with degenerate or missing labels and batches."""
    import anndata as ad
    import scipy.sparse as sp

    from czb.data.synthetic.cells import planted_cells

    folder = tmp_path_factory.mktemp("crafted")
    cells = planted_cells(n_cells=240, n_genes=200, n_cell_types=4, n_batches=3, seed=0)
    n = cells.n_obs
    types = cells.obs["cell_type"].astype(str).to_numpy().astype(object)
    batch = cells.obs["batch"].astype(str).to_numpy().astype(object)
    with_nan = types.copy()
    with_nan[:30] = np.nan
    object_gaps = types.copy()
    object_gaps[:10], object_gaps[10:20], object_gaps[20:25] = None, "", "nan"
    float_labels = pd.factorize(types)[0].astype(float)
    float_labels[::12] = np.nan
    batch_gaps = batch.copy()
    batch_gaps[::8] = None
    datasets = {
        "one_label": {"cell_type": np.full(n, "T cell"), "batch": batch},
        "distinct_labels": {"cell_type": np.array([f"cell-{i}" for i in range(n)]), "batch": batch},
        "categorical_nan": {"cell_type": pd.Categorical(with_nan), "batch": batch},
        "object_gaps": {"cell_type": object_gaps, "batch": batch},
        "float_nan": {"cell_type": float_labels, "batch": batch},
        "batch_gaps": {"cell_type": types, "batch": batch_gaps},
        "one_batch": {"cell_type": types, "batch": np.full(n, "b0")},
        "batch_per_cell": {"cell_type": types, "batch": np.array([f"b{i}" for i in range(n)])},
    }
    spec = ["datasets:"]
    for name, columns in datasets.items():
        obs = pd.DataFrame(columns, index=cells.obs_names)
        ad.AnnData(X=sp.csr_matrix(cells.X), obs=obs, var=cells.var).write_h5ad(folder / f"{name}.h5ad")
        spec += [f"  {name}:", f"    uri: {folder / name}.h5ad", "    organism: human", "    label_key: cell_type",
                 "    batch_key: batch", "    gene_id_type: ensembl", "    expression: raw_counts"]
    (folder / "cfg").mkdir()
    (folder / "cfg" / "crafted.yaml").write_text("\n".join(spec) + "\n")
    return folder / "cfg"


def run_crafted(crafted: Path, tmp_path: Path, dataset: str, tasks=LABEL_TASKS):
    out = tmp_path / "out"
    args = ["run", "--model", "random", "--no-baseline", "--dataset", dataset, "--seeds", "0", "--n-jobs", "1",
            "--config-dir", crafted, "--output-dir", out]
    for task in tasks:
        args += ["--task", task]
    result = invoke(*args)
    assert "Traceback" not in result.output
    return result, {r.task.name: r for r in records_in(out)}, out


def assert_no_nan_class(out: Path) -> None:
    """No record, metric parameter or map sample holds a class made of a missing value."""
    for path in (out / "results").glob("*.json"):
        record = json.loads(path.read_text())
        for metric in record["metrics"]:
            for value in metric["params"].values():
                parts = str(value).split(",")
                assert not {"nan", "None", "<NA>", ""} & set(parts) or value == "", (path.name, metric)
        assert '"nan"' not in path.read_text()
    for sample in out.glob("results/embeddings/*.npz"):
        with np.load(sample) as f:
            for name in ("labels", "batches"):
                if name in f.files:
                    assert not {"nan", "None", "<NA>", ""} & set(f[name].tolist()), sample.name


@pytest.mark.parametrize(("dataset", "why"), [
    ("one_label", "all 240 scored cells have the same label"),
    ("distinct_labels", "each of the 240 scored cells has its own label"),
])
def test_degenerate_labels_are_not_applicable_with_the_reason(crafted, tmp_path, dataset, why):
    result, records, _ = run_crafted(crafted, tmp_path, dataset)
    assert_clean_exit(result, 0)
    assert set(records) == set(LABEL_TASKS)
    for name, r in records.items():
        assert r.status == "not_applicable" and r.metrics == [], (name, r.status)
        if name != "label_prediction":
            assert why in r.error, (name, r.error)
    assert "at least 2 labels with >= 10 cells" in records["label_prediction"].error
    assert "T cell" not in records["clustering"].error and "cell-1" not in records["clustering"].error


@pytest.mark.parametrize(("dataset", "n_without"), [("categorical_nan", 30), ("object_gaps", 25), ("float_nan", 20)])
def test_cells_without_labels_are_excluded_and_counted(crafted, tmp_path, dataset, n_without):
    result, records, out = run_crafted(crafted, tmp_path, dataset)
    assert_clean_exit(result, 0)
    for name, r in records.items():
        assert r.status == "ok", (name, r.error)
        assert r.computation["cells_without_label"] == n_without, name
    used = records["label_prediction"].metrics[0].params["n_cells_used"]
    assert used == 240 - n_without
    assert_no_nan_class(out)


def test_excluded_cells_do_not_count_in_the_score(crafted, tmp_path):
    """The silhouette equals the one of the labelled cells alone (the random model's rows)."""
    import anndata as ad

    from czb.evaluation.metrics.silhouette import silhouette_label

    _, records, _ = run_crafted(crafted, tmp_path, "categorical_nan", tasks=["embedding"])
    labels = ad.read_h5ad(crafted.parent / "categorical_nan.h5ad").obs["cell_type"]
    keep = labels.notna().to_numpy()
    X = np.random.default_rng(0).standard_normal((240, 50), dtype=np.float32)  # the random baseline, seed 0
    expected = silhouette_label(X[keep], labels[keep].astype(str).to_numpy()).value
    assert records["embedding"].metric("silhouette_score").value == pytest.approx(expected, abs=1e-9)


def test_cells_without_a_batch_are_left_out_of_batch_metrics_only(crafted, tmp_path):
    result, records, out = run_crafted(crafted, tmp_path, "batch_gaps")
    assert_clean_exit(result, 0)
    assert records["batch_integration"].status == "ok"
    assert records["batch_integration"].computation["cells_without_batch"] == 30
    for name in ("clustering", "embedding", "label_prediction"):
        assert records[name].status == "ok" and "cells_without_batch" not in records[name].computation
    assert_no_nan_class(out)


@pytest.mark.parametrize(("dataset", "why"), [
    ("one_batch", "all 240 scored cells have the same batch"),
    ("batch_per_cell", "each of the 240 scored cells has its own batch"),
])
def test_degenerate_batches_are_not_applicable(crafted, tmp_path, dataset, why):
    result, records, _ = run_crafted(crafted, tmp_path, dataset, tasks=["batch_integration", "embedding"])
    assert_clean_exit(result, 0)
    r = records["batch_integration"]
    assert r.status == "not_applicable" and why in r.error and r.metrics == []
    assert records["embedding"].status == "ok"
