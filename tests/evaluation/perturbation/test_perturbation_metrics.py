"""Genetic perturbation prediction: DE statistics, both scorings and the baselines, each
against a reference implementation, a hand-checked case or planted truth."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from czb.data.synthetic.generators import GENERATORS
from czb.data.synthetic.perturbations import planted_perturbations
from czb.evaluation.perturbation.expression import condition_means, log_normalize
from czb.evaluation.perturbation.prediction import baselines as pb
from czb.evaluation.perturbation.prediction import metrics as pm
from czb.evaluation.perturbation.prediction.controls import match_controls
from czb.evaluation.perturbation.prediction.differential_expression import (
    benjamini_hochberg,
    differential_expression,
    top_de_genes,
)
from czb.evaluation.registry import METRICS, load_all


def bh_by_hand(p):
    """Benjamini-Hochberg straight from the definition: p_(i) * m / i, then the running
    minimum from the largest p-value down, capped at 1."""
    p = np.asarray(p, dtype=float)
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        adjusted[i] = running
    return np.array(adjusted)


@pytest.fixture(scope="module")
def small():
    """Counts of a small screen (controls, 5 singles, 2 pairs) and their log-normalised X."""
    adata = planted_perturbations(n_genes=200, n_targets=5, n_doubles=2, n_control_cells=80,
                                  n_cells_per_condition=30, seed=1)
    return adata, log_normalize(adata.X)


@pytest.fixture(scope="module")
def screen():
    """The default planted screen, log-normalised, with per-condition means."""
    adata = planted_perturbations(seed=0)
    X = log_normalize(adata.X)
    conditions = adata.obs["condition"].astype(str).to_numpy()
    labels = list(adata.obs["condition"].cat.categories)
    _, means = condition_means(X, conditions, labels)
    return adata, X, conditions, dict(zip(labels, means))


# --------------------------------------------------------------------------- #
# Registration
# --------------------------------------------------------------------------- #


def test_metrics_registered_with_metadata():
    load_all()
    for name in pm.EXPRESSION_SHIFT_METRICS + ("spearman_correlation_calculation",):
        info = METRICS[name]
        assert info.reference and info.description
    assert not METRICS["mse_top20_de"].higher_is_better and METRICS["mse_all_genes"].range == (0.0, None)
    assert METRICS["pearson_delta_top20_de"].range == (-1.0, 1.0)
    assert METRICS["jaccard_de_genes"].higher_is_better
    # cz-benchmarks' MetricType.SPEARMAN_CORRELATION_CALCULATION string
    assert pm.SPEARMAN_CORRELATION.name == "spearman_correlation_calculation"


# --------------------------------------------------------------------------- #
# Normalisation, means, BH
# --------------------------------------------------------------------------- #


def test_log_normalize_matches_scanpy(small):
    import scanpy as sc

    adata, X = small
    ref = adata.copy()
    ref.X = ref.X.astype(np.float64)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    assert abs(X - ref.X).max() < 1e-12
    dense = log_normalize(adata.X.toarray())
    np.testing.assert_allclose(dense, X.toarray(), atol=1e-12)


def test_condition_means_hand_checked():
    X = sp.csr_matrix(np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]))
    cats, means = condition_means(X, np.array(["b", "a", "a"]), ["a", "b", "c"])
    assert list(cats) == ["a", "b", "c"]
    np.testing.assert_allclose(means[:2], [[4.0, 3.0], [1.0, 0.0]])
    assert np.isnan(means[2]).all()


def test_benjamini_hochberg_by_hand():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-4, size=20), [0.5, 0.5, 1.0]])
    np.testing.assert_allclose(benjamini_hochberg(p), bh_by_hand(p), rtol=1e-12)
    # Textbook case: p = 0.01, 0.04, 0.03 -> 0.03, 0.04, 0.04
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.04, 0.03]), [0.03, 0.04, 0.04])
    assert benjamini_hochberg([np.nan, 0.01])[0] == 1.0


# --------------------------------------------------------------------------- #
# Differential expression
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("sparse", [True, False])
def test_wilcoxon_equals_mannwhitneyu(sparse):
    # Zeros, ties and negative values: every branch of the sparse ranking.
    rng = np.random.default_rng(3)
    n1, n2, n_genes = 23, 31, 40
    X = rng.integers(-2, 4, size=(n1 + n2, n_genes)).astype(float)
    X[rng.uniform(size=X.shape) < 0.4] = 0.0
    X[:, 0] = 0.0  # a gene with no stored values
    X[:, 1] = rng.normal(size=n1 + n2)  # no ties
    conditions = np.array(["g"] * n1 + ["c"] * n2)
    de = differential_expression(sp.csr_matrix(X) if sparse else X, conditions, control="c",
                                    tie_correct=True, block_size=7 * (n1 + n2))
    for j in range(1, n_genes):
        ref = stats.mannwhitneyu(X[:n1, j], X[n1:, j], use_continuity=False, method="asymptotic")
        assert de.pvals[0, j] == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15), j
        u = ref.statistic
        mean_u, sd = n1 * n2 / 2, np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12 * _tie_factor(X[:, j]))
        assert de.scores[0, j] == pytest.approx((u - mean_u) / sd, rel=1e-9, abs=1e-12)
    assert de.scores[0, 0] == 0.0 and de.pvals[0, 0] == 1.0


def _tie_factor(x):
    _, t = np.unique(x, return_counts=True)
    n = len(x)
    return 1 - (t**3 - t).sum() / (n**3 - n)


@pytest.mark.parametrize(("method", "tie_correct"), [("wilcoxon", False), ("wilcoxon", True), ("t-test", False)])
def test_de_equals_scanpy_rank_genes_groups(small, method, tie_correct):
    import anndata as ad
    import scanpy as sc

    adata, X = small
    conditions = adata.obs["condition"].astype(str).to_numpy()
    de = differential_expression(X, conditions, control="ctrl", genes=adata.var_names,
                                    method=method, tie_correct=tie_correct)
    assert list(de.conditions) == [c for c in adata.obs["condition"].cat.categories if c != "ctrl"]
    table = de.table()
    for i, condition in enumerate(de.conditions):
        rows = (conditions == condition) | (conditions == "ctrl")
        ref = ad.AnnData(X=X[rows].toarray(), obs=pd.DataFrame({"g": pd.Categorical(conditions[rows])},
                                                                 index=adata.obs_names[rows]),
                         var=pd.DataFrame(index=adata.var_names))
        sc.tl.rank_genes_groups(ref, "g", groups=[condition], reference="ctrl", method=method,
                                tie_correct=tie_correct)
        expected = sc.get.rank_genes_groups_df(ref, group=condition)
        ours = table[table["condition"] == condition]
        assert ours["gene"].tolist() == expected["names"].tolist()  # same order, ties included
        # scanpy stores scores and fold changes as float32
        np.testing.assert_allclose(ours["score"], expected["scores"], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ours["logfoldchange"], expected["logfoldchanges"], rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(ours["pval"], expected["pvals"], rtol=1e-5, atol=1e-300)
        np.testing.assert_allclose(ours["pval_adj"], expected["pvals_adj"], rtol=1e-5, atol=1e-300)
        np.testing.assert_allclose(de.pvals_adj[i], bh_by_hand(de.pvals[i]), rtol=1e-12)


def test_de_matched_controls_and_gene_filter(small):
    adata, X = small
    conditions = adata.obs["condition"].astype(str).to_numpy()
    ctrl = np.flatnonzero(conditions == "ctrl")
    first, second = list(adata.obs["condition"].cat.categories[1:3])
    reference = {first: ctrl[:30], second: ctrl[30:70]}
    de = differential_expression(X, conditions, reference=reference, min_cells_per_gene=45)
    assert list(de.n_cells) == [30, 30]
    for i, condition in enumerate(reference):
        rows = np.concatenate([np.flatnonzero(conditions == condition), reference[condition]])
        sub = X[rows]
        one = differential_expression(sub, conditions[rows], control="ctrl", groups=[condition])
        detected = np.asarray((sub > 0).sum(axis=0)).ravel()
        tested = detected >= 45
        assert 0 < (~tested).sum() < len(tested) - 50 and np.isnan(de.scores[i, ~tested]).all()
        np.testing.assert_allclose(de.scores[i, tested], one.scores[0, tested])
        # BH over the tested genes only
        np.testing.assert_allclose(de.pvals_adj[i, tested], bh_by_hand(one.pvals[0, tested]), rtol=1e-12)
        assert de.n_reference[i] == len(reference[condition])
    assert len(de.table()) == np.isfinite(de.scores).sum()


def test_top_de_genes_do_not_depend_on_float_noise():
    """Statistics equal but for their last bits (another CPU's kernels) tie, and the tie
    goes to the lower index, whichever of the two came out larger."""
    base = np.array([[3.0, 1.0, 2.0, 2.0, 0.5]])
    for noise in (1e-15, -1e-15):
        scores = base.copy()
        scores[0, 3] += noise * 2.0  # gene 3 ties gene 2 but for float noise
        assert top_de_genes(scores, 3).tolist() == [[0, 2, 3]]
        assert top_de_genes(scores, 2).tolist() == [[0, 2]]
    assert top_de_genes(np.array([[2.0, 2.0 + 1e-6]]), 1).tolist() == [[1]]  # a real difference counts


def test_significant_rounds_relative_to_each_value():
    from czb.evaluation.perturbation.prediction.differential_expression import significant

    values = np.array([123456.789, -0.000123456789, 0.0, 1.0])
    assert significant(values, 3).tolist() == [123000.0, -0.000123, 0.0, 1.0]


def test_top_de_genes_takes_both_directions():
    scores = np.array([[0.5, -9.0, 3.0, np.nan, -0.1, 8.0]])
    assert top_de_genes(scores, 3).tolist() == [[1, 5, 2]]
    assert top_de_genes(scores, 6)[0, -1] == 3  # untested last


def test_match_controls_one_to_one_within_groups():
    rng = np.random.default_rng(0)
    n = 400
    conditions = np.array(["ctrl"] * 250 + ["A"] * 60 + ["B"] * 60 + ["C"] * 30)
    groups = rng.integers(0, 3, n)
    features = np.column_stack([rng.lognormal(8, 0.3, n), rng.lognormal(7, 0.2, n)])
    names = np.array([f"c{i}" for i in range(n)])
    matched = match_controls(names, conditions, "ctrl", groups=groups, features=features, min_cells=50)
    assert set(matched) == {"A", "B"}  # C has fewer than 50 cells
    position = {name: i for i, name in enumerate(names)}
    for condition, pairs in matched.items():
        assert len(set(pairs.values())) == len(pairs) == (conditions == condition).sum()
        for t, c in pairs.items():
            assert conditions[position[c]] == "ctrl" and groups[position[t]] == groups[position[c]]
    # An optimal assignment: no swap of two pairs lowers the summed distance (group 0 of A,
    # features standardised over its perturbed cells and group-0 controls, as matched).
    f = np.log1p(features)
    pairs = [(position[t], position[c]) for t, c in matched["A"].items() if groups[position[t]] == 0]
    pool = np.concatenate([[t for t, _ in pairs], np.flatnonzero((conditions == "ctrl") & (groups == 0))])
    sd = f[pool].std(0)
    d = lambda a, b: np.linalg.norm((f[a] - f[b]) / sd)  # noqa: E731
    assert not any(d(t1, c2) + d(t2, c1) < d(t1, c1) + d(t2, c2) - 1e-9 for t1, c1 in pairs for t2, c2 in pairs)


# --------------------------------------------------------------------------- #
# Formulation 1: expression shift
# --------------------------------------------------------------------------- #


def test_expression_shift_hand_checked():
    control = np.zeros(6)
    observed = np.array([[2.0, -1.0, 0.5, 0.0, 0.0, 0.0]])
    predicted = np.array([[1.0, -1.0, 0.0, 0.5, 0.0, 0.0]])
    top = np.array([[0, 1, 2]])
    s = pm.expression_shift_scores(predicted, observed, control, top, k_jaccard=3)
    assert s["mse_top20_de"].iloc[0] == pytest.approx((1 + 0 + 0.25) / 3)
    assert s["mse_all_genes"].iloc[0] == pytest.approx((1 + 0 + 0.25 + 0.25) / 6)
    assert s["pearson_delta_top20_de"].iloc[0] == pytest.approx(stats.pearsonr([1, -1, 0], [2, -1, 0.5]).statistic)
    assert s["pearson_delta_all_genes"].iloc[0] == pytest.approx(
        stats.pearsonr(predicted[0], observed[0]).statistic)
    # predicted top-3 |change|: genes {0, 1, 3}; observed {0, 1, 2}: 2 shared of 4
    assert s["jaccard_de_genes"].iloc[0] == pytest.approx(0.5)
    assert not s["pearson_undefined"].iloc[0]


def test_expression_shift_no_change_prediction():
    # Predicting the control mean: Pearson undefined -> 0 (flagged), no gene moved -> Jaccard 0.
    control = np.array([1.0, 2.0, 3.0, 4.0])
    observed = control + np.array([[1.0, 0.0, -2.0, 0.5]])
    s = pm.expression_shift_scores(control[None, :], observed, control, np.array([[2, 0]]), k_jaccard=2)
    assert s["pearson_delta_top20_de"].iloc[0] == 0.0 and s["pearson_undefined"].iloc[0]
    assert s["jaccard_de_genes"].iloc[0] == 0.0
    assert s["mse_top20_de"].iloc[0] == pytest.approx((4 + 1) / 2)


def test_expression_shift_pearson_matches_scipy_on_random_rows():
    rng = np.random.default_rng(5)
    pred, obs, ctrl = rng.normal(size=(7, 50)), rng.normal(size=(7, 50)), rng.normal(size=50)
    top = top_de_genes(rng.normal(size=(7, 50)), 20)
    s = pm.expression_shift_scores(pred, obs, ctrl, top)
    for i in range(7):
        ref_top = stats.pearsonr(pred[i, top[i]] - ctrl[top[i]], obs[i, top[i]] - ctrl[top[i]]).statistic
        assert s["pearson_delta_top20_de"].iloc[i] == pytest.approx(ref_top, abs=1e-12)
        assert s["pearson_delta_all_genes"].iloc[i] == pytest.approx(stats.pearsonr(pred[i] - ctrl, obs[i] - ctrl).statistic, abs=1e-12)
        assert s["mse_top20_de"].iloc[i] == pytest.approx(np.mean((pred[i, top[i]] - obs[i, top[i]]) ** 2))


def test_planted_truth_ranking_on_held_out_pairs(screen):
    adata, X, conditions, means = screen
    labels = list(means)
    pairs = [c for c in labels if "+" in c]
    held_out = pairs[::2]
    train = [c for c in labels if c != "ctrl" and c not in held_out]
    control = means["ctrl"]
    observed = np.stack([means[c] for c in held_out])
    de = differential_expression(X, conditions, control="ctrl", groups=held_out, genes=adata.var_names)
    top = top_de_genes(de.scores, 20)
    additive = pb.additive_linear(np.stack([means[c] for c in train]), train, control, held_out, adata.var_names)
    assert set(additive.sources) == {"observed"}
    summary = {
        name: pm.summarize_expression_shift(pm.expression_shift_scores(pred, observed, control, top))
        for name, pred in [("control", pb.control_mean(control, len(held_out))),
                           ("additive", additive.profiles), ("perfect", observed)]
    }
    c, a, p = summary["control"], summary["additive"], summary["perfect"]
    assert a["mse_top20_de"] < 0.1 * c["mse_top20_de"]
    assert a["mse_all_genes"] < 0.5 * c["mse_all_genes"]
    assert a["pearson_delta_top20_de"] > 0.9 and c["pearson_delta_top20_de"] == 0.0
    assert a["pearson_delta_all_genes"] > 0.7 and c["pearson_delta_all_genes"] == 0.0
    assert a["jaccard_de_genes"] > 0.5 and c["jaccard_de_genes"] == 0.0
    assert p["mse_top20_de"] == 0.0 and p["mse_all_genes"] == 0.0
    assert p["pearson_delta_top20_de"] == pytest.approx(1.0) and p["pearson_delta_all_genes"] == pytest.approx(1.0)
    assert p["jaccard_de_genes"] == 1.0


# --------------------------------------------------------------------------- #
# Baselines
# --------------------------------------------------------------------------- #


def test_additive_hand_checked():
    control = np.array([1.0, 1.0, 1.0])
    train = np.array([[2.0, 1.0, 1.0], [1.0, 0.0, 1.5], [5.0, 5.0, 5.0]])
    labels = ["A+ctrl", "B", "A+B"]
    out = pb.additive_linear(train, labels, control, ["A+B", "B+A", "ctrl", "A"], ["A", "B", "C"])
    np.testing.assert_allclose(out.profiles, [[2.0, 0.0, 1.5], [2.0, 0.0, 1.5], [1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    assert out.sources == ["observed", "observed", "control", "observed"]
    np.testing.assert_allclose(pb.control_mean(control, 2), [control, control])
    assert pb.split_condition("A+ctrl") == ("A",) and pb.split_condition("ctrl") == ()


def test_linear_model_equals_paper_formula_with_sklearn_pca(screen):
    from sklearn.decomposition import PCA

    adata, _, _, means = screen
    singles = [c for c in means if c != "ctrl" and "+" not in c]
    train = singles[:16]
    profiles = np.stack([means[c] for c in train])
    control = means["ctrl"]
    model = pb.fit_linear_model(profiles, train, control, adata.var_names, n_components=10, ridge=0.1)
    # Their R code: prcomp on the genes x conditions pseudobulk matrix (ctrl included),
    # A = B-columns = PC scores, K = (A'A + l)^-1 A' (Y - center) B' (BB' + l)^-1.
    X = np.column_stack([profiles.T, control])
    A = PCA(n_components=10, svd_solver="full").fit_transform(X)
    rows = [list(adata.var_names).index(c) for c in train]
    B = np.column_stack([A[rows].T, np.zeros(10)])
    Y = np.column_stack([profiles.T - control[:, None], np.zeros(len(control))])
    center = Y.mean(axis=1)
    K = (np.linalg.inv(A.T @ A + 0.1 * np.eye(10)) @ A.T @ (Y - center[:, None]) @ B.T
         @ np.linalg.inv(B @ B.T + 0.1 * np.eye(10)))
    target = singles[20]
    expected = A @ K @ A[list(adata.var_names).index(target)] + center
    np.testing.assert_allclose(model.predict_change(target), expected, atol=1e-8)


def test_linear_model_beats_control_on_unseen_singles(screen):
    adata, X, conditions, means = screen
    singles = [c for c in means if c != "ctrl" and "+" not in c]
    held_out = singles[::3]
    train = [c for c in singles if c not in held_out]
    control = means["ctrl"]
    observed = np.stack([means[c] for c in held_out])
    top = top_de_genes(differential_expression(X, conditions, control="ctrl", groups=held_out).scores, 20)
    linear = pb.additive_linear(np.stack([means[c] for c in train]), train, control, held_out, adata.var_names)
    assert set(linear.sources) == {"linear"}
    lin = pm.summarize_expression_shift(pm.expression_shift_scores(linear.profiles, observed, control, top))
    ctl = pm.summarize_expression_shift(
        pm.expression_shift_scores(pb.control_mean(control, len(held_out)), observed, control, top))
    assert lin["mse_top20_de"] < 0.5 * ctl["mse_top20_de"]
    assert lin["pearson_delta_top20_de"] > 0.5 and lin["jaccard_de_genes"] > 0.3
    # An unmeasured gene falls back to the mean training change.
    out = pb.additive_linear(np.stack([means[c] for c in train]), train, control, ["NOTAGENE"], adata.var_names)
    assert out.sources == ["fallback"]


# --------------------------------------------------------------------------- #
# Formulation 2: masked genes
# --------------------------------------------------------------------------- #


def cz_sample_de_genes(de, fraction, min_masked, seed):
    """cz-benchmarks 0.15.1 ``sample_de_genes``, as it draws (global legacy RNG)."""
    np.random.seed(seed)
    out = {}
    for target in de["condition"].unique():
        names = de[de["condition"] == target]["gene"].values
        n = int(len(names) * fraction)
        if n >= min_masked:
            out[target] = np.random.choice(names, size=n, replace=False).tolist()
    return out


def _de_table(sizes):
    return pd.DataFrame({
        "condition": np.repeat([f"P{i}" for i in range(len(sizes))], sizes),
        "gene": np.concatenate([[f"G{j}" for j in range(n)] for n in sizes]),
        "logfoldchange": np.linspace(-3, 3, sum(sizes)),
    })


def test_masking_is_seeded_and_matches_cz_benchmarks_draws():
    table = _de_table([40, 9, 10, 25, 3])
    masked = pm.sample_masked_genes(table, seed=42)
    assert masked.genes == cz_sample_de_genes(table, 0.5, 5, 42)
    assert masked.genes == pm.sample_masked_genes(table, seed=42).genes
    assert masked.genes != pm.sample_masked_genes(table, seed=7).genes
    assert {c: len(g) for c, g in masked.genes.items()} == {"P0": 20, "P2": 5, "P3": 12}
    assert masked.skipped == {"P1": 9, "P4": 3}  # int(9 * 0.5) = 4 < 5 masked genes


def test_masked_gene_scores_hand_checked():
    cells = ["t1", "t2", "c1", "c2"]
    genes = ["G0", "G1", "G2", "G3", "G4", "G5"]
    pred = np.array([
        [4.0, 1.0, 2.0, 9.0, 1.0, 3.0],
        [2.0, 1.0, 2.0, 9.0, 1.0, 5.0],
        [1.0, 2.0, 2.0, 9.0, 1.0, 1.0],
        [1.0, 2.0, 2.0, 9.0, 1.0, 1.0],
    ])
    de = pd.DataFrame({"condition": "P", "gene": ["G0", "G1", "G5", "G2", "GX"],
                       "logfoldchange": [1.5, -1.0, 2.0, 0.1, 4.0]})
    masked = {"P": ["G0", "G1", "G5", "GX"]}  # GX is not predicted: left out
    cmap = {"P": {"t1": "c1", "t2": "c2", "t9": "c1"}}  # t9 absent: pair dropped
    s = pm.masked_gene_scores(pred, cell_index=cells, gene_index=genes, de_table=de, masked=masked, control_map=cmap)
    pred_change = np.log(np.array([3.0, 1.0, 4.0]) / np.array([1.0, 2.0, 1.0]))
    expected = stats.spearmanr([1.5, -1.0, 2.0], pred_change).statistic
    row = s.iloc[0]
    assert (row["n_genes"], row["n_cells"], row["operation"]) == (3, 2, "ratio")
    assert row["spearman_correlation_calculation"] == pytest.approx(expected)
    # A non-positive mean switches "ratio" to the difference; constant predictions give 0.
    neg = pred.copy()
    neg[:, 1] -= 5
    s = pm.masked_gene_scores(neg, cell_index=cells, gene_index=genes, de_table=de, masked=masked, control_map=cmap)
    assert s["operation"].iloc[0] == "difference"
    flat = np.ones_like(pred)
    s = pm.masked_gene_scores(sp.csr_matrix(flat), cell_index=cells, gene_index=genes, de_table=de,
                              masked=masked, control_map=cmap)
    assert s["spearman_correlation_calculation"].iloc[0] == 0.0


def test_masked_gene_pipeline_on_planted_screen(screen):
    adata, X, conditions, _ = screen
    features = np.column_stack([np.asarray(adata.X.sum(1)).ravel(), np.asarray((adata.X > 0).sum(1)).ravel()])
    singles = [c for c in adata.obs["condition"].cat.categories if c != "ctrl" and "+" not in c]
    keep = np.isin(conditions, singles + ["ctrl"])
    cmap = match_controls(adata.obs_names[keep], conditions[keep], "ctrl",
                             groups=adata.obs["batch"].to_numpy()[keep], features=features[keep], min_cells=50)
    assert set(cmap) == set(singles)
    reference = {c: adata.obs_names.get_indexer(list(m.values())) for c, m in cmap.items()}
    de = differential_expression(X, conditions, reference=reference, genes=adata.var_names)
    table = de.table(pval_threshold=1e-4, min_abs_logfoldchange=1.0)
    masked = pm.sample_masked_genes(table, seed=42)
    n_de = table.groupby("condition").size()
    assert all(int(n_de[c] * 0.5) >= 5 for c in masked.genes)
    assert all(int(n * 0.5) < 5 for n in masked.skipped.values())
    assert set(masked.genes) | set(masked.skipped) == set(n_de.index)
    # Masked entries: the masked genes of each condition's matched perturbed cells.
    mask = pm.masked_entries(adata.obs_names, adata.var_names, masked, cmap)
    assert mask.sum() == sum(len(g) * len(cmap[c]) for c, g in masked.genes.items())
    # The observed expression as "prediction" correlates strongly; the control mean not at all.
    observed = pm.masked_gene_scores(X, cell_index=adata.obs_names, gene_index=adata.var_names,
                                     de_table=table, masked=masked, control_map=cmap)
    assert set(observed["condition"]) == set(masked.genes)
    assert observed["spearman_correlation_calculation"].mean() > 0.8
    control_profile = np.asarray(X[conditions == "ctrl"].mean(axis=0)).ravel()
    flat = np.tile(control_profile, (X.shape[0], 1))
    none = pm.masked_gene_scores(flat, cell_index=adata.obs_names, gene_index=adata.var_names,
                                 de_table=table, masked=masked, control_map=cmap)
    assert (none["spearman_correlation_calculation"] == 0.0).all()


# --------------------------------------------------------------------------- #
# The generator
# --------------------------------------------------------------------------- #


def test_planted_perturbations_structure_and_determinism():
    a = planted_perturbations(n_genes=120, n_targets=6, n_doubles=4, n_control_cells=50, n_cells_per_condition=20, seed=3)
    b = planted_perturbations(n_genes=120, n_targets=6, n_doubles=4, n_control_cells=50, n_cells_per_condition=20, seed=3)
    c = planted_perturbations(n_genes=120, n_targets=6, n_doubles=4, n_control_cells=50, n_cells_per_condition=20, seed=4)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and (a.X != c.X).nnz > 0
    assert GENERATORS["planted_perturbations"] is planted_perturbations
    assert list(a.obs.columns) == ["condition", "control", "batch"]
    labels = list(a.obs["condition"].cat.categories)
    assert labels[0] == "ctrl" and sum("+" in x for x in labels) == 4 and len(labels) == 11
    assert (a.obs["control"] == (a.obs["condition"] == "ctrl")).all()
    for label in labels[1:]:
        assert all(g in a.var_names for g in label.split("+"))
    assert a.var["ensembl_id"].str.fullmatch(r"ENSG\d{11}").all() and not a.var_names.str.startswith("ENSG").any()
    assert np.array_equal(a.X.data, np.round(a.X.data)) and (np.asarray(a.X.sum(1)) > 0).all()


def test_planted_pairs_are_additive_on_log_expression(screen):
    adata, _, _, means = screen
    control = means["ctrl"]
    for pair in [c for c in means if "+" in c][:6]:
        a, b = pair.split("+")
        summed = (means[a] - control) + (means[b] - control)
        moved = np.argsort(-np.abs(summed))[:50]  # elsewhere the change is mostly noise
        assert stats.pearsonr(summed[moved], (means[pair] - control)[moved]).statistic > 0.95
        for target in (a, b):  # both targets knocked down in the pair
            assert (means[pair] - control)[adata.var_names.get_loc(target)] < -0.5
