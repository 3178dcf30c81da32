"""The perturbation-analysis hierarchy on a planted screen: PCA of log-normalised counts
must beat a random embedding on every task, and the random embedding must sit at the
paper's chance levels."""

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.preprocessing import StandardScaler

from czb.core.errors import DatasetError
from czb.data.dataset import parse_control_flags
from czb.data.relationship_sources import load_sources
from czb.data.synthetic import KNOWN_COMPLEXES
from czb.data.synthetic.screen import planted_screen
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.expression import Expression, log_normalize
from czb.evaluation.perturbation.hierarchy.screen_task import ScreenTask
from czb.evaluation.registry import TASKS, get_task, load_all
from czb.evaluation.runner import run_task

load_all()
SCREEN_TASKS = sorted(n for n, t in TASKS.items() if issubclass(t, ScreenTask))
FAST = ("none", "center")


def pca(X, n=50):
    from sklearn.decomposition import PCA

    return PCA(n, random_state=0).fit_transform(X)


def context(adata, X, sources=("known_complexes",)):
    return EvaluationContext(
        X,
        labels=adata.obs["gene"].astype(str).to_numpy(),
        batches=adata.obs["gem_group"].astype(str).to_numpy(),
        roles={"control": adata.obs["is_control"].to_numpy()},
        expression=Expression(adata.X, adata.var_names.to_numpy()),
        relationship_sources=list(sources),
        relationships=load_sources(sources),
    )


@pytest.fixture(scope="module")
def screen():
    return planted_screen(seed=0)


@pytest.fixture(scope="module")
def contexts(screen):
    good = pca(log_normalize(screen.X).toarray())
    random = np.random.default_rng(1).normal(size=good.shape)
    return {"pca": context(screen, good), "random": context(screen, random)}


def score(ctx, name, postprocessing=FAST, seeds=(0,), **params):
    result = run_task(get_task(name)(postprocessing=postprocessing, **params), ctx, seeds, raise_errors=True)
    assert result.status == "ok", result.error
    return result


def n_train_perturbations(screen):
    perts = screen.obs.loc[~screen.obs["is_control"], "gene"].nunique()
    return int(0.7 * perts)


def test_every_hierarchy_task_runs_on_the_tiny_screen():
    """Each registered hierarchy task scores every post-processing, with finite values."""
    adata = planted_screen(n_genes=400, n_unexpressed=20, n_singletons=6, n_complexes=8, n_batches=6,
                           n_cells_per_perturbation=9, n_control_cells_per_batch=24)
    ctx = context(adata, pca(log_normalize(adata.X).toarray(), 20))
    for name in SCREEN_TASKS:
        task = get_task(name)()
        result = run_task(task, ctx, (0, 1), raise_errors=True)
        assert result.status == "ok", (name, result.error)
        assert {m.name for m in result.metrics} == set(task.info.metrics)
        assert {m.params["postprocessing"] for m in result.metrics} == {"none", "center", "center_scale", "tvn"}
        for m in result.metrics:
            assert np.isfinite(m.value), (name, m)
            assert len(m.values_raw) == (2 if task.info.stochastic else 1)


def test_linear_probe_and_knn_beat_chance(screen, contexts):
    """Random: top-1 ≈ 1/#train perturbations, top-5 ≈ 5/#; PCA far above."""
    chance = 1 / n_train_perturbations(screen)
    for name, top1, top5 in (("perturbation_linear_probe", "linear_probe_top1", "linear_probe_top5"),
                             ("perturbation_knn", "knn_top1", "knn_top5")):
        good = score(contexts["pca"], name)
        rnd = score(contexts["random"], name)
        assert rnd.metric(top1, postprocessing="none").value == pytest.approx(chance, abs=2.5 * chance)
        assert rnd.metric(top5, postprocessing="none").value == pytest.approx(5 * chance, abs=3 * chance)
        assert good.metric(top1, postprocessing="center").value > 10 * chance
        assert good.metric(top5, postprocessing="center").value > 0.3


