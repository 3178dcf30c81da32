"""Perturbation-analysis hierarchy (Bendidi et al. 2024): the screen split, stratified
subsampling, the four post-processings and the metrics, each against scikit-learn/scipy,
a direct loop written here, or a hand-checked case."""

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats
from scipy.linalg import fractional_matrix_power
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from sklearn.metrics import pairwise_distances
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors
from sklearn.preprocessing import StandardScaler

from czb.core.errors import NotApplicableError, TaskError
from czb.evaluation.neighbors import knn_search
from czb.evaluation.perturbation.expression import Expression
from czb.evaluation.perturbation.hierarchy.consistency_knn_metrics import (
    empirical_pvalues,
    knn_vote_ranks,
    mean_pairwise_cosine,
    vote_ranks,
    weighted_votes,
)
from czb.evaluation.perturbation.hierarchy.design import (
    ScreenDesign,
    split_screen,
    stratified_subsample,
    unique_codes,
)
from czb.evaluation.perturbation.hierarchy.mixing_probe_metrics import SoftmaxRegression, ilisi
from czb.evaluation.perturbation.hierarchy.postprocessing import postprocess
from czb.evaluation.perturbation.hierarchy.ranking import topk_hits, topk_ranks
from czb.evaluation.perturbation.hierarchy.recall_metrics import (
    COSINE_DECIMALS,
    cosine_matrix,
    cosine_mean_average_precisions,
    mean_average_precision,
    tail_recall,
    tail_recall_upper_bound,
    upper_triangle,
)
from czb.evaluation.perturbation.hierarchy.reconstruction_metrics import (
    _column_ranks,
    centred_distance_terms,
    per_gene_spearman,
    sparse_column_ranks,
    structural_integrity,
)

# --------------------------------------------------------------------------- helpers


def random_design(n_batches=10, n_perts=40, n_perturbed=1500, controls_per_batch=15, seed=0):
    """A screen with controls in every batch and perturbed cells spread over batches."""
    rng = np.random.default_rng(seed)
    perts = np.array([f"G{i:02d}" for i in rng.integers(0, n_perts, n_perturbed)])
    batches = np.array([f"b{i}" for i in rng.integers(0, n_batches, n_perturbed)])
    ctrl_batches = np.repeat([f"b{i}" for i in range(n_batches)], controls_per_batch)
    labels = np.concatenate([perts, np.full(len(ctrl_batches), "non-targeting")])
    controls = np.concatenate([np.zeros(n_perturbed, bool), np.ones(len(ctrl_batches), bool)])
    all_batches = np.concatenate([batches, ctrl_batches])
    order = rng.permutation(len(labels))
    return ScreenDesign.from_roles(labels[order], controls[order], all_batches[order])


def harmony_lisi_reference(X, labels, perplexity, tol=1e-5, n_iter=50):
    """harmonypy's compute_lisi, one cell at a time: 3*perplexity neighbours (self dropped),
    bisection on beta of exp(-beta d) to entropy log(perplexity), LISI = 1 / sum_b p_b^2."""
    k = int(3 * perplexity)
    nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
    dist, idx = nn.kneighbors(X)
    dist, idx = dist[:, 1:], idx[:, 1:]
    log_u = np.log(perplexity)
    out = np.empty(len(X))
    for i in range(len(X)):
        d = dist[i]

        def hbeta(beta, d=d):
            P = np.exp(-d * beta)
            sum_p = P.sum()
            if sum_p == 0:
                return 0.0, np.zeros_like(d)
            H = np.log(sum_p) + beta * np.sum(d * P) / sum_p
            return H, P / sum_p

        beta, betamin, betamax = 1.0, -np.inf, np.inf
        H, P = hbeta(beta)
        h_diff = H - log_u
        for _ in range(n_iter):
            if abs(h_diff) < tol:
                break
            if h_diff > 0:
                betamin = beta
                beta = beta * 2 if betamax == np.inf else (beta + betamax) / 2
            else:
                betamax = beta
                beta = beta / 2 if betamin == -np.inf else (beta + betamin) / 2
            H, P = hbeta(beta)
            h_diff = H - log_u
        neighbour_labels = labels[idx[i]]
        simpson = sum(P[neighbour_labels == b].sum() ** 2 for b in np.unique(labels))
        out[i] = 1.0 / simpson
    return out


# --------------------------------------------------------------------------- split_screen


@pytest.fixture(scope="module")
def design():
    return random_design()


def test_split_screen_sizes_and_disjoint(design):
    """Train holds floor(0.7 * 10) batches and floor(0.7 * 40) perturbations; the three
    splits share no perturbed cell."""
    s = split_screen(design, 0.7, seed=3)
    assert len(s.train_batches) == 7 and len(s.test_batches) == 3
    assert len(s.train_perturbations) == 28 and len(s.test_perturbations) == 12
    assert not set(s.train_batches) & set(s.test_batches)
    assert not set(s.train_perturbations) & set(s.test_perturbations)
    perturbed = np.flatnonzero(~design.controls)
    sets = [set(np.intersect1d(x, perturbed)) for x in (s.train, s.test1, s.test2)]
    assert not sets[0] & sets[1] and not sets[0] & sets[2] and not sets[1] & sets[2]
    for x in (s.train, s.test1, s.test2):
        assert np.all(np.diff(x) > 0)  # sorted, unique


def test_split_screen_membership(design):
    """test1 = test batches x perturbations seen in train; test2 = test batches x held-out
    perturbations; train = train batches x train perturbations; each complete."""
    s = split_screen(design, 0.7, seed=3)
    pert, batch, ctrl = design.perturbations, design.batches, design.controls
    tb, tp = set(s.train_batches), set(s.train_perturbations)
    seen = {pert[i] for i in s.train if not ctrl[i]}
    expect_train = {i for i in range(design.n_cells) if not ctrl[i] and batch[i] in tb and pert[i] in tp}
    expect_test1 = {i for i in range(design.n_cells) if not ctrl[i] and batch[i] not in tb and pert[i] in seen}
    expect_test2 = {i for i in range(design.n_cells)
                    if not ctrl[i] and batch[i] not in tb and pert[i] in set(s.test_perturbations)}
    assert {i for i in s.train if not ctrl[i]} == expect_train
    assert {i for i in s.test1 if not ctrl[i]} == expect_test1
    assert {i for i in s.test2 if not ctrl[i]} == expect_test2
    assert seen <= tp
    assert expect_test1 and expect_test2


