"""Every metric against a reference implementation or a hand-checked case, on seeded data."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import planted_embedding

from czb.evaluation.metrics import classification, clustering, mixing, silhouette
from czb.evaluation.neighbors import compute_neighbors, exact_knn
from czb.evaluation.registry import METRICS, TASKS, load_all

DATA = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def pbmc():
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def test_exact_knn_matches_sklearn():
    from sklearn.neighbors import NearestNeighbors

    X = np.random.default_rng(1).normal(size=(600, 8))
    idx, dist = exact_knn(X, 20)
    ref_dist, ref_idx = NearestNeighbors(n_neighbors=20).fit(X).kneighbors(X)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-9)
    assert (idx == ref_idx).mean() > 0.999  # ties may order differently
    assert (idx[:, 0] == np.arange(600)).all()


def test_self_is_first_even_with_duplicate_cells():
    X = np.zeros((10, 3))
    idx, dist = exact_knn(X, 4)
    assert (idx[:, 0] == np.arange(10)).all()
    assert (dist == 0).all()


def test_connectivities_match_scanpy(pbmc):
    import anndata
    import scanpy as sc

    X = np.asarray(pbmc.obsm["X_pca"], dtype=np.float64)
    ref = anndata.AnnData(X=X)
    sc.pp.neighbors(ref, use_rep="X", n_neighbors=15)
    ours = compute_neighbors(X, 15).connectivities(15)
    assert abs(ours - ref.obsp["connectivities"]).max() < 1e-5
    assert ours.nnz == ref.obsp["connectivities"].nnz
    assert abs(ours - ours.T).max() == 0


def test_leiden_identical_to_scanpy(pbmc):
    import anndata
    import scanpy as sc

    X = np.asarray(pbmc.obsm["X_pca"], dtype=np.float64)
    ref = anndata.AnnData(X=X)
    sc.pp.neighbors(ref, use_rep="X", n_neighbors=15)
    graph = compute_neighbors(X, 15).connectivities(15)
    for seed in (0, 42):
        sc.tl.leiden(ref, flavor="igraph", n_iterations=2, random_state=seed)
        expected = ref.obs["leiden"].astype(int).to_numpy()
        got = clustering.leiden(graph, 1.0, seed=seed)
        assert clustering.adjusted_rand_index(expected, got) == 1.0


class _ScanpyIgraphRNG:
    """scanpy's igraph RNG wrapper: one numpy call per draw."""

    def __init__(self, seed):
        self._rng = np.random.RandomState(seed)

    def getrandbits(self, k):
        return self._rng.tomaxint() & ((1 << k) - 1)

    def randint(self, a, b):
        return self._rng.randint(a, b + 1)

    def random(self):
        return self._rng.random_sample()

    def gauss(self, mu, sigma):
        return self._rng.normal(mu, sigma)


@pytest.mark.parametrize("seed", [0, 42])
def test_igraph_rng_draws_scanpys_stream(seed):
    """Drawn in blocks, the same values in the same order as one numpy call per draw,
    across block boundaries and after a variable-length draw (randint, gauss) hands the
    stream over to a RandomState."""
    ours, theirs = clustering._IgraphRNG(seed), _ScanpyIgraphRNG(seed)
    ops = np.random.default_rng(seed).integers(0, 3, size=clustering._IgraphRNG.BLOCK + 5000)
    for i, op in enumerate(ops):
        if i == clustering._IgraphRNG.BLOCK + 100:  # in the second block
            assert ours.randint(0, 10**6) == theirs.randint(0, 10**6)
            assert ours.gauss(1.0, 2.0) == theirs.gauss(1.0, 2.0)
        if op == 0:
            assert ours.getrandbits(32) == theirs.getrandbits(32)
        elif op == 1:
            assert ours.getrandbits(64) == theirs.getrandbits(64)
        else:
            assert ours.random() == theirs.random()


def test_igraph_rng_hands_over_mid_block_and_before_any_draw():
    for before in (0, 3):
        ours, theirs = clustering._IgraphRNG(7), _ScanpyIgraphRNG(7)
        for _ in range(before):
            assert ours.random() == theirs.random()
        assert ours.randint(5, 9) == theirs.randint(5, 9)
        assert [ours.getrandbits(31) for _ in range(10)] == [theirs.getrandbits(31) for _ in range(10)]


def test_leiden_many_equals_one_at_a_time():
    X, _, _ = planted_embedding(300)
    graph = compute_neighbors(X, 15).connectivities()
    many = clustering.leiden_many(graph, [0.4, 1.0, 2.0], seed=3)
    for r, got in zip([0.4, 1.0, 2.0], many):
        assert np.array_equal(got, clustering.leiden(graph, r, seed=3))


def test_leiden_restores_global_igraph_rng():
    import random

    import igraph

    X, _, _ = planted_embedding(200)
    clustering.leiden(compute_neighbors(X, 15).connectivities(), seed=3)
    assert igraph.Graph.Erdos_Renyi(5, 0.5) is not None  # igraph still usable with its default RNG
    assert random.random() is not None