def test_knn_task_equals_scikit_learn_vote(contexts):
    """The kNN task's top-k accuracies equal scikit-learn's distance-weighted
    KNeighborsClassifier on the same (capped, perturbation-stratified) reference with
    k = floor(sqrt(n)) made odd; a true class without votes is a miss."""
    from sklearn.neighbors import KNeighborsClassifier

    from czb.evaluation.perturbation.hierarchy.design import stratified_subsample
    from czb.evaluation.perturbation.hierarchy.knn_organization import default_k
    from czb.evaluation.perturbation.hierarchy.ranking import class_codes, topk_hits
    from czb.evaluation.perturbation.hierarchy.screen_task import (
        postprocessed,
        screen_design,
        screen_split,
    )

    assert [default_k(n) for n in (1, 4, 99, 100, 121, 100_000)] == [1, 3, 9, 11, 11, 317]
    ctx = contexts["pca"]
    result = score(ctx, "perturbation_knn", ("center",), max_reference_cells=400)
    design, split = screen_design(ctx), screen_split(ctx, 0.7, 0)
    X = postprocessed(ctx, "center")
    reference = split.train[~design.controls[split.train]]
    reference = reference[stratified_subsample(design.perturbations[reference], 400, seed=0)]
    query = split.test1[~design.controls[split.test1]]
    k = default_k(len(reference))
    clf = KNeighborsClassifier(n_neighbors=k, weights=lambda d: 1.0 / (d + 1e-5))
    clf.fit(X[reference], design.perturbations[reference])
    proba = clf.predict_proba(X[query])
    codes = class_codes(clf.classes_, design.perturbations[query])
    voted = (codes >= 0) & (proba[np.arange(len(query)), np.maximum(codes, 0)] > 0)
    for t, name in ((1, "knn_top1"), (5, "knn_top5")):
        expected = np.mean(topk_hits(proba, codes, t) & voted)
        assert result.metric(name).value == pytest.approx(expected, abs=1e-12)


def test_linear_probe_task_equals_scikit_learn(contexts):
    """The linear probe's top-k accuracies equal scikit-learn's LogisticRegression (lbfgs,
    C = 1) on standardised train cells, up to the float32 fit (within one test cell in 100)."""
    from sklearn.linear_model import LogisticRegression

    from czb.evaluation.perturbation.hierarchy.ranking import class_codes, topk_hits
    from czb.evaluation.perturbation.hierarchy.screen_task import (
        postprocessed,
        screen_design,
        screen_split,
    )

    ctx = contexts["pca"]
    result = score(ctx, "perturbation_linear_probe", ("center",))
    design, split = screen_design(ctx), screen_split(ctx, 0.7, 0)
    X = postprocessed(ctx, "center").astype(np.float64)
    train = split.train[~design.controls[split.train]]
    test = split.test1[~design.controls[split.test1]]
    scaler = StandardScaler().fit(X[train])
    model = LogisticRegression(C=1.0, max_iter=1000).fit(scaler.transform(X[train]), design.perturbations[train])
    proba = model.predict_proba(scaler.transform(X[test]))
    codes = class_codes(model.classes_, design.perturbations[test])
    for t, name in ((1, "linear_probe_top1"), (5, "linear_probe_top5")):
        expected = np.mean(topk_hits(proba, codes, t))
        assert result.metric(name).value == pytest.approx(expected, abs=0.01)


def test_consistency_random_is_at_alpha_and_pca_is_near_one(screen, contexts):
    """Without signal about 5% of perturbations pass p < 0.05; with planted effects nearly all do."""
    rnd = score(contexts["random"], "perturbation_consistency").metric("perturbation_consistency",
                                                                        postprocessing="none")
    good = score(contexts["pca"], "perturbation_consistency").metric("perturbation_consistency",
                                                                      postprocessing="none")
    assert rnd.value < 0.2
    assert good.value > 0.8
    kinds = screen.obs.drop_duplicates("gene")["target_kind"].value_counts()
    assert good.params["n_null"] == kinds["unexpressed"]  # the planted unexpressed targets, and only them
    assert good.params["n_scored"] == kinds["complex"] + kinds["singleton"]