def test_split_screen_controls(design):
    """Controls of test batches are in both test sets and not in train; controls of train
    batches are in train only."""
    s = split_screen(design, 0.7, seed=3)
    ctrl_idx = np.flatnonzero(design.controls)
    in_test_batch = np.isin(design.batches[ctrl_idx], s.test_batches)
    test_ctrl, train_ctrl = set(ctrl_idx[in_test_batch]), set(ctrl_idx[~in_test_batch])
    assert test_ctrl and train_ctrl
    assert {i for i in s.test1 if design.controls[i]} == test_ctrl
    assert {i for i in s.test2 if design.controls[i]} == test_ctrl
    assert {i for i in s.train if design.controls[i]} == train_ctrl


@pytest.mark.parametrize("seed", [0, 3])
def test_split_screen_equals_isin_recipe(seed):
    """The code-based membership tests give the sets of the direct recipe (np.unique of
    names, seeded shuffles, np.isin on names)."""
    d = random_design(n_batches=7, n_perts=25, seed=seed)
    split = split_screen(d, 0.6, seed=seed)
    rng = np.random.default_rng(seed)
    perturbed = ~d.controls

    def cut(values):
        shuffled = values[rng.permutation(len(values))]
        n_train = min(max(int(0.6 * len(values)), 1), len(values) - 1)
        return np.sort(shuffled[:n_train]), np.sort(shuffled[n_train:])

    train_b, _ = cut(np.unique(d.batches[perturbed]))
    train_p, test_p = cut(np.unique(d.perturbations[perturbed]))
    in_b, in_p = np.isin(d.batches, train_b), np.isin(d.perturbations, train_p)
    train = perturbed & in_b & in_p
    test1 = perturbed & ~in_b & in_p & np.isin(d.perturbations, np.unique(d.perturbations[train]))
    test2 = perturbed & ~in_b & np.isin(d.perturbations, test_p)
    np.testing.assert_array_equal(split.train, np.flatnonzero(train | (d.controls & in_b)))
    np.testing.assert_array_equal(split.test1, np.flatnonzero(test1 | (d.controls & ~in_b)))
    np.testing.assert_array_equal(split.test2, np.flatnonzero(test2 | (d.controls & ~in_b)))
    assert split.train_perturbations == tuple(train_p) and split.train_batches == tuple(train_b)


def test_split_screen_seeded(design):
    """The same seed gives the same split; another seed a different one."""
    a, b, c = (split_screen(design, seed=s) for s in (5, 5, 6))
    for field in ("train", "test1", "test2"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.train_batches, a.train_perturbations) == (b.train_batches, b.train_perturbations)
    assert (a.train_batches, a.train_perturbations) != (c.train_batches, c.train_perturbations)


def test_split_screen_needs_two_batches():
    """A screen with a single batch cannot hold one out."""
    d = random_design(n_batches=1, n_perturbed=100, controls_per_batch=5)
    with pytest.raises(NotApplicableError):
        split_screen(d)


# --------------------------------------------------------------------------- stratified_subsample


@pytest.mark.parametrize("kind", ["object", "str", "int"])
def test_unique_codes_equals_np_unique(kind):
    """Hash-based codes give np.unique's sorted values and inverse, for any dtype."""
    rng = np.random.default_rng(19)
    values = rng.integers(0, 50, 500)
    if kind != "int":
        values = np.char.add("G", values.astype(str)).astype(object if kind == "object" else str)
    uniques, codes = unique_codes(values)
    expected_u, expected_c = np.unique(values, return_inverse=True)
    np.testing.assert_array_equal(uniques, expected_u)
    np.testing.assert_array_equal(codes, expected_c)
    assert uniques.dtype == values.dtype


def test_stratified_subsample_keeps_requested_size():
    """1500 items asked for 1000: exactly 1000 unique sorted indices (not the complement),
    each label within 1 of its proportional share, singletons kept."""
    sizes = {"a": 700, "b": 400, "c": 250, "d": 100, "e": 45}
    labels = np.concatenate([np.full(n, k) for k, n in sizes.items()] + [np.array([f"s{i}" for i in range(5)])])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    assert len(labels) == 1500
    idx = stratified_subsample(labels, 1000, seed=1)
    assert len(idx) == 1000
    assert len(np.unique(idx)) == 1000 and np.all(np.diff(idx) > 0)
    kept = labels[idx]
    quota = 1000 - 5
    for k, n in sizes.items():
        share = n / 1495 * quota
        assert abs(np.sum(kept == k) - share) <= 1.0, k
    for i in range(5):
        assert np.sum(kept == f"s{i}") == 1


def test_stratified_subsample_all_and_seed():
    """n >= len returns every index; the same seed gives the same subset."""
    labels = np.array(list("aabbbcccc"))
    np.testing.assert_array_equal(stratified_subsample(labels, 9), np.arange(9))
    np.testing.assert_array_equal(stratified_subsample(labels, 50), np.arange(9))
    np.testing.assert_array_equal(stratified_subsample(labels, 5, seed=2),
                                  stratified_subsample(labels, 5, seed=2))


def test_stratified_subsample_more_singletons_than_room():
    """With more singletons than n, n singletons are returned."""
    labels = np.array([f"s{i}" for i in range(10)] + ["a"] * 5)
    idx = stratified_subsample(labels, 4, seed=0)
    assert len(idx) == 4 and np.all(idx < 10)


