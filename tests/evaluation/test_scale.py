"""The atlas-scale paths (approximate neighbours, sampled silhouettes, scalable label
prediction), forced on small seeded data and checked against the exact ones."""

import numpy as np
import pytest
from conftest import planted_embedding

from czb.core import sampling
from czb.evaluation import distances, estimates, neighbors
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import classification, clustering, mixing, silhouette
from czb.evaluation.registry import get_task
from czb.evaluation.runner import evaluate, run_task


@pytest.fixture(scope="module")
def planted():
    return planted_embedding(3000, separation=2.0, batch_shift=0.5, seed=11)


def test_map_row_blocks_covers_every_row_once_across_threads():
    seen = np.zeros(1000, dtype=int)

    def work(rows):
        seen[rows] += 1

    distances.map_row_blocks(work, np.arange(1000), n_jobs=2, block=37)
    assert (seen == 1).all()


def test_map_row_blocks_reraises_a_worker_error():
    def work(rows):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        distances.map_row_blocks(work, np.arange(100), n_jobs=2, block=10)


def test_exact_knn_of_separate_queries_matches_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(2)
    X, Q = rng.normal(size=(900, 12)), rng.normal(size=(150, 12))
    idx, dist = neighbors.exact_knn(X, 7, queries=Q)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=7).fit(X).kneighbors(Q)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-9)
    assert (idx == ref_idx).all()


def _near_tie_cloud(seed: int = 5) -> np.ndarray:
    """Background cells plus, around cell 0, 40 cells at distances 1 + j·1e-9 that float32
    cannot tell apart (their nearness is the reverse of their row order)."""
    rng = np.random.default_rng(seed)
    background = rng.normal(scale=20.0, size=(600, 6)) + 100.0
    directions = rng.normal(size=(40, 6))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    radii = 1.0 + 1e-9 * np.arange(40)[::-1]
    return np.vstack([np.zeros((1, 6)), directions * radii[:, None], background])


def _reference_knn(X: np.ndarray, k: int) -> np.ndarray:
    diff = X[:, None, :] - X[None, :, :]
    d = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    np.fill_diagonal(d, -1.0)
    return np.lexsort((np.broadcast_to(np.arange(len(X)), d.shape), d), axis=1)[:, :k]


@pytest.mark.parametrize("search", ["exact", "approximate"])
def test_first_neighbours_do_not_depend_on_how_many_were_asked(search):
    # Tasks share one graph built for the largest k of a run; a task's value must be the
    # same as when it runs alone (with a smaller graph), so the first k must not depend on k.
    X = _near_tie_cloud()
    knn = neighbors.exact_knn if search == "exact" else neighbors.approximate_knn
    small, small_dist = knn(X, 15)
    large, large_dist = knn(X, 200)
    assert (small == large[:, :15]).all()
    np.testing.assert_array_equal(small_dist, large_dist[:, :15])
    if search == "exact":  # and they are the float64 nearest, ties by index
        assert (small == _reference_knn(X, 15)).all()
        assert list(small[0, 1:]) == list(range(40, 26, -1))


def test_exact_neighbours_of_tied_cells_are_the_lowest_rows():
    # A lattice: many cells at exactly the same distance; the first k are then the
    # nearest with ties broken by row, whatever k was asked.
    X = np.random.default_rng(4).integers(0, 3, size=(700, 5)).astype(float)
    small, _ = neighbors.exact_knn(X, 15)
    large, _ = neighbors.exact_knn(X, 120)
    reference = _reference_knn(X, 15)
    assert (small[:, 0] == np.arange(len(X))).all()
    assert (small[:, 1:] == reference[:, 1:]).all() and (large[:, 1:15] == reference[:, 1:]).all()


def test_approximate_graph_finds_most_neighbours_and_puts_self_first(planted):
    X, _, _ = planted
    idx, dist = neighbors.approximate_knn(X, 30)
    assert (idx[:, 0] == np.arange(len(X))).all() and (dist[:, 0] == 0).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    recall = neighbors.neighbor_recall(X, idx, ks=(15, 30), sample=300)
    assert recall[15] > 0.95 and recall[30] > 0.9
    again, _ = neighbors.approximate_knn(X, 30)
    assert (again == idx).all()  # deterministic for a seed


def test_neighbor_recall_hand_checked():
    X = np.arange(10, dtype=float)[:, None]  # points on a line: neighbours are known
    exact, _ = neighbors.exact_knn(X, 3)
    assert neighbors.neighbor_recall(X, exact, sample=10) == {3: 1.0}
    wrong = exact.copy()
    wrong[:, 2] = (wrong[:, 0] + 5) % 10  # one of the two non-self neighbours is wrong
    assert neighbors.neighbor_recall(X, wrong, sample=10)[3] == pytest.approx(0.5)


