"""czb's scIB metrics against scib-metrics 0.5.10 (a test dependency) on seeded inputs
neither was tuned on: Gaussian cell types of unequal sizes, batches shifting them, one
type confined to one batch (an isolated label). Both get the same exact kNN graph.

Tolerances, per metric: isolated labels, cLISI and PCR 1e-5 (scib-metrics computes in
float32 with JAX); graph connectivity and the Benchmarker totals 1e-12 (same arithmetic);
kBET 1e-12 per label with scib-metrics' approximate diffusion neighbours replaced by
exact ones and 0.03 overall with them (pynndescent); k-means NMI/ARI 1e-12 from the same
start, the starts themselves being drawn by different generators (JAX / NumPy).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

sm = pytest.importorskip("scib_metrics")
from scib_metrics.nearest_neighbors import NeighborsResults  # noqa: E402

from czb.evaluation.metrics import aggregate as agg  # noqa: E402
from czb.evaluation.metrics import clustering as clu  # noqa: E402
from czb.evaluation.metrics import kbet, scib  # noqa: E402
from czb.evaluation.neighbors import exact_knn, umap_connectivities  # noqa: E402

logging.getLogger("scib_metrics").setLevel(logging.WARNING)


def blobs(seed: int, *, n: int = 3000, n_types: int = 6, n_batches: int = 3, dim: int = 10,
          separation: float = 3.0, shift: float = 1.0):
    """Cell types of unequal sizes (each over 100 cells), shifted per batch; type ``t0`` is
    in batch ``b0`` only. Returns the embedding, labels, batches and a 'pre-integration'
    version of it with stronger batch shifts."""
    rng = np.random.default_rng(seed)
    share = np.maximum(rng.dirichlet(np.full(n_types, 2.0)), 0.06)
    types = rng.choice(n_types, size=n, p=share / share.sum())
    batches = rng.choice(n_batches, size=n, p=rng.dirichlet(np.full(n_batches, 3.0)))
    batches[types == 0] = 0
    centres = rng.normal(0.0, separation, (n_types, dim))
    X = centres[types] + rng.normal(0.0, shift, (n_batches, dim))[batches] + rng.normal(size=(n, dim))
    pre = X + rng.normal(0.0, 2.0, (n_batches, dim))[batches]
    return (X.astype(np.float32), np.char.add("t", types.astype(str)), np.char.add("b", batches.astype(str)),
            pre.astype(np.float32))


#: Held-out inputs: well-separated types, and overlapping ones with weaker batch shifts.
CASES = {"separated": dict(seed=101), "overlapping": dict(seed=102, separation=1.2, shift=0.5)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    X, labels, batches, pre = blobs(**CASES[request.param])
    idx, dist = exact_knn(X, 90)
    return dict(name=request.param, X=X, labels=labels, batches=batches, pre=pre, idx=idx, dist=dist,
                nn=NeighborsResults(indices=idx, distances=dist))


def test_isolated_labels_equal_scib_metrics(case):
    X, labels, batches = case["X"], case["labels"], case["batches"]
    assert list(scib.isolated_label_set(labels, batches)) == ["t0"]
    ours = scib.isolated_labels(X, labels, batches)
    assert ours.exact
    assert ours.value == pytest.approx(float(sm.isolated_labels(X, labels, batches)), abs=1e-5)
    # Every label in every batch: all are isolated (the threshold is the minimum count).
    everywhere = np.char.add("b", (np.arange(len(X)) % 3).astype(str))
    assert set(scib.isolated_label_set(labels, everywhere)) == set(np.unique(labels))
    assert scib.isolated_labels(X, labels, everywhere).value == pytest.approx(
        float(sm.isolated_labels(X, labels, everywhere)), abs=1e-5)


def test_isolated_labels_read_silhouettes_already_computed(case):
    from czb.evaluation.metrics.silhouette import silhouette_samples

    X, labels, batches = case["X"], case["labels"], case["batches"]
    own = scib.isolated_labels(X, labels, batches).value
    shared = scib.isolated_labels(X, labels, batches, silhouettes=silhouette_samples(X, labels)).value
    assert shared == pytest.approx(own, abs=1e-12)
    # read, not scanned again: silhouettes of 1 everywhere rescale to 1
    assert scib.isolated_labels(X, labels, batches, silhouettes=np.ones(len(X))).value == 1.0


def test_isolated_labels_estimate_covers_the_exact_value(case):
    X, labels = case["X"], case["labels"]
    everywhere = np.char.add("b", (np.arange(len(X)) % 3).astype(str))
    exact = scib.isolated_labels(X, labels, everywhere).value
    estimate = scib.isolated_labels(X, labels, everywhere, exact=False, sample_size=600, seed=3)
    assert estimate.n_sampled < len(X)
    low, high = estimate.ci95
    assert low <= exact <= high and high - low < 0.05


def test_clisi_equals_scib_metrics(case):
    ours = scib.clisi_estimate(case["idx"], case["dist"], case["labels"], n_cells=len(case["X"]))
    assert ours.value == pytest.approx(float(sm.clisi_knn(case["nn"], case["labels"])), abs=1e-5)


def test_clisi_of_sampled_neighbourhoods_has_an_ordered_ci(case):
    rows = np.sort(np.random.default_rng(0).choice(len(case["X"]), 800, replace=False))
    full = scib.clisi_estimate(case["idx"], case["dist"], case["labels"], n_cells=len(case["X"]))
    sampled = scib.clisi_estimate(case["idx"][rows], case["dist"][rows], case["labels"], n_cells=len(case["X"]),
                                  rows=rows)
    low, high = sampled.ci95
    assert low <= sampled.value <= high and low <= full.value + 1e-9 and full.value <= high + 1e-9


def test_graph_connectivity_equals_scib_metrics(case):
    ours = scib.graph_connectivity(case["idx"][:, :15], case["labels"])
    theirs = float(sm.graph_connectivity(case["nn"].subset_neighbors(15), case["labels"]))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_graph_connectivity_counts_largest_piece_per_label():
    # Label a: cells 0-2 a directed cycle (strongly connected), cell 3 only points in.
    idx = np.array([[0, 1], [1, 2], [2, 0], [3, 0], [4, 3]])
    labels = np.array(["a", "a", "a", "a", "b"])
    assert scib.graph_connectivity(idx, labels) == pytest.approx((3 / 4 + 1) / 2)
    assert scib.graph_connectivity(idx, labels, cells=labels == "a") == pytest.approx(3 / 4)


def test_pcr_comparison_equals_scib_metrics(case):
    pre = scib.principal_component_regression(case["pre"], case["batches"])
    post = scib.principal_component_regression(case["X"], case["batches"])
    ours = scib.pcr_comparison(pre, post)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = float(sm.pcr_comparison(case["pre"], case["X"], case["batches"], categorical=True))
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert 0.0 < ours < 1.0
    # The reverse comparison adds batch variance: clipped to 0, as scib-metrics does.
    assert scib.pcr_comparison(post, pre) == 0.0
    assert np.isnan(scib.pcr_comparison(0.0, post))


@pytest.fixture
def scib_kbet_recorder(monkeypatch):
    """scib-metrics' kBET with its top float32 eigenvalue of every label recorded."""
    import scib_metrics.utils._diffusion_nn as diffusion

    tops = []
    eigen = diffusion._compute_eigen

    def recorded(*args, **kwargs):
        values, vectors = eigen(*args, **kwargs)
        tops.append(float((values + np.float32(1e-8))[0]))
        return values, vectors

    monkeypatch.setattr(diffusion, "_compute_eigen", recorded)
    return diffusion, tops