def test_stratified_subsample_at_least_one_per_label():
    """Every non-singleton label keeps at least one item when n >= number of labels."""
    labels = np.array(["a"] * 1000 + [x for x in "bcdef" for _ in range(2)])
    idx = stratified_subsample(labels, 100, seed=0)
    assert len(idx) == 100
    assert set(labels[idx]) == set("abcdef")


# --------------------------------------------------------------------------- postprocess


@pytest.fixture(scope="module")
def embedded():
    """A small anisotropic embedding with batch shifts and controls in each of 3 batches."""
    rng = np.random.default_rng(7)
    n, dim = 300, 6
    batches = np.array([f"b{i}" for i in rng.integers(0, 3, n)])
    controls = rng.random(n) < 0.4
    labels = np.where(controls, "ctrl", "P")
    X = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) * np.arange(1, dim + 1)
    X += np.array([rng.normal(size=dim) * 3 for _ in range(3)])[np.char.lstrip(batches, "b").astype(int)]
    return X, ScreenDesign.from_roles(labels, controls, batches)


def test_postprocess_none_returns_input(embedded):
    """'none' gives back the embedding unchanged."""
    X, d = embedded
    np.testing.assert_array_equal(postprocess(X, d, "none"), X)


def test_postprocess_center_equals_loop(embedded):
    """'center' subtracts, in each batch, the mean of that batch's controls."""
    X, d = embedded
    expected = X.copy()
    for b in np.unique(d.batches):
        rows = d.batches == b
        expected[rows] = X[rows] - X[rows & d.controls].mean(axis=0)
    np.testing.assert_allclose(postprocess(X, d, "center"), expected, rtol=1e-12, atol=1e-12)


def test_postprocess_center_scale_equals_standard_scaler(embedded):
    """'center_scale' equals a StandardScaler fitted on each batch's controls, a column
    constant among controls left unscaled."""
    X, d = embedded
    X = X.copy()
    X[d.controls, 0] = 5.0
    expected = np.empty_like(X)
    for b in np.unique(d.batches):
        rows = d.batches == b
        expected[rows] = StandardScaler().fit(X[rows & d.controls]).transform(X[rows])
    got = postprocess(X, d, "center_scale")
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got[:, 0], X[:, 0] - 5.0, atol=1e-12)


def tvn_reference(X, design):
    """EFAAR's TVN from scikit-learn/scipy: scale on controls, PCA on controls, scale again,
    then per batch X_b @ (cov(ctrl_b) + 0.5 I)^(-1/2)."""
    ctrl = design.controls
    Y = StandardScaler().fit(X[ctrl]).transform(X)
    Y = PCA().fit(Y[ctrl]).transform(Y)
    Y = StandardScaler().fit(Y[ctrl]).transform(Y)
    out = np.empty_like(Y)
    for b in np.unique(design.batches):
        rows = design.batches == b
        cov = np.cov(Y[rows & ctrl], rowvar=False, ddof=1)
        W = np.real(fractional_matrix_power(cov + 0.5 * np.eye(Y.shape[1]), -0.5))
        out[rows] = Y[rows] @ W
    return out


def test_postprocess_tvn_equals_efaar_recipe(embedded):
    """'tvn' matches the scikit-learn/scipy recipe up to per-column sign flips of the PCA
    components: same pairwise distances, and equal after aligning column signs."""
    X, d = embedded
    got = postprocess(X, d, "tvn")
    ref = tvn_reference(X, d)
    assert got.shape == ref.shape
    np.testing.assert_allclose(pairwise_distances(got), pairwise_distances(ref), rtol=1e-8, atol=1e-8)
    signs = np.sign(np.sum(got * ref, axis=0))
    np.testing.assert_allclose(got * signs, ref, rtol=1e-7, atol=1e-8)


def tvn_degenerate_cases(kind, n_seeds=30):
    """Screens whose controls leave one TVN principal axis without variance: a dimension
    constant among controls, or fewer controls (6) than dimensions (8)."""
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        if kind == "constant_column":
            n, dim = 200, 6
            controls = rng.random(n) < 0.4
            X = rng.normal(size=(n, dim)) * 5
            X[controls, 2] = 3.0
        else:
            n, dim = 60, 8
            controls = np.zeros(n, bool)
            controls[:6] = True
            X = rng.normal(size=(n, dim))
        batches = np.array(["b0", "b1"])[np.arange(n) % 2]
        yield X, ScreenDesign(np.where(controls, "ctrl", "P").astype(object), controls, batches)


def test_postprocess_tvn_fewer_controls_than_dims_shape():
    """With 6 controls in 8 dimensions the centred controls span 5 axes: TVN keeps those 5
    (a sixth would be rounding noise)."""
    X, d = next(tvn_degenerate_cases("few_controls", 1))
    assert postprocess(X, d, "tvn").shape == (60, 5)


@pytest.mark.parametrize("kind", ["constant_column", "few_controls"])
def test_postprocess_tvn_degenerate_axis_stays_bounded(kind):
    """An axis along which controls do not vary is dropped rather than divided by rounding
    noise, so TVN output stays of the order of the input (|value| < 1e3) for every seed."""
    worst = max(np.abs(postprocess(X, d, "tvn")).max() for X, d in tvn_degenerate_cases(kind))
    assert worst < 1e3


def test_postprocess_needs_controls_in_every_batch(embedded):
    """A batch without controls (or TVN with one control) cannot be post-processed; an
    unknown method is a ValueError."""
    X, d = embedded
    controls = d.controls & (d.batches != "b1")
    no_ctrl = ScreenDesign(d.perturbations, controls, d.batches)
    for method in ("center", "center_scale", "tvn"):
        with pytest.raises(NotApplicableError):
            postprocess(X, no_ctrl, method)
    one = d.controls & (d.batches != "b1")
    one[np.flatnonzero(d.batches == "b1")[0]] = True
    one_ctrl = ScreenDesign(d.perturbations, one, d.batches)
    postprocess(X, one_ctrl, "center")  # one control is enough to centre
    with pytest.raises(NotApplicableError):
        postprocess(X, one_ctrl, "tvn")
    with pytest.raises(ValueError):
        postprocess(X, d, "zscore")