def test_knn_search_switches_to_approximate_above_the_limit(monkeypatch, planted):
    X, _, _ = planted
    calls = []
    real = neighbors.approximate_knn
    monkeypatch.setattr(neighbors, "approximate_knn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(neighbors, "EXACT_MAX_CELLS", 1000)
    neighbors.knn_search(X, X[:50], 5)
    assert calls == [1]
    neighbors.knn_search(X, X[:50], 5, exact=True)
    assert calls == [1]


def test_graph_records_how_it_was_computed(planted):
    X, labels, batches = planted
    exact = evaluate(X, labels=labels, batches=batches, tasks=["batch_integration"], seeds=(0,))[0]
    approx = evaluate(X, labels=labels, batches=batches, tasks=["batch_integration"], seeds=(0,), exact=False)[0]
    assert exact.computation["neighbors"] == {"method": "exact", "k": 200}
    graph = approx.computation["neighbors"]
    assert graph["method"] == "faiss_ivf_flat" and set(graph["recall"]) == {"15", "200"}
    assert approx.computation["silhouette_label"]["method"] == "stratified_sample"
    # The approximate values stay close to the exact ones on the same embedding.
    for m in exact.metrics:
        assert approx.metric(m.name).value == pytest.approx(m.value, abs=0.03), m.name


def test_sampled_silhouette_ci_covers_the_exact_value(planted):
    X, labels, batches = planted
    exact = silhouette.silhouette_label(X, labels)
    assert exact.exact and exact.ci95 is None
    est = silhouette.silhouette_label(X, labels, exact=False, sample_size=600, seed=3)
    assert est.n_sampled >= 600 and est.ci95[0] <= exact.value <= est.ci95[1]
    assert est.ci95[1] - est.ci95[0] < 0.05
    exact_b = silhouette.silhouette_batch(X, labels, batches)
    est_b = silhouette.silhouette_batch(X, labels, batches, exact=False, sample_size=600, seed=3)
    assert est_b.ci95[0] <= exact_b.value <= est_b.ci95[1]


def test_sampled_silhouette_of_a_whole_sample_is_exact(planted):
    X, labels, _ = planted
    whole = silhouette.silhouette_label(X, labels, exact=False, sample_size=len(X))
    assert whole.value == pytest.approx(silhouette.silhouette_label(X, labels).value, abs=1e-9)
    assert whole.ci95[0] == pytest.approx(whole.ci95[1])  # finite-population correction: no error


def test_stratified_sample_keeps_rare_labels():
    strata = np.r_[np.zeros(10_000, int), np.ones(20, int)]
    picked = sampling.stratified_sample(strata, 500, seed=0)
    assert len(picked[0]) == round(500 * 10_000 / 10_020) and len(picked[1]) == 20  # the rare label whole


def test_chunked_mixing_metrics_equal_one_chunk(monkeypatch, planted):
    X, _, batches = planted
    idx, dist = neighbors.exact_knn(X, 90)
    whole = mixing.lisi(idx, dist, batches), mixing.entropy_per_cell(idx, batches)
    monkeypatch.setattr(mixing, "CHUNK_ROWS", 257)
    chunked = mixing.lisi(idx, dist, batches), mixing.entropy_per_cell(idx, batches)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=0, atol=0)
    assert chunked[1] == pytest.approx(whole[1], abs=1e-12)


def test_leiden_on_a_prebuilt_graph_equals_leiden_on_the_matrix(planted):
    X, _, _ = planted
    conn = neighbors.compute_neighbors(X, 15).connectivities(15)
    graph = clustering.igraph_from_adjacency(conn)
    assert (clustering.leiden(graph, 0.8, seed=4) == clustering.leiden(conn, 0.8, seed=4)).all()


def test_scaled_knn_classifier_equals_the_sklearn_pipeline(planted):
    X, labels, _ = planted
    X = X * np.linspace(0.5, 3.0, X.shape[1])  # unequal scales: the scaler matters
    train, test = np.arange(2400), np.arange(2400, 3000)
    ours = classification.ScaledKnnClassifier(5).fit(X[train], labels[train])
    ref = classification.make_classifier("knn", seed=0).fit(X[train], labels[train])
    np.testing.assert_allclose(ours.predict_proba(X[test]), ref.predict_proba(X[test]))
    assert (ours.predict(X[test]) == ref.predict(X[test])).all()


