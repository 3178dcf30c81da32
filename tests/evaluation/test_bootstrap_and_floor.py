"""Bootstrap CIs of per-cell means (carried from estimates to metric values) and the
bio-conservation floor (leave-one-out kNN label accuracy against chance)."""

from __future__ import annotations

import numpy as np
import pytest

from czb.evaluation import estimates
from czb.evaluation.estimates import Bootstrap, Estimate, bootstrap_mean
from czb.evaluation.metrics import bio_floor, mixing, silhouette
from czb.evaluation.neighbors import compute_neighbors
from czb.evaluation.registry import METRICS, load_all
from czb.evaluation.runner import aggregate, evaluate
from czb.evaluation.task import MetricValue

# ----------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("n", [400, 5_000, 200_000])
def test_bootstrap_ci_of_iid_cells_holds_the_mean_with_the_normal_width(n):
    # 200,000 distinct values take the grouped path (more than MAX_LEVELS); 400 the exact one.
    v = np.random.default_rng(n).normal(0.3, 0.2, size=n)
    b = bootstrap_mean([v], seed=1)
    assert b.over == "cells" and b.n_units == n and b.n_resamples == estimates.N_RESAMPLES
    assert b.low < v.mean() < b.high
    assert (b.high - b.low) == pytest.approx(2 * estimates.Z95 * v.std() / np.sqrt(n), rel=0.12)
    assert bootstrap_mean([v], seed=1) == b  # seeded: reproducible


def test_bootstrap_of_zero_one_values_of_a_million_cells_is_quick_and_binomial():
    import time

    correct = (np.random.default_rng(0).random(1_000_000) < 0.3).astype(float)
    start = time.perf_counter()
    b = bootstrap_mean([correct])
    assert time.perf_counter() - start < 1.0  # two Poisson draws per resample, not 10^6
    p = correct.mean()
    assert (b.high - b.low) == pytest.approx(2 * estimates.Z95 * np.sqrt(p * (1 - p) / len(correct)), rel=0.12)


def test_stratified_bootstrap_resamples_within_strata_with_their_weights():
    rng = np.random.default_rng(2)
    groups = [rng.normal(h, 1.0, size=size) for h, size in enumerate((200, 2_000, 20_000))]
    weights = np.full(3, 1 / 3)
    b = bootstrap_mean(groups, weights)
    value = weights @ [g.mean() for g in groups]
    se = np.sqrt(sum(w**2 * g.var() / len(g) for w, g in zip(weights, groups)))
    assert b.low < value < b.high
    assert (b.high - b.low) == pytest.approx(2 * estimates.Z95 * se, rel=0.15)


def test_bootstrap_over_donors_sees_what_cells_hide():
    # Donors shift their cells' values: over cells the CI is narrow, over donors wide.
    rng = np.random.default_rng(3)
    donors = rng.integers(0, 8, size=8_000)
    v = rng.normal(size=8_000) * 0.1 + rng.normal(size=8)[donors]
    over_cells, over_donors = bootstrap_mean([v]), bootstrap_mean([v], clusters=[donors])
    assert over_donors.over == "donors" and over_donors.n_units == 8
    assert (over_donors.high - over_donors.low) > 10 * (over_cells.high - over_cells.low)
    with_missing = bootstrap_mean([v], clusters=[np.where(donors == 0, None, donors).astype(object)])
    assert with_missing.n_units == 8  # cells without a donor form one more


def test_bootstrap_refuses_what_it_cannot_resample():
    assert bootstrap_mean([np.array([1.0])]) is None
    assert bootstrap_mean([np.array([1.0, np.nan])]) is None
    assert bootstrap_mean([np.ones(10), np.array([])], [0.5, 0.5]) is None
    assert bootstrap_mean([np.arange(10.0)], clusters=[np.zeros(10)]) is None  # one donor


def test_bootstrap_json_round_trip_and_damaged_input():
    b = Bootstrap(0.1, 0.2, "donors", 12, 1000)
    assert Bootstrap.from_json(b.to_json()) == b
    for junk in (None, {}, {"ci95": [0.2, 0.1], "over": "cells", "n_units": 3, "n_resamples": 9},
                 {"ci95": ["x", 1], "over": "cells", "n_units": 3, "n_resamples": 9}):
        assert Bootstrap.from_json(junk) is None


def test_estimates_carry_the_bootstrap_through_affine_maps():
    e = Estimate(0.0, None, 10, Bootstrap(-0.2, 0.4, "cells", 10))
    mapped = e.map(lambda s: (s + 1) / 2)
    assert mapped.bootstrap == Bootstrap(0.4, 0.7, "cells", 10)


def _planted(n=600, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=n)
    batches = rng.integers(0, 3, size=n)
    X = rng.normal(size=(n, 8)) + 4.0 * np.eye(8)[labels]
    return X, labels, batches


