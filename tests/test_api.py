"""The notebook API: ``czb.evaluate`` on AnnData, ``czb.datasets.load``, their doctests,
the walkthrough in docs/python_api.md, and ``import czb`` staying light."""

from __future__ import annotations

import doctest
import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import czb
import czb.api
import czb.datasets
from czb.core.errors import (
    DatasetError,
    DatasetWarning,
    EmbeddingError,
    FetchError,
    UnknownNameError,
    UsageError,
)
from czb.evaluation.registry import TaskInfo
from czb.evaluation.task import Task

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python_api.md"


@pytest.fixture(scope="module")
def pbmc():
    sc = pytest.importorskip("scanpy")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.datasets.pbmc68k_reduced()


def fresh(adata):
    return adata.copy()


# --------------------------------------------------------------------------- scoring


def test_planted_structure_scores_high_and_random_near_chance():
    """Planted cell types: the PCA baseline recovers them, a random embedding does not."""
    adata = czb.datasets.load("synthetic_cells_tiny", offline=True)
    adata.obsm["X_random"] = np.random.default_rng(0).normal(size=(adata.n_obs, 10))
    scores = czb.evaluate(adata, embedding="X_random", baseline=True, tasks=["clustering", "embedding"],
                          label_key="cell_type", batch_key="batch", seeds=(0,))
    value = scores.set_index(["model", "metric"])["value"]
    assert value["pca", "adjusted_rand_index"] > 0.8
    assert abs(value["X_random", "adjusted_rand_index"]) < 0.1
    assert value["pca", "silhouette_score"] > 0.55
    assert value["X_random", "silhouette_score"] < 0.5  # rescaled: a negative silhouette
    assert set(scores["status"]) == {"ok"}


def test_rows_are_czb_evaluations_per_key_and_seed(pbmc):
    """Several keys at once, each scored through czb.evaluation.runner.evaluate: the
    same values, one row per metric and seed (deterministic tasks: the first seed)."""
    from czb.evaluation.runner import evaluate as runner_evaluate

    adata = fresh(pbmc)
    scores = czb.evaluate(adata, embedding=["X_pca", "X_umap"], tasks=["clustering", "embedding"],
                          label_key="louvain", seeds=(0, 1))
    assert list(scores.columns) == list(czb.api.COLUMNS)
    assert str(scores["seed"].dtype) == "Int64" and scores["value"].dtype == float
    assert list(scores["model"].unique()) == ["X_pca", "X_umap"]
    for model in ("X_pca", "X_umap"):
        rows = scores[scores["model"] == model]
        expected = runner_evaluate(adata.obsm[model], labels=adata.obs["louvain"].astype(str).to_numpy(),
                                   tasks=["clustering", "embedding"], seeds=(0, 1))
        for result in expected:
            for metric in result.metrics:
                got = rows[(rows["task"] == result.task) & (rows["metric"] == metric.name)]
                assert got["seed"].tolist() == result.seeds
                assert got["value"].tolist() == pytest.approx(metric.values_raw)
    clustering = scores[(scores["task"] == "clustering") & (scores["model"] == "X_pca")]
    assert set(clustering["seed"]) == {0, 1}
    assert scores[scores["task"] == "embedding"]["seed"].tolist() == [0, 0]


class _Broken(Task):
    info = TaskInfo(name="broken", description="raises", metrics=(), requires=("labels",))

    def run(self, context, *, seed):
        msg = "boom"
        raise RuntimeError(msg)


def test_not_applicable_and_failed_tasks_are_rows(pbmc):
    scores = czb.evaluate(fresh(pbmc), embedding="X_pca", tasks=["embedding", "batch_integration", _Broken()],
                          label_key="louvain", seeds=(0,))
    rows = scores.set_index("task")
    assert rows.loc["embedding", "status"] == "ok"
    batch = rows.loc["batch_integration"]
    assert batch["status"] == "not_applicable" and "batch" in batch["error"]
    assert np.isnan(batch["value"]) and pd.isna(batch["seed"]) and batch["metric"] is None
    broken = rows.loc["broken"]
    assert broken["status"] == "failed" and broken["error"] == "RuntimeError: boom"


def test_baseline_rows_and_configured_tasks(pbmc):
    """The PCA baseline is scored beside the embeddings; a configured task object keeps
    its parameters; metric parameters are readable text."""
    from czb.evaluation.registry import get_task

    logistic_only = get_task("label_prediction")(classifiers=["lr"])
    scores = czb.evaluate(fresh(pbmc), embedding="X_pca", baseline=True, layer="raw", expression="log_normalized",
                          tasks=[logistic_only], label_key="louvain", seeds=(0,), key_added=None)
    assert list(scores["model"].unique()) == ["X_pca", "pca"]
    pca = scores[scores["model"] == "pca"]
    assert set(pca["status"]) == {"ok"} and (pca["value"] > 0.5).all()
    assert "classifier=lr, dropped_labels=, n_cells_used=700" in set(pca["params"])
    assert not pca["params"].str.contains("knn|rf").any()