def _per_label_scib_kbet(nn, batches, labels, tops):
    tops.clear()
    _, frame = sm.kbet_per_label(nn, batches, labels, return_df=True)
    return dict(zip(frame["cluster"], frame["kBET"]))


#: scib-metrics' kBET with its own (pynndescent) diffusion neighbours, in a fresh process:
#: numba's threading cannot always start in a test process that has run Ray or forked.
#: Every case in one process, so numba compiles pynndescent once.
_SCIB_KBET = """
import json, sys
import numpy as np
import scib_metrics as sm
from scib_metrics.nearest_neighbors import NeighborsResults
out = {}
for path in sys.argv[1:]:
    d = np.load(path, allow_pickle=False)
    _, frame = sm.kbet_per_label(NeighborsResults(indices=d["idx"], distances=d["dist"]), d["batches"],
                                 d["labels"], return_df=True)
    out[path] = float(np.nanmean(frame["kBET"].to_numpy(dtype=float)))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def scib_kbet_approximate(tmp_path_factory):
    """scib-metrics' kBET per label of every case (50 neighbours), by case name."""
    import json
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("scib_kbet")
    paths = {}
    for name in sorted(CASES):
        X, labels, batches, _ = blobs(**CASES[name])
        idx, dist = exact_knn(X, 50)
        paths[name] = str(folder / f"{name}.npz")
        np.savez(paths[name], idx=idx, dist=dist, labels=np.asarray(labels, dtype=str),
                 batches=np.asarray(batches, dtype=str))
    done = subprocess.run([sys.executable, "-c", _SCIB_KBET, *paths.values()], capture_output=True, text=True,
                          timeout=600, check=True)
    values = json.loads(done.stdout.strip().splitlines()[-1])
    return {name: values[path] for name, path in paths.items()}