# --------------------------------------------------------------------------- iLISI


def test_ilisi_matches_harmony_loop():
    """Mean iLISI equals harmonypy's per-cell LISI (written out here) on random cells;
    the normalised value is 1 + (mean - 1) / (B - 1)."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(200, 5))
    batches = np.array(["x", "y", "z"])[rng.integers(0, 3, 200)]
    X[batches == "x"] += 0.7
    mean, norm = ilisi(X, batches, perplexity=10)
    expected = harmony_lisi_reference(X, batches, 10).mean()
    assert mean == pytest.approx(expected, abs=1e-6)
    assert norm == pytest.approx(1 + (mean - 1) / 2, abs=1e-12)


def test_ilisi_approximate_neighbours_small_case():
    """exact=False searches with faiss; on 200 cells every inverted list is scanned, so it
    finds the exact neighbours and the same iLISI."""
    rng = np.random.default_rng(15)
    X = rng.normal(size=(200, 5))
    batches = np.array(["p", "q", "r"])[rng.integers(0, 3, 200)]
    X[batches == "p"] += 0.5
    exact = ilisi(X, batches, perplexity=10, exact=True)
    approx = ilisi(X, batches, perplexity=10, exact=False)
    assert approx == pytest.approx(exact, abs=1e-5)  # faiss returns float32 distances


def test_ilisi_extremes():
    """Two far-apart batches give iLISI 1; one shared distribution gives close to B = 3
    (perplexity 30, so the neighbourhood's label proportions are near 1/3 each)."""
    rng = np.random.default_rng(12)
    X = rng.normal(size=(200, 4))
    b = np.repeat(["a", "b"], 100)
    X[b == "b"] += 100.0
    mean, norm = ilisi(X, b, perplexity=10)
    assert mean == pytest.approx(1.0, abs=1e-6) and norm == pytest.approx(1.0, abs=1e-6)
    X = rng.normal(size=(600, 4))
    b3 = np.array(["a", "b", "c"])[rng.integers(0, 3, 600)]
    mean, norm = ilisi(X, b3, perplexity=30)
    assert 2.5 < mean <= 3.0 and 1.75 < norm <= 2.0


def test_ilisi_single_batch_is_nan():
    """With one batch there is no mixing to measure."""
    X = np.random.default_rng(0).normal(size=(20, 3))
    assert all(np.isnan(ilisi(X, np.zeros(20), perplexity=3)))


# --------------------------------------------------------------------------- top-k


def topk_loop(scores, true_codes, k):
    """Rank of the true class in a stable descending sort (first-indexed class first on ties)."""
    out = np.zeros(len(true_codes), bool)
    for i, t in enumerate(true_codes):
        if t < 0:
            continue
        order = np.argsort(-scores[i], kind="stable")
        out[i] = int(np.flatnonzero(order == t)[0]) < k
    return out


def test_topk_hits_hand_cases():
    """Strictly higher scores rank above; ties go to the first-indexed class; -1 is a miss."""
    s = np.array([[0.1, 0.5, 0.4]])
    assert not topk_hits(s, np.array([2]), 1)[0]
    assert topk_hits(s, np.array([2]), 2)[0]
    const = np.ones((4, 3))
    codes = np.array([0, 1, 2, -1])
    np.testing.assert_array_equal(topk_hits(const, codes, 1), [True, False, False, False])
    np.testing.assert_array_equal(topk_hits(const, codes, 2), [True, True, False, False])
    np.testing.assert_array_equal(topk_hits(const, codes, 3), [True, True, True, False])


@pytest.mark.parametrize("discrete", [False, True])
def test_topk_hits_matches_argsort_loop(discrete):
    """Equals the stable-argsort rank on random scores, continuous or heavily tied."""
    rng = np.random.default_rng(3)
    scores = rng.random((300, 12))
    if discrete:
        scores = np.round(scores * 3)
    codes = rng.integers(-1, 12, 300)
    for k in (1, 3, 5):
        np.testing.assert_array_equal(topk_hits(scores, codes, k), topk_loop(scores, codes, k))


# --------------------------------------------------------------------------- kNN votes


def dense_votes(ref, codes, query, n_classes, k):
    idx, dist = knn_search(ref, query, k, exact=True)
    rows, classes, votes = weighted_votes(codes[idx], dist)
    out = np.zeros((len(query), n_classes))
    out[rows, classes] = votes
    return out


def test_knn_votes_match_sklearn_and_brute_force():
    """Votes equal distance-weighted kNN (1 / (d + 1e-5)) by brute force with cdist; their
    normalised form equals scikit-learn's predict_proba, argmax its predict; ranks equal
    topk_ranks on the dense vote matrix (a class without votes never ranks)."""
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(120, 4))
    codes = rng.integers(0, 5, 120)
    query = rng.normal(size=(37, 4))
    k = 7
    votes = dense_votes(ref, codes, query, 5, k)
    D = cdist(query, ref)
    expected = np.zeros((37, 5))
    for i in range(37):
        for j in np.argsort(D[i])[:k]:
            expected[i, codes[j]] += 1.0 / (D[i, j] + 1e-5)
    np.testing.assert_allclose(votes, expected, rtol=1e-9)
    clf = KNeighborsClassifier(n_neighbors=k, weights=lambda d: 1.0 / (d + 1e-5)).fit(ref, codes)
    np.testing.assert_allclose(votes / votes.sum(axis=1, keepdims=True), clf.predict_proba(query), rtol=1e-9)
    np.testing.assert_array_equal(votes.argmax(axis=1), clf.predict(query))
    weight_sum = np.sort(1.0 / (D + 1e-5), axis=1)[:, ::-1][:, :k].sum(axis=1)
    np.testing.assert_allclose(votes.sum(axis=1), weight_sum, rtol=1e-9)
    true = rng.integers(-1, 5, 37)
    ranks = knn_vote_ranks(ref, codes, query, true, k, exact=True, chunk_rows=8)
    dense = topk_ranks(votes, true)
    voted = (true >= 0) & (votes[np.arange(37), np.maximum(true, 0)] > 0)
    np.testing.assert_array_equal(ranks[voted], dense[voted])
    assert np.isinf(ranks[~voted]).all() and (~voted).any()