def test_recall_random_near_ten_and_pca_far_above(contexts):
    """EFAAR's recall: 10% of pairs are predicted, so a random embedding recalls ~10."""
    rnd = score(contexts["random"], "perturbation_recall")
    good = score(contexts["pca"], "perturbation_recall")
    r = rnd.metric("relationship_recall", postprocessing="none", source="known_complexes")
    g = good.metric("relationship_recall", postprocessing="none", source="known_complexes")
    assert 3 < r.value < 20
    assert g.value > 60
    n_pairs = sum(len(m) * (len(m) - 1) // 2 for m in KNOWN_COMPLEXES.values())
    assert g.params["n_pairs"] == n_pairs
    assert good.metric("relationship_map", postprocessing="none").value > 0.8
    assert rnd.metric("relationship_map", postprocessing="none").value < 0.2


def test_recall_map_excludes_controls_whatever_the_flag_type(screen):
    """Reference bug: a bool control column compared to the string "true" let controls into
    the map. Here every spelling of the flag drops them: the map has only perturbed genes."""
    X = pca(log_normalize(screen.X).toarray(), 20)
    n_perturbed = screen.obs.loc[~screen.obs["is_control"], "gene"].nunique()
    for flags in (screen.obs["is_control"], screen.obs["is_control"].map({True: "true", False: "false"}),
                  screen.obs["is_control"].map({True: "True", False: "False"}), screen.obs["is_control"].astype(int)):
        controls = parse_control_flags(flags, name="screen", key="is_control")
        assert controls.sum() == screen.obs["is_control"].sum()
        ctx = EvaluationContext(X, labels=screen.obs["gene"].astype(str).to_numpy(),
                                batches=screen.obs["gem_group"].astype(str).to_numpy(),
                                roles={"control": controls}, relationship_sources=["known_complexes"],
                                relationships=load_sources(["known_complexes"]))
        m = score(ctx, "perturbation_recall", ("none",)).metric("relationship_recall")
        assert m.params["n_genes"] == n_perturbed


def test_control_flags_reject_unknown_values():
    with pytest.raises(DatasetError, match="maybe"):
        parse_control_flags(pd.Series(["true", "maybe"]), name="d", key="ctrl")
    with pytest.raises(DatasetError, match="0/1"):
        parse_control_flags(pd.Series([0, 2]), name="d", key="ctrl")


def test_reconstruction_pca_decodes_and_random_does_not(contexts):
    good = score(contexts["pca"], "perturbation_reconstruction", ("none",))
    rnd = score(contexts["random"], "perturbation_reconstruction", ("none",))
    assert abs(rnd.metric("reconstruction_spearman").value) < 0.05
    assert good.metric("reconstruction_spearman").value > 0.3
    # Predicting no perturbation effect gives structural integrity 0.5; random is about there.
    assert rnd.metric("structural_integrity").value == pytest.approx(0.5, abs=0.08)
    assert good.metric("structural_integrity").value > rnd.metric("structural_integrity").value + 0.03


def test_reconstruction_equals_dense_reference(contexts):
    """The sparse-truth scoring gives the previous dense computation: scipy's Spearman per
    gene over test2 and per-batch control-centred Frobenius norms of dense blocks."""
    from scipy import stats

    from czb.evaluation.perturbation.hierarchy.reconstruction import RidgeDecoder
    from czb.evaluation.perturbation.hierarchy.screen_task import (
        postprocessed,
        screen_design,
        screen_split,
    )

    ctx = contexts["pca"]
    result = score(ctx, "perturbation_reconstruction", ("center",))
    design, split = screen_design(ctx), screen_split(ctx, 0.7, 0)
    X = postprocessed(ctx, "center")
    test = split.test2
    pred = RidgeDecoder(1.0).fit(X, split.train, ctx.expression).predict(X[test])
    truth = ctx.expression.rows(test).toarray()
    rho = [stats.spearmanr(pred[:, g], truth[:, g]).statistic for g in range(truth.shape[1])
           if np.ptp(truth[:, g]) > 0 and np.ptp(pred[:, g]) > 0]
    assert result.metric("reconstruction_spearman").value == pytest.approx(np.mean(rho), abs=1e-9)
    d, m = [], []
    for b in np.unique(design.batches[test]):
        rows = np.flatnonzero(design.batches[test] == b)
        ctrl = rows[design.controls[test][rows]]
        P, T = pred[rows] - pred[ctrl].mean(axis=0), truth[rows] - truth[ctrl].mean(axis=0)
        d.append(np.linalg.norm(P - T) / len(rows))
        m.append(np.linalg.norm(T) / len(rows))
    expected = 1 - np.mean(d) / (2 * np.mean(m))
    assert result.metric("structural_integrity").value == pytest.approx(expected, abs=1e-9)


def test_ilisi_random_mixes_and_centering_mixes_pca(contexts):
    """A random embedding mixes batches (normalised iLISI near 2); centring each batch on its
    controls removes the planted batch shift, so PCA's mixing improves."""
    rnd = score(contexts["random"], "perturbation_ilisi")
    good = score(contexts["pca"], "perturbation_ilisi")
    assert rnd.metric("ilisi_mean_normalized", postprocessing="none").value > 1.85
    none = good.metric("ilisi_mean_normalized", postprocessing="none").value
    centred = good.metric("ilisi_mean_normalized", postprocessing="center").value
    assert centred > none + 0.1
    # The raw mean is on [1, #batches]; normalised = 1 + (raw - 1) / (B - 1) with B = 3 test batches.
    raw = good.metric("ilisi_mean", postprocessing="none").value
    assert none == pytest.approx(1 + (raw - 1) / 2)


def test_split_tasks_share_one_split_per_seed_and_vary_with_it(contexts):
    result = score(contexts["pca"], "perturbation_knn", ("none",), seeds=(0, 1, 2))
    values = result.metric("knn_top1").values_raw
    assert len(values) == 3 and len(set(values)) > 1


def test_gene_means_never_densify_the_expression_matrix():
    """Reference bug: consistency densified the genes × cells matrix. Mean expression is read
    in row chunks: peak memory stays far below one dense copy (160 MB here)."""
    X = sp.random(20_000, 1_000, density=0.01, format="csr", random_state=0, dtype=np.float64) * 10
    expression = Expression(X.astype(np.float32), None, chunk_rows=1000)
    dense_bytes = X.shape[0] * X.shape[1] * 8
    tracemalloc.start()
    means = expression.gene_means()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < dense_bytes / 8
    assert means.shape == (1_000,)


# --------------------------------------------------------------------------- CLI, specs, table


def test_cli_runs_the_hierarchy_offline_and_prints_table_2(tmp_path, monkeypatch):
    """`czb run --task perturbation_hierarchy` expands the suite into its six tasks, scores
    PCA and random on the bundled screen without network, and prints the paper's layout."""
    from typer.testing import CliRunner

    from czb.cli import app
    from czb.core.records import read_result

    monkeypatch.setenv("CZB_OFFLINE", "1")
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", "--task", "perturbation_hierarchy", "--model", "random",
                                      "--dataset", "synthetic_screen_tiny", "--seeds", "0", "--n-jobs", "1",
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    records = [read_result(p) for p in sorted((out / "results").glob("*.json"))]
    assert {(r.model.name, r.task.name) for r in records} == {
        (m, t) for m in ("random", "pca") for t in SCREEN_TASKS}
    assert all(r.status == "ok" for r in records), [(r.task.name, r.error) for r in records if r.status != "ok"]
    assert "perturbation-analysis hierarchy" in result.stdout
    table = result.stdout.split("perturbation-analysis hierarchy")[1]
    assert "relationship_recall [known_complexes]" in table
    # PCA is the best model on the linear probe row, with its best post-processing named.
    # Plain columns two or more spaces apart (czb.cli.tables); a cell has single spaces.
    header = next(line for line in table.splitlines() if line.strip().startswith("metric")).strip().split("  ")
    header = [c.strip() for c in header if c.strip()]
    probe = [c.strip() for c in next(line for line in table.splitlines()
                                     if "linear_probe_top1" in line).strip().split("  ") if c.strip()]
    assert "*" in probe[header.index("pca")] and "(" in probe[header.index("pca")]
    assert "*" not in probe[header.index("random")]


def test_hierarchy_table_picks_the_best_postprocessing():
    from czb.core import records as R
    from czb.report.summary import hierarchy_table

    def record(model, values):
        return R.ResultRecord.model_construct(
            dataset=R.DatasetRecord(name="d", uri="", sha256=None, n_cells=1, n_genes=1),
            model=R.ModelRecord(name=model, kind="baseline", image_digest="in-process"),
            task=R.TaskRecord(name="perturbation_knn", implementation="perturbation_knn", parameters={}),
            status="ok",
            metrics=[R.MetricRecord(name="knn_top1", value=v, value_std_dev=None, values_raw=[v],
                                    params={"postprocessing": pp}) for pp, v in values.items()])

    (row,) = hierarchy_table([record("pca", {"none": 0.2, "tvn": 0.4}), record("random", {"none": 0.01})])
    assert row.cells["pca"].postprocessing == "tvn" and row.cells["pca"].value == 0.4
    assert row.cells["pca"].every == {"none": 0.2, "tvn": 0.4}
    assert row.best_model == "pca"


def test_suites_expand_and_reject_bad_definitions(tmp_path):
    from czb.core.errors import SpecError
    from czb.specs.catalog import Catalog
    from czb.specs.loading import load_spec_file

    catalog = Catalog.load()
    names = [t.name for t in catalog.resolve("task", ["perturbation_hierarchy", "perturbation_knn"])]
    assert names == SCREEN_TASKS_IN_PAPER_ORDER
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  s:\n    implementation: clustering\n    includes: [embedding]\n")
    with pytest.raises(SpecError, match="exactly one of"):
        load_spec_file(bad)
    loop = tmp_path / "loop"
    loop.mkdir()
    (loop / "t.yaml").write_text("tasks:\n  a:\n    includes: [b]\n  b:\n    includes: [a]\n")
    with pytest.raises(SpecError, match="includes itself"):
        Catalog.load([loop]).resolve("task", ["a"])


SCREEN_TASKS_IN_PAPER_ORDER = [
    "perturbation_ilisi", "perturbation_linear_probe", "perturbation_consistency", "perturbation_knn",
    "perturbation_recall", "perturbation_reconstruction",
]


def test_screen_spec_without_controls_is_reported_before_work():
    from czb.data.dataset import Dataset
    from czb.data.validation import validate_dataset
    from czb.specs.schema import DatasetSpec

    adata = planted_screen(n_genes=400, n_unexpressed=20, n_singletons=6, n_complexes=8, n_batches=6,
                           n_cells_per_perturbation=9, n_control_cells_per_batch=24)
    spec = DatasetSpec(name="s", uri="x", organism="human", label_key="gene", batch_key="gem_group",
                       control_key="not_a_column", gene_id_type="symbol")
    with pytest.raises(DatasetError, match="control_key 'not_a_column' is not an obs column"):
        validate_dataset(Dataset(spec, adata))
    spec = spec.model_copy(update={"control_key": None, "control_label": "nobody"})
    with pytest.raises(DatasetError, match="no cell is a control"):
        validate_dataset(Dataset(spec, adata))


@pytest.mark.internet
def test_pca_recalls_real_corum_far_above_random(screen, contexts, tmp_path, monkeypatch):
    """With the real CORUM file (efaar-benchmarking 1.0, fetched from PyPI), PCA of the planted
    screen recalls CORUM links far above a random embedding, which sits near 10."""
    import socket

    try:
        socket.create_connection(("files.pythonhosted.org", 443), timeout=5).close()
    except OSError:
        pytest.skip("files.pythonhosted.org is not reachable")
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path))
    corum = {name: context(screen, ctx.X, sources=("CORUM",)) for name, ctx in contexts.items()}
    good = score(corum["pca"], "perturbation_recall", ("none",), sources=("CORUM",))
    rnd = score(corum["random"], "perturbation_recall", ("none",), sources=("CORUM",))
    g, r = good.metric("relationship_recall"), rnd.metric("relationship_recall")
    assert g.params["n_pairs"] > 200  # the planted complexes' pairs, plus any CORUM links among them
    assert g.value > 50 and 3 < r.value < 20
    assert (tmp_path / "annotations" / "efaar-benchmarking-1.0" / "manifest.json").is_file()


def test_unavailable_relationship_source_fails_only_the_recall_task(screen, contexts):
    """A source that cannot be read is a failed recall record naming it, not a crashed run."""
    task = get_task("perturbation_recall")(postprocessing=("none",), sources=("/no/such/pairs.csv",))
    ctx = context(screen, contexts["pca"].X, sources=task.relationship_sources(None))
    result = run_task(task, ctx, (0,))
    assert result.status == "failed"
    assert "/no/such/pairs.csv" in result.error