def test_summary_written_to_uns_and_saved(pbmc, tmp_path):
    import anndata as ad

    adata = fresh(pbmc)
    scores = czb.evaluate(adata, embedding=["X_pca", "X_umap"], tasks=["clustering"], label_key="louvain",
                          batch_key="phase", seeds=(0, 1), key_added="scores")
    summary = adata.uns["scores"]["summary"]
    assert list(summary.columns) == ["model", "task", "metric", "params", "mean", "std", "n_seeds"]
    expected = scores.groupby(["model", "metric"])["value"].mean()
    got = summary.set_index(["model", "metric"])["mean"]
    assert got.sort_index().to_numpy() == pytest.approx(expected.sort_index().to_numpy())
    assert (summary["n_seeds"] == 2).all()
    params = adata.uns["scores"]["params"]
    assert params["models"] == ["X_pca", "X_umap"] and params["seeds"] == [0, 1]
    assert params["label_key"] == "louvain" and params["batch_key"] == ["phase"]
    adata.write_h5ad(tmp_path / "scored.h5ad")
    back = ad.read_h5ad(tmp_path / "scored.h5ad").uns["scores"]["summary"]
    assert back["mean"].to_numpy() == pytest.approx(summary["mean"].to_numpy())

    untouched = fresh(pbmc)
    czb.evaluate(untouched, embedding="X_pca", tasks=["embedding"], label_key="louvain", key_added=None)
    assert set(untouched.uns) == set(pbmc.uns)


# --------------------------------------------------------------------------- errors before work


def test_clear_errors_name_what_is_wrong(pbmc, monkeypatch):
    from czb.evaluation import runner

    def never(*args, **kwargs):
        raise AssertionError("scoring started before the input was checked")

    monkeypatch.setattr(runner, "evaluate", never)
    adata = fresh(pbmc)
    x = adata.obsm["X_pca"].copy()
    x[[3, 5]] = np.nan
    adata.obsm["X_nan"] = x
    cases = [
        ({"embedding": "X_scGPT"}, EmbeddingError, r"'X_scGPT' is not an obsm key.*'X_pca'"),
        ({"embedding": ["X_pca", "X_pcaa"]}, EmbeddingError,
         r"'X_pcaa' is not an obsm key of adata; available: 'X_pca'"),
        ({"embedding": "X_pca", "label_key": "cell_type"}, DatasetError, r"label_key 'cell_type' is not an obs col"),
        ({"embedding": "X_pca", "batch_key": "batch"}, DatasetError, r"batch_key 'batch' is not an obs column"),
        ({"embedding": ["X_pca", "X_nan"]}, EmbeddingError,
         rf"obsm\['X_nan'\]: 2 of 700 rows have NaN.*{re.escape(adata.obs_names[3])}"),
        ({"embedding": {"short": np.ones((10, 3)) * np.arange(10)[:, None]}}, EmbeddingError,
         r"10 rows, but adata has 700 cells"),
        ({"embedding": {"long": np.vstack([x, x[:5]])}}, EmbeddingError,
         r"'long': 3 of 705 rows have NaN.*row indices 3, 5, 703"),
        ({"embedding": adata.obsm["X_pca"]}, UsageError, r"obsm key, a list of them, or a mapping"),
        ({"embedding": "X_pca", "tasks": ["clusterin"]}, UnknownNameError, r"did you mean 'clustering'"),
        ({}, UsageError, r"nothing to score"),
        ({"embedding": "X_pca", "seeds": ()}, UsageError, r"seeds"),
        ({"embedding": {"pca": adata.obsm["X_pca"]}, "baseline": True}, UsageError, r"named 'pca'"),
        ({"embedding": "X_pca", "baseline": True}, DatasetError, r"negative values.*scaled"),
        ({"embedding": "X_pca", "baseline": True, "layer": "counts"}, DatasetError, r"layer 'counts' is not in adata"),
    ]
    for kwargs, error, pattern in cases:
        kwargs.setdefault("label_key", "louvain")
        with pytest.raises(error, match=pattern):
            czb.evaluate(adata, **kwargs)
    assert "czb" not in adata.uns


def test_cells_without_a_label_are_warned_about_and_left_out(pbmc):
    adata = fresh(pbmc)
    labels = adata.obs["louvain"].astype(object)
    labels.iloc[:50] = None
    adata.obs["partial"] = labels
    with pytest.warns(DatasetWarning, match="50 of 700 cells have no value in label_key 'partial'"):
        scores = czb.evaluate(adata, embedding="X_pca", tasks=["embedding"], label_key="partial")
    assert set(scores["status"]) == {"ok"}