def test_knn_votes_k_larger_than_reference():
    """k beyond the reference size uses every reference cell once."""
    rng = np.random.default_rng(6)
    ref, query = rng.normal(size=(4, 2)), rng.normal(size=(3, 2))
    codes = np.array([0, 1, 1, 2])
    votes = dense_votes(ref, codes, query, 3, 10)
    W = 1.0 / (cdist(query, ref) + 1e-5)
    expected = np.stack([W[:, 0], W[:, 1] + W[:, 2], W[:, 3]], axis=1)
    np.testing.assert_allclose(votes, expected, rtol=1e-9)


def test_vote_ranks_match_dense_topk_with_ties():
    """Sparse vote ranks equal topk_ranks of the dense matrix, ties (integer weights)
    broken against the true class; an unvoted or unknown true class is a miss (inf)."""
    rng = np.random.default_rng(9)
    n, k, n_classes = 400, 6, 8
    neighbor_codes = rng.integers(0, n_classes, (n, k))
    distances = rng.integers(1, 3, (n, k)).astype(float) - 1e-5  # weights exactly 1 or 1/2
    true = rng.integers(-1, n_classes, n)
    rows, classes, votes = weighted_votes(neighbor_codes, distances)
    assert np.all(np.diff(rows * n_classes + classes) > 0)
    dense = np.zeros((n, n_classes))
    dense[rows, classes] = votes
    ranks = vote_ranks(rows, classes, votes, true)
    voted = (true >= 0) & (dense[np.arange(n), np.maximum(true, 0)] > 0)
    np.testing.assert_array_equal(ranks[voted], topk_ranks(dense, true)[voted])
    assert np.isinf(ranks[~voted]).all()
    for t in (1, 5):  # the previous dense tally: topk_hits & voted
        np.testing.assert_array_equal(ranks < t, topk_hits(dense, true, t) & voted)