@pytest.mark.parametrize("n_classes", [2, 3, 7])
def test_scaled_logistic_regression_equals_the_sklearn_pipeline(n_classes):
    """Same objective and optimiser as scikit-learn: the same probabilities (to round-off)
    and the same iteration count, binary and multinomial, a constant column included."""
    rng = np.random.default_rng(n_classes)
    centres = rng.normal(size=(n_classes, 12))
    y = rng.integers(0, n_classes, 1500)
    X = (centres[y] + 1.5 * rng.normal(size=(1500, 12))) * np.linspace(0.2, 5.0, 12)
    X[:, 4] = 3.0
    labels = np.char.add("type", y.astype(str))
    ours = classification.ScaledLogisticRegression().fit(X[:1200], labels[:1200])
    ref = classification.make_classifier("lr", seed=0).fit(X[:1200], labels[:1200])
    np.testing.assert_allclose(ours.predict_proba(X[1200:]), ref.predict_proba(X[1200:]), atol=1e-9)
    assert (ours.predict(X[1200:]) == ref.predict(X[1200:])).all()
    assert ours.n_iter_ == ref.named_steps["lr"].n_iter_[0]


def test_atlas_scale_logistic_regression_fits_on_at_most_lr_max_samples(monkeypatch, planted):
    X, labels, _ = planted
    y = np.unique(labels, return_inverse=True)[1]
    fitted = []
    real_fit = classification.ScaledLogisticRegression.fit
    monkeypatch.setattr(classification.ScaledLogisticRegression, "fit",
                        lambda self, X, y: fitted.append(len(X)) or real_fit(self, X, y))
    monkeypatch.setattr(classification, "LR_MAX_SAMPLES", 500)
    train, test = np.arange(2400), np.arange(2400, 3000)
    scores = classification.fit_and_score("lr", X, y, train, test, y.max() + 1, seed=0, atlas_scale=True)
    assert fitted == [500] and scores["accuracy"] > 0.5


def test_atlas_scale_forest_caps_bootstrap_samples_only_for_large_folds():
    big = classification.make_classifier("rf", seed=0, atlas_scale=True, n_train=10 * classification.RF_MAX_SAMPLES)
    small = classification.make_classifier("rf", seed=0, atlas_scale=True, n_train=1000)
    assert isinstance(big, classification.SubsampledForest) and big.max_samples == classification.RF_MAX_SAMPLES
    assert small.named_steps["rf"].max_samples is None


@pytest.mark.parametrize("seed", [0, 7])
def test_subsampled_forest_equals_scikit_learns_forest(seed):
    """Compact bootstrap rows grow scikit-learn's trees: same probabilities, including
    trees whose draw missed the rarest class."""
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=3000, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.04, 0.01])
    X = rng.normal(size=(3000, 12)) + 0.3 * y[:, None]
    test = rng.normal(size=(400, 12)) + 0.3 * rng.integers(0, 7, 400)[:, None]
    labels = np.char.add("type", y.astype(str))
    ref = RandomForestClassifier(n_estimators=20, max_samples=150, random_state=seed, n_jobs=1).fit(X, labels)
    ours = classification.SubsampledForest(n_estimators=20, max_samples=150, seed=seed).fit(X, labels)
    assert any(len(t.classes_) < 7 for t in ours.trees_)
    np.testing.assert_array_equal(ours.predict_proba(test), ref.predict_proba(test))
    assert (ours.predict(test) == ref.predict(test)).all()


@pytest.mark.parametrize("task", ["clustering", "embedding", "label_prediction", "batch_integration"])
def test_atlas_paths_keep_planted_structure_apart_from_noise(task):
    X, labels, batches = planted_embedding(2500, separation=3.0, batch_shift=0.0, seed=12)
    noise = np.random.default_rng(0).normal(size=X.shape)
    score = {}
    for name, emb in (("planted", X), ("noise", noise)):
        ctx = EvaluationContext(emb, labels=labels, batches=batches, exact=False, n_jobs=1)
        t = get_task(task)()
        ctx.plan([t])
        result = run_task(t, ctx, [0], raise_errors=True)
        metric = {"clustering": "adjusted_rand_index", "embedding": "silhouette_score",
                  "label_prediction": "mean_fold_accuracy", "batch_integration": "scib_overall"}[task]
        score[name] = result.metrics[[m.name for m in result.metrics].index(metric)].value
    assert score["planted"] > score["noise"] + 0.2, score