def test_kbet_per_label_is_near_scib_metrics_with_its_approximate_graph(case, scib_kbet_approximate):
    idx, dist, labels, batches = case["idx"][:, :50], case["dist"][:, :50], case["labels"], case["batches"]
    theirs = scib_kbet_approximate[case["name"]]
    assert kbet.kbet_per_label(umap_connectivities(idx, dist), batches, labels) == pytest.approx(theirs, abs=0.03)


def test_kbet_per_label_equals_scib_metrics(case, scib_kbet_recorder, monkeypatch):
    diffusion, tops = scib_kbet_recorder
    idx, dist, labels, batches = case["idx"][:, :50], case["dist"][:, :50], case["labels"], case["batches"]
    nn = case["nn"].subset_neighbors(50)
    ours = kbet.kbet_label_scores(umap_connectivities(idx, dist), batches, labels)
    assert np.isnan(ours["t0"])  # one batch only: not scored

    # With exact diffusion neighbours: equal per label, except where scib-metrics' float32
    # top eigenvalue is not 1 (its embedding then collapses; see kbet_per_label).
    def exact(X, n_neighbors, **_):
        return NeighborsResults(*exact_knn(np.asarray(X, dtype=np.float64), n_neighbors))

    monkeypatch.setattr(diffusion.nearest_neighbors, "pynndescent", exact)
    theirs = _per_label_scib_kbet(nn, batches, labels, tops)
    scored = [label for label in sorted(ours) if np.isfinite(ours[label])]
    assert len(tops) == len(scored)  # one eigendecomposition per scored label, in sorted order
    compared = [label for label, top in zip(scored, tops) if top == 1.0]
    assert len(compared) >= len(scored) - 1
    for label in compared:
        assert ours[label] == pytest.approx(theirs[label], abs=1e-12), label


def test_kbet_components_do_not_depend_on_other_labels(monkeypatch):
    # scib-metrics lowers its diffusion components to the smallest label scored before
    # (in sorted order); here each label keeps min(100, its cells - 1).
    X, labels, batches, _ = blobs(7)
    labels = labels.copy()
    labels[np.flatnonzero(labels == "t1")[:40]] = "a_small"  # sorts first, 40 cells
    calls = []
    real = kbet.diffusion_embedding

    def spy(connectivities, n_components):
        calls.append((connectivities.shape[0], n_components))
        return real(connectivities, n_components)

    monkeypatch.setattr(kbet, "diffusion_embedding", spy)
    scores = kbet.kbet_label_scores(umap_connectivities(*exact_knn(X, 50)), batches, labels)
    assert np.isfinite(scores["a_small"]) and calls[0] == (40, 39)
    assert all(c == min(kbet.DIFFUSION_COMPONENTS, n - 1) for n, c in calls)
    assert any(c == kbet.DIFFUSION_COMPONENTS for _, c in calls[1:])


def test_kbet_acceptance_chi_square():
    # Two batches of equal size: a neighbourhood of 10 from one batch is rejected
    # (chi2 = 10, p = 0.0016), a 5/5 one accepted (chi2 = 0, p = 1).
    batches = np.array(["a"] * 10 + ["b"] * 10)
    mixed = np.array([list(range(5)) + list(range(10, 15))] * 20)
    pure = np.array([list(range(10))] * 20)
    assert kbet.kbet_acceptance(mixed, batches) == 1.0
    assert kbet.kbet_acceptance(pure, batches) == 0.0
    theirs, _, _ = sm.kbet(NeighborsResults(indices=pure, distances=np.ones(pure.shape)), batches)
    assert theirs == 0.0


def _scib_start(X: np.ndarray, n_clusters: int) -> np.ndarray:
    """scib-metrics' own k-means++ start (seed 0), in the data's coordinates."""
    import jax
    from scib_metrics.utils._kmeans import _initialize_plus_plus
    from scib_metrics.utils._utils import validate_seed

    X = np.asarray(X, dtype=np.float32)
    mean = X.mean(axis=0)
    key = jax.random.split(validate_seed(0), 1)[0]
    return np.asarray(_initialize_plus_plus(X - mean, n_clusters, key)) + mean