# --------------------------------------------------------------------------- linear probe


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_softmax_regression_matches_sklearn(n_jobs):
    """Same objective, start and stopping rule as LogisticRegression(lbfgs): same
    iterations, probabilities within 1e-4, top-1/top-5 on held-out cells within 0.01,
    chunked over rows and threads."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(13)
    n, n_classes, d = 1500, 30, 12
    offsets = 0.5 * rng.normal(size=(n_classes, d))
    y, y_test = rng.integers(0, n_classes, n), rng.integers(0, n_classes, 600)
    X = rng.normal(size=(n, d)) + offsets[y] + 2.0
    X_test = rng.normal(size=(600, d)) + offsets[y_test] + 2.0
    scaler = StandardScaler().fit(X)
    Xs, Xt = scaler.transform(X), scaler.transform(X_test)
    for C in (1.0, 0.05):
        sk = LogisticRegression(C=C, max_iter=1000).fit(Xs, y)
        me = SoftmaxRegression(C, max_iter=1000, chunk_rows=128, n_jobs=n_jobs).fit(Xs, y, n_classes)
        assert me.n_iter_ == sk.n_iter_[0] and me.converged_
        np.testing.assert_allclose(me.predict_proba(Xt), sk.predict_proba(Xt), atol=1e-4)
        np.testing.assert_allclose(me.coef_, sk.coef_, atol=1e-3)
        for t in (1, 5):
            mine = (topk_ranks(me.decision_function(Xt), y_test) < t).mean()
            theirs = topk_hits(sk.predict_proba(Xt), y_test, t).mean()
            assert mine == pytest.approx(theirs, abs=0.01)


def test_softmax_regression_max_iter_and_unseen_class_rows():
    """max_iter bounds the L-BFGS iterations; a class code with no rows gets a finite,
    penalised (below-average) intercept rather than breaking the fit."""
    rng = np.random.default_rng(14)
    X = rng.normal(size=(200, 3))
    y = rng.integers(0, 4, 200)
    me = SoftmaxRegression(1.0, max_iter=2).fit(X, y, 5)
    assert me.n_iter_ <= 2 and not me.converged_
    me = SoftmaxRegression(1.0).fit(X, y, 5)
    assert np.isfinite(me.coef_).all() and me.intercept_[4] < me.intercept_[:4].min()


# --------------------------------------------------------------------------- consistency


def test_mean_pairwise_cosine_matches_sklearn():
    """Per group, the mean of the strict lower triangle of cosine_similarity (zero rows
    give 0); groups of one row are NaN, empty groups NaN with size 0."""
    rng = np.random.default_rng(8)
    X = rng.normal(size=(40, 6))
    codes = rng.integers(0, 4, 40)
    codes[:2] = 0
    X[0] = 0.0
    codes[-1] = 4  # a group of one
    means, sizes = mean_pairwise_cosine(X, codes, 6)
    np.testing.assert_array_equal(sizes, np.bincount(codes, minlength=6))
    for g in range(4):
        S = cosine_similarity(X[codes == g])
        expected = S[np.tril_indices(len(S), k=-1)].mean()
        assert means[g] == pytest.approx(expected, abs=1e-12)
    assert np.isnan(means[4]) and np.isnan(means[5])


def test_empirical_pvalues_hand_case():
    """p = (1 + #null >= x) / (1 + #null): ties count as >=, NaN stays NaN."""
    null = np.array([0.3, 0.1, 0.4, 0.2])
    p = empirical_pvalues(np.array([0.25, 0.2, 0.5, 0.0, np.nan]), null)
    np.testing.assert_allclose(p[:4], [3 / 5, 4 / 5, 1 / 5, 5 / 5])
    assert np.isnan(p[4])


# --------------------------------------------------------------------------- relationships


def compute_recall_reference(null, query, low=0.05, high=0.95):
    """efaar-benchmarking's compute_recall."""
    null = np.sort(null)
    rank_left = np.searchsorted(null, query, side="left") / len(null)
    rank_right = np.searchsorted(null, query, side="right") / len(null)
    return np.mean((rank_right <= low) | (rank_left >= high))


def test_cosine_matrix_and_upper_triangle():
    """cosine_matrix equals scikit-learn's cosine_similarity (zero rows 0); upper_triangle
    lists i < j row by row."""
    rng = np.random.default_rng(9)
    M = rng.normal(size=(10, 5))
    M[3] = 0.0
    np.testing.assert_allclose(cosine_matrix(M), cosine_similarity(M), atol=1e-6)
    S = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(upper_triangle(S), [S[i, j] for i in range(4) for j in range(i + 1, 4)])


def test_tail_recall_matches_efaar_and_counting():
    """Equals efaar's compute_recall and the counting definition (share <= x at most 5%,
    share < x at least 95%) on tied, rounded values."""
    rng = np.random.default_rng(10)
    null = np.round(rng.normal(size=500), 1)
    query = np.round(rng.normal(size=200) * 1.5, 1)
    got = tail_recall(np.sort(null), query)
    assert got == pytest.approx(compute_recall_reference(null, query), abs=1e-12)
    counted = np.mean([(np.mean(null <= q) <= 0.05) or (np.mean(null < q) >= 0.95) for q in query])
    assert got == pytest.approx(counted, abs=1e-12)
    assert np.isnan(tail_recall(np.sort(null), np.array([])))


def test_tail_recall_random_embedding_near_ten_percent():
    """Random known pairs of a random embedding land in the two 5% tails about 10% of the time."""
    rng = np.random.default_rng(13)
    S = cosine_matrix(rng.normal(size=(200, 16)))
    null = np.sort(upper_triangle(S))
    i, j = np.triu_indices(200, k=1)
    pick = rng.choice(len(i), 2000, replace=False)
    recall = tail_recall(null, S[i[pick], j[pick]])
    assert 0.05 < recall < 0.15
    assert recall == pytest.approx(compute_recall_reference(null, S[i[pick], j[pick]]), abs=1e-12)


def test_tail_recall_upper_bound_counts_tails():
    """With 1000 distinct null values, 100 lie in the two tails: the bound is 1 for 50 pairs
    and 0.1 (not 0.9) for 1000; the whole null as query reaches it exactly."""
    null = np.sort(np.random.default_rng(14).random(1000))
    assert tail_recall_upper_bound(null, 50) == 1.0
    assert tail_recall_upper_bound(null, 1000) == pytest.approx(0.1)
    assert tail_recall(null, null) == pytest.approx(0.1)
    tails = np.concatenate([null[:50], null[-50:]])
    assert tail_recall(null, tails) == 1.0
    assert np.isnan(tail_recall_upper_bound(null, 0))


def average_precision_loop(S, A):
    """copairs' AP per query gene: others sorted by similarity descending, mean over partners
    of (#partners at or above its rank) / rank."""
    P = len(S)
    aps = []
    for q in range(P):
        if not A[q].any():
            continue
        others = [j for j in range(P) if j != q]
        ranked = sorted(others, key=lambda j: -S[q, j])
        hits, precisions = 0, []
        for rank, j in enumerate(ranked, start=1):
            if A[q, j]:
                hits += 1
                precisions.append(hits / rank)
        aps.append(np.mean(precisions))
    return np.mean(aps), len(aps)


def test_mean_average_precision_matches_loop():
    """mAP equals the per-query loop on a random similarity matrix (no ties)."""
    rng = np.random.default_rng(15)
    P = 30
    S = rng.random((P, P))
    S = (S + S.T) / 2
    np.fill_diagonal(S, 1.0)
    A = np.triu(rng.random((P, P)) < 0.1, k=1)
    A = A | A.T
    A[0], A[:, 0] = False, False  # a gene without partners is not a query
    expected, n = average_precision_loop(S, A)
    got, n_got = mean_average_precision(S, sp.csr_matrix(A), block_rows=7)
    assert n_got == n
    assert got == pytest.approx(expected, abs=1e-12)


def test_mean_average_precision_hand_cases():
    """Partners ranked first give 1.0; one partner ranked second gives 1/2; a partner tied
    with a non-partner is ranked after it; no partners at all gives NaN."""
    S = np.array([[1.0, 0.9, 0.8, 0.1],
                  [0.9, 1.0, 0.1, 0.2],
                  [0.8, 0.1, 1.0, 0.3],
                  [0.1, 0.2, 0.3, 1.0]])
    A = np.zeros((4, 4), bool)
    A[0, 1] = A[1, 0] = True
    A[0, 2] = A[2, 0] = True
    got, n = mean_average_precision(S, sp.csr_matrix(A))
    # Query 0: partners 1, 2 at ranks 1, 2 -> 1. Query 1: partner 0 at rank 1 -> 1.
    # Query 2: partner 0 at rank 1 -> 1.
    assert n == 3 and got == pytest.approx(1.0)
    B = np.zeros((4, 4), bool)
    B[3, 1] = B[1, 3] = True
    # Query 3 ranks 2 (0.3), 1 (0.2), 0 (0.1): partner 1 at rank 2 -> 1/2.
    # Query 1 ranks 0 (0.9), 3 (0.2), 2 (0.1): partner 3 at rank 2 -> 1/2.
    assert mean_average_precision(S, sp.csr_matrix(B))[0] == pytest.approx(0.5)
    T = np.array([[1.0, 0.5, 0.5], [0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
    C = np.zeros((3, 3), bool)
    C[0, 1] = C[1, 0] = True
    # Query 0: partner 1 tied with non-partner 2, ranked after it -> 1/2. Query 1: rank 1 -> 1.
    assert mean_average_precision(T, sp.csr_matrix(C))[0] == pytest.approx(0.75)
    got, n = mean_average_precision(S, sp.csr_matrix((4, 4), dtype=bool))
    assert np.isnan(got) and n == 0


def test_cosine_mean_average_precisions_match_loop_without_ties():
    """On a random embedding (no ties) the float64 cosine mAP equals copairs' formula on
    scikit-learn's cosines, for each adjacency of one pass; an empty adjacency is NaN."""
    rng = np.random.default_rng(17)
    M = rng.normal(size=(40, 12))
    A = np.triu(rng.random((40, 40)) < 0.1, k=1)
    A = A | A.T
    B = np.zeros((40, 40), bool)
    B[3, 5] = B[5, 3] = True
    got = cosine_mean_average_precisions(M, [sp.csr_matrix(A), sp.csr_matrix(B), sp.csr_matrix((40, 40), dtype=bool)],
                                         block_rows=6)
    for (value, n), adjacency in zip(got[:2], (A, B)):
        expected, n_expected = average_precision_loop(cosine_similarity(M), adjacency)
        assert n == n_expected and value == pytest.approx(expected, abs=1e-12)
    assert np.isnan(got[2][0]) and got[2][1] == 0


def test_cosine_mean_average_precision_ties_pessimistic():
    """Genes 0 and 1 identical, gene 2 a rescaled copy (equal cosines, unequal float64
    products), gene 3 elsewhere; partners 0-1 and 2-3. Every tie between a partner and
    non-partners ranks the partner after them."""
    v = np.array([0.3, -1.2, 0.7, 2.0, 0.1, -0.4])
    w = np.array([1.0, 0.5, -0.3, 0.2, 0.9, 0.0])
    M = np.stack([v, v, 3.7 * v, w])
    A = np.zeros((4, 4), bool)
    A[0, 1] = A[1, 0] = A[2, 3] = A[3, 2] = True
    # Query 0: 1 (partner) and 2 tie at cosine 1, 3 is lower -> partner at rank 2: 1/2.
    # Query 1: 0 (partner) and 2 tie at 1 -> 1/2. Query 2: 0 and 1 tie at 1 above 3
    # (partner) -> rank 3: 1/3. Query 3: 0, 1, 2 (partner) all tie -> rank 3: 1/3.
    expected = (1 / 2 + 1 / 2 + 1 / 3 + 1 / 3) / 4
    [(got, n)] = cosine_mean_average_precisions(M, [sp.csr_matrix(A)], block_rows=3)
    assert n == 4 and got == pytest.approx(expected, abs=1e-12)
    # The same rule on exactly given scores; a constant embedding gets no credit for ties.
    S = np.round(cosine_similarity(M), COSINE_DECIMALS)
    assert mean_average_precision(S, sp.csr_matrix(A))[0] == pytest.approx(expected, abs=1e-12)
    [(constant, _)] = cosine_mean_average_precisions(np.ones((4, 3)), [sp.csr_matrix(A)])
    assert constant == pytest.approx(1 / 3, abs=1e-12)  # each partner after the 2 non-partners


def test_cosine_mean_average_precision_rescaled_copies_tie():
    """Eight rescaled copies of one vector have equal cosines to any gene, which float64
    products split in the last bits; rounded, they tie. Gene 0's partner is the last copy:
    after the 7 other copies for query 0, and after them too (cosine 1) for the copy."""
    v = np.array([0.3, -1.2, 0.7, 2.0, 0.1, -0.4])
    w = np.array([1.0, 0.5, -0.3, 0.2, 0.9, 0.0])
    scales = [1.0, 3.7, 0.3, 7.1, 1.9, 0.61, 2.3, 5.3]
    M = np.vstack([w] + [c * v for c in scales])
    A = np.zeros((9, 9), bool)
    A[0, 8] = A[8, 0] = True
    for block_rows in (1, 2, 512):
        [(got, n)] = cosine_mean_average_precisions(M, [sp.csr_matrix(A)], block_rows=block_rows)
        assert n == 2 and got == pytest.approx(1 / 8, abs=1e-12)


def test_cosine_mean_average_precision_tie_split_by_float32():
    """cos(q, a) = cos(q, b) = 12 / sqrt(282) exactly, but float32 products tell them apart;
    the float64 cosines tie, so partner b ranks after a for query q (AP 1/2, not 1)."""
    q, a, b, c = [1.0, 1, 1, 1], [16.0, 3, 4, 1], [1.0, 4, 3, 16], [0.0, 0, -1, 0]
    M = np.array([q, a, b, c])
    A = np.zeros((4, 4), bool)
    A[0, 2] = A[2, 0] = True
    S32 = cosine_matrix(M)
    assert S32[0, 1] != S32[0, 2]  # the split tie this guards against
    # Query q: a ties b (partner) above c -> 1/2. Query b: q (0.71) above a (0.20), c -> 1.
    [(got, n)] = cosine_mean_average_precisions(M, [sp.csr_matrix(A)])
    assert n == 2 and got == pytest.approx((1 / 2 + 1) / 2, abs=1e-12)
    assert mean_average_precision(S32, sp.csr_matrix(A))[0] != pytest.approx(got)


def test_mean_average_precision_rejects_nan():
    """NaN scores cannot be ranked: an error, not a silent rank."""
    S = np.array([[1.0, np.nan], [np.nan, 1.0]])
    with pytest.raises(TaskError, match="NaN"):
        mean_average_precision(S, sp.csr_matrix(np.array([[False, True], [True, False]])))


# --------------------------------------------------------------------------- reconstruction


def test_per_gene_spearman_matches_scipy():
    """Each column equals scipy.stats.spearmanr (ties included); a constant column is NaN."""
    rng = np.random.default_rng(16)
    pred = np.round(rng.normal(size=(50, 6)), 1)
    truth = np.round(pred + rng.normal(size=(50, 6)), 1)
    truth[:, 5] = 2.0
    got = per_gene_spearman(pred, truth)
    for g in range(5):
        assert got[g] == pytest.approx(stats.spearmanr(pred[:, g], truth[:, g]).statistic, abs=1e-12)
    assert np.isnan(got[5])


def sparse_truth(rng, n=80, g=9):
    """Sparse columns with ties, negatives, explicit zeros, an empty and a constant column."""
    T = np.round(rng.normal(size=(n, g)), 1) * (rng.random((n, g)) < 0.3)
    T[:, 1] = np.abs(T[:, 1])  # non-negative only
    T[:, 2] = 0.0  # all zeros: constant
    T[:, 3] = 0.0
    T[:5, 3] = 1.5  # few equal positives
    M = sp.csc_matrix(T)
    M.data[::7] = 0.0  # explicit zeros stay zeros
    return M


def test_sparse_column_ranks_and_spearman_match_scipy():
    """Ranks of a sparse matrix's columns equal rankdata of the dense columns; Spearman
    against sparse truth equals the dense path and scipy (NaN for constant columns)."""
    rng = np.random.default_rng(17)
    M = sparse_truth(rng)
    dense = M.toarray()
    T, ranks, zero_rank = sparse_column_ranks(M)
    full = np.repeat(zero_rank[None, :], M.shape[0], axis=0)
    full[T.indices, np.repeat(np.arange(T.shape[1]), np.diff(T.indptr))] = ranks
    np.testing.assert_allclose(full, stats.rankdata(dense, axis=0), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(_column_ranks(dense, block=2, n_jobs=2), stats.rankdata(dense, axis=0))
    pred = np.round(rng.normal(size=dense.shape), 1)
    pred[:, 4] = 3.0
    got = per_gene_spearman(pred, M)
    np.testing.assert_allclose(got, per_gene_spearman(pred, dense), atol=1e-12, equal_nan=True)
    for g in (0, 1, 3, 5):
        assert got[g] == pytest.approx(stats.spearmanr(pred[:, g], dense[:, g]).statistic, abs=1e-12)
    assert np.isnan(got[2]) and np.isnan(got[4])


def test_centred_distance_terms_sparse_equals_dense():
    """Per-batch structural-integrity terms from sparse truth equal the dense formula."""
    rng = np.random.default_rng(18)
    M = sparse_truth(rng).tocsr()
    P = rng.normal(size=M.shape)
    rows = np.sort(rng.choice(M.shape[0], 30, replace=False))
    controls = rows[:6]
    Pc = P[rows] - P[controls].mean(axis=0)
    Tc = M.toarray()[rows] - M.toarray()[controls].mean(axis=0)
    d, t = centred_distance_terms(P, M, rows, controls)
    assert d == pytest.approx(np.sum((Pc - Tc) ** 2), rel=1e-12)
    assert t == pytest.approx(np.sum(Tc**2), rel=1e-12)
    assert centred_distance_terms(P, M.toarray(), rows, controls) == pytest.approx((d, t), rel=1e-12)


def test_structural_integrity_hand_case():
    """1 - mean(d) / (2 mean(m)): d = [1, 3], m = [2, 2] gives 0.5; no batches or zero truth is NaN."""
    assert structural_integrity(np.array([1.0, 3.0]), np.array([2.0, 2.0])) == pytest.approx(0.5)
    assert structural_integrity(np.array([0.0]), np.array([4.0])) == 1.0
    assert np.isnan(structural_integrity(np.array([]), np.array([])))
    assert np.isnan(structural_integrity(np.array([1.0]), np.array([0.0])))


# --------------------------------------------------------------------------- Expression


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(17)
    C = rng.poisson(2.0, size=(11, 8)).astype(float)
    C[4] = 0.0  # an empty cell stays zero
    return C


def lognorm_numpy(C, target=1e4):
    totals = C.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(totals > 0, C / totals * target, 0.0)
    return np.log1p(scaled)


@pytest.mark.parametrize("sparse", [False, True])
def test_expression_rows_log_normalise_raw_counts(counts, sparse):
    """rows() of raw counts is log1p(counts / total * 1e4), dense or sparse input."""
    X = sp.csr_matrix(counts) if sparse else counts
    e = Expression(X, None)
    idx = np.array([0, 4, 7, 2])
    block = e.rows(idx)
    assert sp.issparse(block) and block.dtype == np.float64
    np.testing.assert_allclose(block.toarray(), lognorm_numpy(counts)[idx], rtol=1e-12)


def test_expression_gene_means_and_chunking(counts):
    """gene_means is the column mean of the log-normalised matrix; 3-row chunks agree with
    one chunk, and iter_rows covers the index in order."""
    ref = lognorm_numpy(counts)
    one = Expression(sp.csr_matrix(counts), None)
    chunked = Expression(sp.csr_matrix(counts), None, chunk_rows=3)
    np.testing.assert_allclose(one.gene_means(), ref.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(chunked.gene_means(), one.gene_means(), rtol=1e-12)
    sub = np.array([1, 3, 5, 6, 9])
    np.testing.assert_allclose(chunked.gene_means(sub), ref[sub].mean(axis=0), rtol=1e-12)
    parts = list(chunked.iter_rows(sub))
    assert [list(r) for r, _ in parts] == [[1, 3, 5], [6, 9]]
    np.testing.assert_allclose(sp.vstack([b for _, b in parts]).toarray(), ref[sub], rtol=1e-12)


def test_expression_log_normalized_kept_as_stored(counts):
    """kind='log_normalized' returns the stored values as float64."""
    stored = np.log1p(counts).astype(np.float32)
    e = Expression(sp.csr_matrix(stored), None, kind="log_normalized")
    block = e.rows(np.arange(5))
    assert block.dtype == np.float64
    np.testing.assert_array_equal(block.toarray(), stored[:5].astype(np.float64))