# --------------------------------------------------------------------------- datasets


def test_load_catalog_datasets_offline():
    pbmc = czb.datasets.load("pbmc68k_reduced", offline=True)
    assert pbmc.shape == (700, 765)
    assert pbmc.uns["czb_dataset"]["label_key"] == "bulk_labels"
    assert pbmc.uns["czb_dataset"]["expression"] == "log_normalized"
    assert float(pbmc.X.min()) >= 0  # the spec's layer (raw, log-normalised), not scanpy's scaled X
    tiny = czb.datasets.load("synthetic_cells_tiny")
    assert tiny.shape == (300, 500)
    assert {"cell_type", "batch", "time_point"} <= set(tiny.obs.columns)
    assert tiny.uns["czb_dataset"]["batch_key"] == ["batch"]
    assert len(tiny.uns["czb_dataset"]["sha256"]) == 64
    with pytest.raises(UnknownNameError, match="did you mean 'pbmc68k_reduced'"):
        czb.datasets.load("pbmc68k_reducd")
    with pytest.raises(FetchError):  # remote, not cached, and offline: no download tried
        czb.datasets.load("tsv2_blood", offline=True)


def test_load_reads_extra_config_dirs(tmp_path):
    (tmp_path / "mine.yaml").write_text(textwrap.dedent("""\
        datasets:
          my_cells:
            uri: synthetic:planted_cells
            params: {n_cells: 40, n_genes: 60, n_cell_types: 2, n_batches: 1, seed: 1}
            organism: human
            label_key: cell_type
    """))
    with pytest.raises(UnknownNameError):
        czb.datasets.load("my_cells")
    assert czb.datasets.load("my_cells", config_dir=tmp_path).shape == (40, 60)
    assert czb.datasets.load("my_cells", config_dir=[str(tmp_path)]).uns["czb_dataset"]["name"] == "my_cells"


# --------------------------------------------------------------------------- docs and imports


@pytest.mark.parametrize("module", [czb.api, czb.datasets], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert outcome.attempted > 0 and outcome.failed == 0


def test_docs_walkthrough_runs():
    """Every ```python block of docs/python_api.md, in order, in one namespace."""
    blocks = re.findall(r"^```python\n(.*?)^```", DOCS.read_text(), flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) >= 5
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks):
            exec(compile(block, f"{DOCS.name} block {i + 1}", "exec"), namespace)  # noqa: S102 - our docs
    scores, table = namespace["scores"], namespace["table"]
    assert list(scores["model"].unique()) == ["X_pca", "X_umap", "pca"]
    assert namespace["problems"].empty
    assert list(table.columns) == ["X_pca", "X_umap", "pca"]
    assert table.loc[("clustering", "adjusted_rand_index"), "X_pca"] > 0.5
    assert set(namespace["baseline_scores"]["model"]) == {"pca"}


def test_import_czb_stays_light():
    """``import czb`` loads no anndata/pandas/scanpy; ``czb.evaluate`` and ``czb.datasets``
    load on first use."""
    code = (
        "import json, sys, czb; light = sorted(m for m in ('anndata', 'pandas', 'scanpy') if m in sys.modules); "
        "f = czb.evaluate; d = czb.datasets.load; "
        "print(json.dumps([light, f.__module__, d.__module__, 'evaluate' in dir(czb)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], "czb.api", "czb.datasets", True]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        czb.nope  # noqa: B018


def test_the_baseline_is_the_data_before_integration(pbmc):
    """With the baseline, batch integration compares each embedding with it
    (pcr_comparison); without, that metric alone is left out."""
    kwargs = dict(embedding="X_umap", tasks=["batch_integration"], label_key="louvain", batch_key="phase",
                  seeds=(0,), key_added=None, layer="raw", expression="log_normalized")
    with_pca = czb.evaluate(fresh(pbmc), baseline=True, **kwargs)
    without = czb.evaluate(fresh(pbmc), **kwargs)
    assert set(with_pca["status"]) == set(without["status"]) == {"ok"}
    metrics = {m: set(with_pca[with_pca["model"] == m]["metric"]) for m in ("X_umap", "pca")}
    assert all("pcr_comparison" in names for names in metrics.values())
    assert "pcr_comparison" not in set(without["metric"])
    # The baseline against itself explains as much batch variance as before: no change.
    own = with_pca[(with_pca["model"] == "pca") & (with_pca["metric"] == "pcr_comparison")]["value"]
    assert own.iloc[0] == pytest.approx(0.0, abs=1e-9)