def test_ari_nmi_are_sklearns():
    """Bit-identical to scikit-learn, special cases included: single clusters, identical
    partitions, string labels, empty input."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    for case in range(120):
        n = int(rng.integers(1, 300))
        a, b = rng.integers(0, rng.integers(1, 6), n), rng.integers(0, rng.integers(1, 8), n)
        if case % 3 == 0:
            a = np.char.add("type", a.astype(str))
        if case % 5 == 0:
            b = a.copy()
        assert clustering.adjusted_rand_index(a, b) == adjusted_rand_score(a, b), case
        assert clustering.normalized_mutual_info(a, b) == normalized_mutual_info_score(a, b), case
    assert clustering.adjusted_rand_index([], []) == adjusted_rand_score([], []) == 1.0
    assert clustering.normalized_mutual_info([], []) == normalized_mutual_info_score([], []) == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        clustering.adjusted_rand_index([0, 1], [0])


def test_silhouette_samples_matches_sklearn():
    from sklearn.metrics import silhouette_samples

    X, labels, _ = planted_embedding(700, separation=1.0)
    labels = labels.copy()
    labels[3] = "singleton"  # sklearn gives 0 to clusters of one cell
    # Distances come from float32 GEMMs (float64 sums): agreement to ~1e-7 per cell.
    np.testing.assert_allclose(silhouette.silhouette_samples(X, labels), silhouette_samples(X, labels), atol=1e-6)


def test_silhouette_score_equals_scib_metrics_silhouette_label():
    import scib_metrics

    X, labels, _ = planted_embedding(1200, separation=1.5, seed=4)
    assert abs(silhouette.silhouette_label(X, labels).value - scib_metrics.silhouette_label(X, labels)) < 1e-6
    assert abs(silhouette.silhouette_label(X, labels, rescale=False).value
               - scib_metrics.silhouette_label(X, labels, rescale=False)) < 1e-6


def test_batch_silhouette_equals_scib_metrics():
    import scib_metrics

    X, labels, batches = planted_embedding(1200, batch_shift=1.5, seed=5)
    ours = silhouette.silhouette_batch(X, labels, batches).value
    assert abs(ours - scib_metrics.silhouette_batch(X, labels, batches)) < 1e-6


def test_entropy_per_cell_hand_checked():
    # Two cells per neighbourhood of 4: batches a,a,b,b -> entropy log 2 / log 2 = 1;
    # a,a,a,a -> 0. Mean over the two cells = 0.5.
    knn = np.array([[0, 1, 2, 3], [1, 0, 4, 5]])
    batches = np.array(["a", "a", "b", "b", "a", "a"])
    assert mixing.entropy_per_cell(knn, batches) == pytest.approx(0.5)
    # Three batches, each 1/3 of the neighbourhood: normalised entropy 1.
    knn3 = np.array([[0, 1, 2]])
    assert mixing.entropy_per_cell(knn3, np.array(["x", "y", "z"])) == pytest.approx(1.0)


def test_entropy_per_cell_matches_cz_benchmarks_formula():
    # cz-benchmarks: counts of each batch among k=200 neighbours (self included),
    # p = counts / k, sum(-p log p) / log(n_batches), mean over cells.
    from sklearn.neighbors import NearestNeighbors

    X, _, batches = planted_embedding(800, batch_shift=1.0, seed=6)
    ind = NearestNeighbors(n_neighbors=200).fit(X).kneighbors(X, return_distance=False)
    uniq = np.unique(batches)
    counts = np.stack([(batches[ind] == b).sum(1) for b in uniq], axis=1) / 200
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = np.mean(np.nansum(-counts * np.where(counts > 0, np.log(counts), 0), 1) / np.log(len(uniq)))
    graph = compute_neighbors(X, 200)
    assert mixing.entropy_per_cell(graph.knn(200)[0], batches) == pytest.approx(expected, abs=1e-12)


def test_lisi_matches_scib_metrics():
    import scib_metrics
    from scib_metrics.nearest_neighbors import NeighborsResults

    X, _, batches = planted_embedding(1000, batch_shift=1.0, seed=7)
    idx, dist = compute_neighbors(X, 90).knn(90)
    ref = NeighborsResults(indices=idx, distances=dist)
    np.testing.assert_allclose(mixing.lisi(idx, dist, batches), scib_metrics.lisi_knn(ref, batches), rtol=1e-4)
    assert mixing.ilisi_normalized(idx, dist, batches) == pytest.approx(
        float(scib_metrics.ilisi_knn(ref, batches)), abs=1e-5
    )


def test_lisi_hand_checked_uniform_neighbourhood():
    # Equidistant neighbours split evenly over 2 batches: weights 1/2 each -> LISI 2.
    idx = np.array([[0, 1, 2, 3, 4]])
    dist = np.array([[0.0, 1.0, 1.0, 1.0, 1.0]])
    batches = np.array(["a", "a", "b", "a", "b"])
    # neighbours 1..4 are a, b, a, b
    assert mixing.lisi(idx, dist, batches, perplexity=2)[0] == pytest.approx(2.0, abs=1e-6)


def test_label_prediction_matches_cz_benchmarks_on_pbmc(pbmc):
    reference = json.loads((DATA / "cz_benchmarks_0.15.1_label_prediction_pbmc68k.json").read_text())
    cv = classification.cross_validate_classifiers(
        np.asarray(pbmc.obsm["X_pca"]), pbmc.obs["bulk_labels"].to_numpy(), seed=42, n_jobs=2
    )
    assert cv.dropped_labels == ["CD4+/CD45RA+/CD25- Naive T"]  # 8 cells < 10
    for row in reference["metrics"]:
        score = row["metric"].removeprefix("mean_fold_")
        folds = cv.folds if row["classifier"].startswith("MEAN") else cv.folds[cv.folds.classifier == row["classifier"]]
        assert folds[score].mean() == pytest.approx(row["value"], abs=0.02), row


def test_fold_scores_hand_checked():
    y = np.array([0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    s = classification.score_fold(y, proba.argmax(1), proba, 2)
    assert s["accuracy"] == 0.75
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == 1.0
    assert s["auroc"] == 1.0


def test_every_metric_declares_metadata():
    load_all()
    assert len(METRICS) >= 15
    for info in METRICS.values():
        assert info.description and info.reference
        low, high = info.range
        assert low is None or high is None or low < high
    for task in TASKS.values():
        assert set(task.info.metrics) <= set(METRICS)
