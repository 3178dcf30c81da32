"""sequential_organization: cz-benchmarks 0.15.1 agreement, hand-checked values, seeding,
planted structure, and the errors a user sees."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from czb.core.errors import TaskError
from czb.evaluation import EvaluationContext
from czb.evaluation.metrics import sequential as seq
from czb.evaluation.neighbors import exact_knn
from czb.evaluation.registry import METRICS, TASKS, get_task, load_all
from czb.evaluation.runner import run_task
from czb.evaluation.tasks.sequential_organization import ordered_time_points

load_all()
DATA = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from sequential_cases import make_cases  # noqa: E402 - the cases the reference was computed on


@pytest.fixture(scope="module")
def reference():
    ref = json.loads((DATA / "cz_benchmarks_0.15.1_sequential.json").read_text())
    cases = make_cases()
    assert set(cases) == set(ref["cases"])
    for name, (X, labels) in cases.items():
        r = ref["cases"][name]
        t = ordered_time_points(labels)
        assert np.sum(X) == pytest.approx(r["checksum_X"], abs=1e-9), name
        assert np.sum(t) == pytest.approx(r["checksum_t"], abs=1e-9), name
    return ref, cases


def _graph(X, k, adaptive):
    n = X.shape[0]
    columns = seq.adaptive_columns_needed(n, k) if adaptive else k + 1
    return exact_knn(X, columns)


def test_neighbour_distance_and_exact_baseline_equal_cz_benchmarks(reference):
    """The deterministic part (normalize=False, fixed and adaptive k) agrees to float rounding."""
    ref, cases = reference
    for name, (X, labels) in cases.items():
        t = ordered_time_points(labels)
        r = ref["cases"][name]
        assert seq.expected_random_distance(t) == pytest.approx(r["exact_baseline"], rel=1e-12)
        for v in r["variants"]:
            idx, dist = _graph(X, v["k"], v["adaptive_k"])
            ours = seq.sequential_alignment(
                idx, t, v["k"], normalize=False, adaptive_k=v["adaptive_k"], knn_distances=dist
            )
            assert ours == pytest.approx(v["distance"], rel=1e-12, abs=1e-12), (name, v["k"], v["adaptive_k"])


def test_normalised_score_agrees_within_baseline_noise(reference):
    """cz-benchmarks' normalised score moves from call to call with its unseeded baseline B.

    Both implementations draw B the same way (unbiased for the exact mean pair distance
    E, spread sd_B, recorded over the reference's repeated calls). By the delta method
    the score 1 - D/B has spread (D / E^2) sd_B, so ours (one seeded draw) and the mean
    of their R calls differ by at most 5 (D / E^2) sd_B sqrt(1 + 1/R) but for a
    ~1e-6 chance. The observed spread of their scores is checked against the same formula.
    """
    ref, cases = reference
    repeats = ref["repeats"]
    for name, (X, labels) in cases.items():
        t = ordered_time_points(labels)
        r = ref["cases"][name]
        E = r["exact_baseline"]
        for v in r["variants"]:
            idx, dist = _graph(X, v["k"], v["adaptive_k"])
            D = v["distance"]
            sd_B = float(np.std(v["baselines"], ddof=1))
            # Our baseline draws spread as theirs (same sampling scheme: k distinct others).
            ours_B = [seq.random_baseline(t, v["k"], seed=s) for s in range(repeats)]
            assert np.mean(ours_B) == pytest.approx(E, abs=5 * sd_B / np.sqrt(repeats))
            assert 0.5 < np.std(ours_B, ddof=1) / sd_B < 2.0
            theirs = np.asarray(v["normalized"])
            tol = 5 * D / E**2 * sd_B * np.sqrt(1 + 1 / repeats)
            ours = seq.sequential_alignment(idx, t, v["k"], seed=0, adaptive_k=v["adaptive_k"], knn_distances=dist)
            assert ours == pytest.approx(theirs.mean(), abs=tol), (name, v["k"], v["adaptive_k"])
            if theirs.min() > 0:  # not clipped: their spread is the one predicted
                assert theirs.std(ddof=1) < 2 * D / E**2 * sd_B
            exact = seq.sequential_alignment(
                idx, t, v["k"], baseline="exact", adaptive_k=v["adaptive_k"], knn_distances=dist
            )
            assert exact == pytest.approx(float(np.clip(1 - D / E, 0, 1)), abs=1e-12)
            assert exact == pytest.approx(theirs.mean(), abs=tol)


def test_task_values_match_cz_benchmarks(reference):
    """silhouette_score of time labels (scib-metrics, float32) and the task's alignment."""
    ref, cases = reference
    for name, (X, labels) in cases.items():
        r = ref["cases"][name]
        context = EvaluationContext(X, roles={"time_point": labels})
        result = run_task(get_task("sequential_organization")(), context, seeds=(0, 1, 2), raise_errors=True)
        assert result.status == "ok"
        if len(np.unique(np.asarray(labels).astype(float))) == len(labels):
            # One time point per cell: cz-benchmarks reports 0.5 (scikit-learn's silhouette is
            # not defined there); czb leaves it out and says why.
            assert r["silhouette_score"] == 0.5
            assert not [m for m in result.metrics if m.name == "silhouette_score"]
            assert "own time point" in result.computation["not_applicable"]["silhouette_score"]
        else:
            assert result.metric("silhouette_score").value == pytest.approx(r["silhouette_score"], abs=1e-5)
        (v15,) = [v for v in r["variants"] if v["k"] == 15 and not v["adaptive_k"]]
        tol = 5 * v15["distance"] / r["exact_baseline"] ** 2 * np.std(v15["baselines"], ddof=1) * 1.1
        assert result.metric("sequential_alignment").value == pytest.approx(
            r["task_sequential_alignment"], abs=tol
        )


def test_hand_checked_values():
    # Pairs of cells far apart from other pairs; each cell's nearest neighbour is its partner.
    X = np.array([[0.0], [0.1], [5.0], [5.1], [10.0], [10.1]])
    idx, _ = exact_knn(X, 2)
    t = np.array([0, 1, 1, 2, 2, 3])
    # Partners differ by 1 in time: D = 1.
    assert seq.sequential_alignment(idx, t, 1, normalize=False) == 1.0
    # Sorted t = 0,1,1,2,2,3: sum over pairs |t_i - t_j| = 19 over 15 pairs; E = 19/15.
    assert seq.expected_random_distance(t) == pytest.approx(19 / 15)
    assert seq.sequential_alignment(idx, t, 1, baseline="exact") == pytest.approx(1 - 15 / 19)
    # Partners (0,1), (1,2), (2,0): D = (1+1+1+1+2+2)/6 = 4/3 > E = 16/15, clipped to 0.
    t = np.array([0, 1, 1, 2, 2, 0])
    assert seq.sequential_alignment(idx, t, 1, normalize=False) == pytest.approx(4 / 3)
    assert seq.expected_random_distance(t) == pytest.approx(16 / 15)
    assert seq.sequential_alignment(idx, t, 1, baseline="exact") == 0.0
    # Partners share their time point: perfect.
    t = np.array([0, 0, 1, 1, 2, 2])
    assert seq.sequential_alignment(idx, t, 1) == 1.0
    # One time point only: cz-benchmarks' convention.
    assert seq.sequential_alignment(idx, np.zeros(6), 1) == 1.0
    assert seq.sequential_alignment(idx, np.zeros(6), 1, normalize=False) == 0.0


def test_sampled_baseline_converges_to_exact_expectation():
    t = np.random.default_rng(3).uniform(0, 5, 300)
    E = seq.expected_random_distance(t)
    assert seq.random_baseline(t, 15, seed=0, n_samples=200_000) == pytest.approx(E, rel=2e-3)
    # k = n - 1: every other cell, only the reference cell is random.
    assert seq.random_baseline(t, 299, seed=0, n_samples=50_000) == pytest.approx(E, rel=5e-3)


def test_same_seed_same_value():
    """cz-benchmarks gives three values for three calls; czb gives one per seed."""
    X, t = make_cases()["weak"]
    idx, _ = exact_knn(X, 16)
    values = {seq.sequential_alignment(idx, t, 15, seed=4) for _ in range(3)}
    assert len(values) == 1
    by_seed = [seq.sequential_alignment(idx, t, 15, seed=s) for s in range(3)]
    assert len(set(by_seed)) == 3  # the baseline does depend on the seed
    context = EvaluationContext(X, roles={"time_point": t})
    task = get_task("sequential_organization")()
    a = run_task(task, context, seeds=(0, 1, 2)).metric("sequential_alignment")
    b = run_task(task, EvaluationContext(X, roles={"time_point": t}), seeds=(0, 1, 2)).metric("sequential_alignment")
    assert a.values_raw == b.values_raw == by_seed


def test_planted_time_axis_scores_high_random_near_chance():
    rng = np.random.default_rng(11)
    n = 1000
    t = np.sort(rng.uniform(0, 1, n))
    curve = np.stack([np.cos(4 * t), np.sin(4 * t), t, t**2], axis=1)
    X = np.hstack([curve, np.zeros((n, 6))]) + 0.02 * rng.normal(size=(n, 10))
    random = rng.normal(size=(n, 10))
    task = get_task("sequential_organization")()
    good = run_task(task, EvaluationContext(X, roles={"time_point": t}), seeds=(0, 1), raise_errors=True)
    rnd = run_task(task, EvaluationContext(random, roles={"time_point": t}), seeds=(0, 1), raise_errors=True)
    assert good.metric("sequential_alignment").value > 0.9
    assert rnd.metric("sequential_alignment").value < 0.05
    # Time points as discrete stages: the silhouette sees them too.
    stages = np.floor(t * 5).astype(int)
    good = run_task(task, EvaluationContext(X, roles={"time_point": stages}), seeds=(0,), raise_errors=True)
    rnd = run_task(task, EvaluationContext(random, roles={"time_point": stages}), seeds=(0,), raise_errors=True)
    assert good.metric("silhouette_score").value > 0.6
    assert rnd.metric("silhouette_score").value == pytest.approx(0.5, abs=0.03)
    assert good.metric("sequential_alignment").value > 0.8
    assert rnd.metric("sequential_alignment").value < 0.05


def test_unordered_string_labels_are_a_clear_error():
    X = np.random.default_rng(0).normal(size=(60, 4))
    ages = np.array(["young", "old", "middle"] * 20, dtype=object)
    context = EvaluationContext(X, roles={"time_point": ages})
    task = get_task("sequential_organization")()
    with pytest.raises(TaskError, match=r"label_order: \{time_point"):
        run_task(task, context, seeds=(0,), raise_errors=True)
    result = run_task(task, context, seeds=(0,))
    assert result.status == "failed"
    assert "label_order" in result.error and "'young'" in result.error
    # Declared order arrives as ranks (what the runner passes): runs.
    ranks = np.array([{"young": 0, "middle": 1, "old": 2}[a] for a in ages])
    assert run_task(task, EvaluationContext(X, roles={"time_point": ranks}), seeds=(0,)).status == "ok"


def test_time_point_conversion():
    np.testing.assert_array_equal(ordered_time_points(np.array(["1", "2.5", "10"])), [1.0, 2.5, 10.0])
    np.testing.assert_array_equal(ordered_time_points(np.array([3, 1], dtype=np.int64)), [3.0, 1.0])
    with pytest.raises(TaskError, match="not finite"):
        ordered_time_points(np.array([1.0, np.nan]))
    with pytest.raises(TaskError, match="not finite"):
        ordered_time_points(np.array([1, None], dtype=object))


def test_registered_and_shares_the_graph(monkeypatch):
    assert "sequential_organization" in TASKS
    info = METRICS["sequential_alignment"]
    assert info.stochastic and info.range == (0.0, 1.0) and info.higher_is_better
    task_cls = get_task("sequential_organization")
    assert task_cls.info.requires == ("time_point",)
    assert set(task_cls.info.metrics) == {"silhouette_score", "sequential_alignment"}

    X, t = make_cases()["weak"]
    # No time_point role: not applicable, not failed.
    assert run_task(task_cls(), EvaluationContext(X), seeds=(0,)).status == "not_applicable"

    import czb.evaluation.context as ctx

    builds = []
    real = ctx.compute_neighbors
    monkeypatch.setattr(ctx, "compute_neighbors", lambda X, k, **kw: builds.append(k) or real(X, k, **kw))
    tasks = [task_cls(k=15), task_cls(k=10, adaptive_k=True), get_task("clustering")()]
    context = EvaluationContext(X, labels=t.astype(str), roles={"time_point": t})
    context.plan(tasks)
    for task in tasks:
        assert run_task(task, context, seeds=(0,), raise_errors=True).status == "ok"
    assert builds == [seq.adaptive_columns_needed(400, 10)]


def test_bad_inputs():
    X = np.random.default_rng(0).normal(size=(30, 3))
    idx, dist = exact_knn(X, 6)
    t = np.arange(30)
    with pytest.raises(ValueError, match="column 0"):
        seq.sequential_alignment(idx[:, ::-1], t, 5)
    with pytest.raises(ValueError, match="columns"):
        seq.sequential_alignment(idx, t, 8)
    with pytest.raises(ValueError, match="at least 31 cells"):
        seq.sequential_alignment(idx, t, 30)
    with pytest.raises(TaskError, match="bad parameters"):
        get_task("sequential_organization")(k=0)
    small = EvaluationContext(X[:10], roles={"time_point": t[:10]})
    assert run_task(get_task("sequential_organization")(), small, seeds=(0,)).status == "not_applicable"