def test_silhouettes_and_entropy_carry_a_bootstrap_ci_around_their_value():
    X, labels, batches = _planted()
    donors = batches * 2 + (np.arange(len(X)) % 2)
    exact = silhouette.silhouette_label(X, labels)
    sampled = silhouette.silhouette_label(X, labels, exact=False, sample_size=300, seed=4)
    per_donor = silhouette.silhouette_label(X, labels, clusters=donors)
    batch = silhouette.silhouette_batch(X, labels, batches)
    batch_sampled = silhouette.silhouette_batch(X, labels, batches, exact=False, sample_size=300, clusters=donors)
    graph = compute_neighbors(X, 50)
    entropy = mixing.entropy_estimate(graph.indices, batches, n_cells=len(X))
    entropy_sampled = mixing.entropy_estimate(graph.indices[::3], batches, n_cells=len(X),
                                              rows=np.arange(0, len(X), 3), clusters=donors)
    for e in (exact, sampled, per_donor, batch, batch_sampled, entropy, entropy_sampled):
        assert e.bootstrap is not None and e.bootstrap.low <= e.value <= e.bootstrap.high, e
    assert exact.bootstrap.over == "cells" and exact.bootstrap.n_units == len(X)
    assert per_donor.bootstrap.over == batch_sampled.bootstrap.over == entropy_sampled.bootstrap.over == "donors"
    assert per_donor.bootstrap.n_units == 6
    assert exact.value == silhouette.silhouette_label(X, labels, clusters=donors).value  # values unchanged
    assert entropy.value == pytest.approx(mixing.entropy_per_cell(graph.indices, batches))


def test_metric_values_and_aggregates_carry_the_bootstrap():
    b = Bootstrap(0.4, 0.6, "cells", 100)
    v = MetricValue.from_estimate("silhouette_score", Estimate(0.5, (0.45, 0.55), 100, b), classifier="knn")
    assert (v.value, v.ci95, v.bootstrap, v.params) == (0.5, (0.45, 0.55), b, {"classifier": "knn"})
    (same,) = aggregate([v, MetricValue.from_estimate("silhouette_score", Estimate(0.5, (0.45, 0.55), 100, b),
                                                      classifier="knn")])
    assert same.bootstrap == b
    (differ,) = aggregate([MetricValue("x", 0.5, bootstrap=b), MetricValue("x", 0.6, bootstrap=b)])
    assert differ.bootstrap is None  # seed-dependent values: no one interval


def test_embedding_task_reports_its_silhouette_with_a_bootstrap_ci():
    X, labels, _ = _planted()
    (result,) = evaluate(X, labels=labels, tasks=["embedding"], seeds=[0])
    m = result.metric("silhouette_score")
    assert m.bootstrap is not None and m.bootstrap.low < m.value < m.bootstrap.high


def test_per_cell_means_are_declared():
    load_all()
    for name in ("silhouette_score", "batch_silhouette", "entropy_per_cell", "knn_label_accuracy"):
        assert METRICS[name].per_cell_mean and not METRICS[name].aggregate, name
    assert not METRICS["ilisi_normalized"].per_cell_mean  # a median


# ----------------------------------------------------------------------------- floor


def test_floor_flags_a_random_embedding_and_not_one_that_keeps_the_labels():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 9, size=3_000)
    good = 3.0 * rng.normal(size=(9, 20))[labels] + rng.normal(size=(3_000, 20))
    floors = {}
    for name, X in (("good", good), ("random", rng.normal(size=(3_000, 20)))):
        graph = compute_neighbors(X, bio_floor.GRAPH_K)
        floors[name] = bio_floor.knn_label_floor(graph.knn(bio_floor.GRAPH_K)[0], labels)
    chance = np.bincount(labels).max() / len(labels)
    assert floors["good"].chance == floors["random"].chance == pytest.approx(chance)
    assert floors["good"].accuracy.value > 0.95 and not floors["good"].near_chance
    assert floors["random"].accuracy.value < chance + 0.05 and floors["random"].near_chance
    assert floors["good"].k == 14
    b = floors["random"].accuracy.bootstrap
    assert b.low < floors["random"].accuracy.value < b.high


def test_floor_votes_by_majority_and_breaks_ties_toward_the_nearest():
    labels = np.array(["a", "a", "b", "b", "c"])
    knn = np.array([
        [0, 2, 3, 1],  # b, b, a: majority b (wrong)
        [1, 0, 4, 2],  # a, c, b: a three-way tie, the nearest (a) wins (right)
        [2, 4, 0, 3],  # c, a, b: tie, nearest c (wrong)
        [3, 2, 2, 0],  # b, b, a: b (right)
        [4, 4, 4, 4],  # itself only: its own label (a graph of duplicates)
    ])
    floor = bio_floor.knn_label_floor(knn, labels)
    assert floor.accuracy.value == pytest.approx(3 / 5)
    assert floor.chance == pytest.approx(2 / 5)


def test_near_chance_rule_matches_the_issue_example():
    assert bio_floor.near_chance(0.116, 0.11)  # the random embedding of the issue
    assert not bio_floor.near_chance(0.917, 0.11)  # the uncorrected one that keeps biology
    assert bio_floor.near_chance(0.6, 0.55) and not bio_floor.near_chance(0.7, 0.55)  # kappa 0.11 vs 0.33
    assert bio_floor.near_chance(1.0, 1.0)  # one label: nothing to recover


def test_floor_note_round_trip_and_untrusted_notes():
    labels = np.repeat([0, 1], 50)
    X = np.eye(2)[labels] * 5 + np.random.default_rng(6).normal(size=(100, 2))
    floor = bio_floor.knn_label_floor(compute_neighbors(X, 15).knn(15)[0], labels)
    note = floor.describe()
    assert note["near_chance"] is False and note["metric"] == "knn_label_accuracy" and note["k"] == 14
    assert bio_floor.floor_from_note(note) == (floor.accuracy.value, 0.5)
    for junk in (None, "x", {"accuracy": 2.0, "chance": 0.5}, {"accuracy": True, "chance": 0.5},
                 {"accuracy": float("nan"), "chance": 0.5}, {"chance": 0.5}):
        assert bio_floor.floor_from_note(junk) is None