def test_sampled_neighbourhoods_estimate_entropy_and_ilisi_within_their_ci(monkeypatch, planted):
    X, labels, batches = planted
    exact = evaluate(X, labels=labels, batches=batches, tasks=["batch_integration"], seeds=(0,))[0]
    monkeypatch.setattr(mixing, "EXACT_MAX_CELLS", 1000)
    monkeypatch.setattr(estimates, "SAMPLE_SIZE", 1200)
    ctx = EvaluationContext(X, labels=labels, batches=batches)
    task = get_task("batch_integration")()
    ctx.plan([task])
    sampled = run_task(task, ctx, [0], raise_errors=True)
    assert ctx.neighbors(1).k == 15  # the all-cell graph stays small
    assert sampled.computation["neighborhoods"] == {"method": "exact, of sampled cells", "k": 200, "n_sampled": 1200}
    for name in ("entropy_per_cell", "ilisi_normalized"):
        m = sampled.metric(name)
        assert m.ci95[0] <= exact.metric(name).value <= m.ci95[1], name


def test_median_estimate_hand_checked():
    from czb.evaluation.estimates import median_estimate

    whole = median_estimate(np.array([3.0, 1.0, np.nan, 2.0]), n_total=4)
    assert whole.value == 2.0 and whole.ci95 is None  # every cell: exact (NaN left out)
    values = np.arange(100, dtype=float)
    est = median_estimate(values, n_total=10_000)
    # 95% order-statistic interval around rank 50 of 100: ranks 50 ± 1.96·√100/2 ≈ 40..60.
    assert est.value == 49.5 and est.ci95 == (40.0, 60.0)


def test_sample_cells_is_a_simple_random_sample_topped_up_per_stratum():
    strata = np.r_[np.zeros(10_000, int), np.ones(30, int), np.full(200, 2)]
    uniform, extra = estimates.sample_cells(strata, 500, seed=4)
    expected = np.sort(np.random.default_rng(4).choice(len(strata), size=500, replace=False))
    np.testing.assert_array_equal(uniform, expected)  # the plain sample, as drawn before any top-up
    assert not np.isin(extra, uniform).any()
    both = np.r_[uniform, extra]
    counts = np.bincount(strata[both], minlength=3)
    assert counts[1] == 30  # the rare stratum whole
    assert counts[2] == max(sampling.MIN_PER_STRATUM, np.count_nonzero(strata[uniform] == 2))
    assert counts[0] == np.count_nonzero(strata[uniform] == 0)  # never topped up


def test_scan_sample_gives_exact_neighbourhoods_and_silhouettes_from_one_pass(planted):
    X, labels, _ = planted
    both = silhouette.scan_sample(X, labels, silhouette=True, k=40, sample_size=300, seed=1)
    alone_knn = silhouette.scan_sample(X, labels, silhouette=False, k=40, sample_size=300, seed=1)
    alone_sil = silhouette.scan_sample(X, labels, silhouette=True, k=0, sample_size=300, seed=1)
    idx, dist = neighbors.exact_knn(X, 40, queries=X[both.rows])
    np.testing.assert_array_equal(both.indices, idx)
    np.testing.assert_allclose(both.distances, dist, rtol=0, atol=1e-12)
    assert (both.indices[:, 0] == both.rows).all()
    np.testing.assert_array_equal(alone_knn.indices, both.indices)
    assert alone_knn.silhouette is None and alone_sil.indices is None
    assert alone_sil.silhouette == both.silhouette
    # Each sampled cell's silhouette is exact: a sample of every cell gives the exact mean.
    whole = silhouette.scan_sample(X, labels, sample_size=len(X))
    exact = silhouette.silhouette_label(X, labels, rescale=False)
    assert whole.silhouette.value == pytest.approx(exact.value, abs=1e-9)


def test_estimated_silhouette_and_sampled_neighbourhoods_share_one_scan(monkeypatch, planted):
    X, labels, batches = planted
    monkeypatch.setattr(mixing, "EXACT_MAX_CELLS", 1000)
    monkeypatch.setattr(silhouette, "EXACT_MAX_CELLS", 1000)
    monkeypatch.setattr(estimates, "SAMPLE_SIZE", 800)
    scans = []
    real = silhouette._scan
    monkeypatch.setattr(silhouette, "_scan", lambda *a, **kw: scans.append(kw) or real(*a, **kw))
    tasks = [get_task("embedding")(), get_task("batch_integration")()]
    together = evaluate(X, labels=labels, batches=batches, tasks=tasks, seeds=(0,))
    # One scan of the sampled cells for both tasks (the batch silhouette scans within labels).
    assert [kw for kw in scans if kw.get("k")] == [{"sums": True, "k": 200, "n_jobs": None}]
    scans.clear()
    alone = evaluate(X, labels=labels, batches=batches, tasks=[get_task("embedding")()], seeds=(0,))
    assert together[0].metric("silhouette_score").value == alone[0].metric("silhouette_score").value
    assert together[0].metric("silhouette_score").value == together[1].metric("silhouette_score").value