def test_kmeans_nmi_ari_equal_scib_metrics_from_its_start(case):
    X, labels = case["X"], case["labels"]
    n_clusters = len(np.unique(labels))
    theirs = sm.nmi_ari_cluster_labels_kmeans(X, labels)
    clusters = scib.kmeans_clusters(X, n_clusters, seed=0, init=_scib_start(X, n_clusters))
    assert clu.normalized_mutual_info(labels, clusters) == pytest.approx(float(theirs["nmi"]), abs=1e-12)
    assert clu.adjusted_rand_index(labels, clusters) == pytest.approx(float(theirs["ari"]), abs=1e-12)


def test_kmeans_nmi_ari_of_separated_types_equal_scib_metrics():
    X, labels, _, _ = blobs(103, separation=8.0)
    theirs = sm.nmi_ari_cluster_labels_kmeans(X, labels)
    for seed in (0, 1, 2):
        nmi, ari = scib.nmi_ari_kmeans(X, labels, seed=seed)
        assert (nmi, ari) == pytest.approx((float(theirs["nmi"]), float(theirs["ari"])), abs=1e-12)


# ------------------------------------------------------------------ Benchmarker totals

#: czb's metric names for the Benchmarker's.
SCIB_NAMES = {
    "silhouette_label": "silhouette_score", "isolated_labels": "isolated_labels", "clisi_knn": "clisi_normalized",
    "nmi_ari_cluster_labels_kmeans_nmi": "nmi_kmeans", "nmi_ari_cluster_labels_kmeans_ari": "ari_kmeans",
    "silhouette_batch": "batch_silhouette", "ilisi_knn": "ilisi_normalized", "kbet_per_label": "kbet_per_label",
    "graph_connectivity": "graph_connectivity", "pcr_comparison": "pcr_comparison",
}


def _benchmarker(values: dict[str, list[float]], models: list[str]):
    from scib_metrics.benchmark import Benchmarker

    bench = Benchmarker(None, "batch", "labels", embedding_obsm_keys=models)
    for name, row in values.items():
        kind = "Bio conservation" if SCIB_NAMES[name] in agg.BIO_METRICS else "Batch correction"
        for model, value in zip(models, row):
            bench._results.loc[name, model] = value
        bench._results.loc[name, "Metric Type"] = kind
    return bench


def test_scaled_totals_equal_the_benchmarkers():
    rng = np.random.default_rng(5)
    models = ["scvi", "pca", "random", "harmony"]
    values = {name: list(rng.uniform(0, 1, len(models))) for name in SCIB_NAMES}
    values["pcr_comparison"] = [0.3] * 4  # equal for all: scales to 0
    values["kbet_per_label"][2] = np.nan  # one model lacks a value: its group mean skips it
    bench = _benchmarker(values, models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = bench.get_results(min_max_scale=True)
    ours = agg.scaled_scib_totals(
        {m: {SCIB_NAMES[n]: v[i] for n, v in values.items()} for i, m in enumerate(models)})
    for model in models:
        assert ours[model]["scib_bio_conservation"] == pytest.approx(theirs.loc[model, "Bio conservation"], abs=1e-12)
        assert ours[model]["scib_batch_correction"] == pytest.approx(theirs.loc[model, "Batch correction"], abs=1e-12)
        assert ours[model]["scib_overall"] == pytest.approx(theirs.loc[model, "Total"], abs=1e-12)


def test_raw_totals_are_the_benchmarkers_unscaled_means():
    models = ["a", "b"]
    values = {name: [0.1 * (i + 1), 0.05 * (i + 2)] for i, name in enumerate(SCIB_NAMES)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _benchmarker(values, models).get_results(min_max_scale=False)
    for i, model in enumerate(models):
        raw = {SCIB_NAMES[n]: v[i] for n, v in values.items()}
        ours = agg.scib_scores(bio=[raw[n] for n in agg.BIO_METRICS], batch=[raw[n] for n in agg.BATCH_METRICS])
        assert ours["scib_overall"] == pytest.approx(float(theirs.loc[model, "Total"]), abs=1e-12)
        assert ours["scib_bio_conservation"] == pytest.approx(float(theirs.loc[model, "Bio conservation"]), abs=1e-12)


def test_scaled_totals_of_one_model_are_zero():
    # The Benchmarker's rule (a constant column scales to 0); no comparison, no ranking.
    out = agg.scaled_scib_totals({"only": {"silhouette_score": 0.7, "kbet_per_label": 0.4}})
    assert out["only"] == {"scib_bio_conservation": 0.0, "scib_batch_correction": 0.0, "scib_overall": 0.0}
    assert np.isnan(agg.scaled_scib_totals({"m": {}})["m"]["scib_overall"])
