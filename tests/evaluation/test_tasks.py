"""Every task on planted structure: a good embedding scores high, a random one near chance."""

import numpy as np
import pytest
from conftest import planted_embedding

from czb.core.errors import EmbeddingError, TaskError
from czb.evaluation import EvaluationContext, evaluate
from czb.evaluation.perturbation.hierarchy.screen_task import ScreenTask
from czb.evaluation.registry import TASKS, get_task, load_all
from czb.evaluation.runner import aggregate, run_task
from czb.evaluation.task import MetricValue

load_all()


@pytest.fixture(scope="module")
def scored():
    """PCA-like (planted) and random embeddings of the same cells, all tasks, two seeds."""
    X, labels, batches = planted_embedding(900, n_types=5, n_batches=3, separation=3.0, batch_shift=0.5)
    random = np.random.default_rng(99).normal(size=X.shape)
    kw = dict(labels=labels, batches=batches, seeds=(0, 1), n_jobs=2)
    return {
        "good": {r.task: r for r in evaluate(X, **kw)},
        "random": {r.task: r for r in evaluate(random, **kw)},
    }


@pytest.mark.parametrize("name", sorted(n for n, t in TASKS.items()
                                         if t.info.kind != "perturbation" and not issubclass(t, ScreenTask)))
def test_every_registered_task_runs_on_tiny_data(name):
    # Perturbation tasks score predictors, not embeddings: tests/test_perturbation_task.py;
    # the hierarchy's tasks need a screen: tests/test_perturbation_hierarchy.py.
    X, labels, batches = planted_embedding(120, n_types=3, n_batches=2, dim=5)
    # Every role some task needs: time points, two species, donors.
    roles = {
        "time_point": np.arange(120) % 4,
        "species": np.where(np.arange(120) < 60, "human", "mouse").astype(object),
        "dataset": np.where(np.arange(120) < 60, "a", "b").astype(object),
        "donor": (np.arange(120) % 6).astype(str).astype(object),
    }
    task = get_task(name)()
    (result,) = evaluate(X, labels=labels, batches=batches, roles=roles, tasks=[task], seeds=(0, 1))
    assert result.status == "ok", result.error
    # Without the data before integration, only the metric comparing with it is left out, with its reason.
    skipped = set(result.computation.get("not_applicable", {}))
    assert skipped == ({"pcr_comparison"} if task.reads_pre_integration else set())
    assert {m.name for m in result.metrics} == set(task.info.metrics) - skipped
    if task.reads_pre_integration:
        pre = X + np.random.default_rng(1).normal(size=X.shape)
        ctx = EvaluationContext(X, labels=labels, batches=batches, roles=roles, pre_integration=pre)
        result = run_task(task, ctx, (0, 1))
        assert result.status == "ok", result.error
        assert {m.name for m in result.metrics} == set(task.info.metrics)
    for m in result.metrics:
        assert np.isfinite(m.value)
        assert len(m.values_raw) == (2 if task.info.stochastic else 1)


def test_clustering(scored):
    good, rnd = scored["good"]["clustering"], scored["random"]["clustering"]
    assert good.metric("adjusted_rand_index").value > 0.8
    assert good.metric("normalized_mutual_info").value > 0.8
    assert good.metric("scib_leiden_nmi").value >= good.metric("normalized_mutual_info").value - 1e-9
    assert abs(rnd.metric("adjusted_rand_index").value) < 0.05
    assert rnd.metric("normalized_mutual_info").value < 0.1


def test_embedding(scored):
    assert scored["good"]["embedding"].metric("silhouette_score").value > 0.7
    assert scored["random"]["embedding"].metric("silhouette_score").value == pytest.approx(0.5, abs=0.03)


def test_label_prediction(scored):
    mean = "MEAN(knn,lr,rf)"
    good = scored["good"]["label_prediction"]
    rnd = scored["random"]["label_prediction"]
    assert good.metric("mean_fold_accuracy", classifier=mean).value > 0.95
    chance = 1 / 5
    assert rnd.metric("mean_fold_accuracy", classifier=mean).value == pytest.approx(chance, abs=0.07)
    assert rnd.metric("mean_fold_auroc", classifier=mean).value == pytest.approx(0.5, abs=0.07)
    for clf in ("lr", "knn", "rf"):
        assert good.metric("mean_fold_f1", classifier=clf).value > 0.9


def test_random_embedding_cannot_win_batch_integration(scored):
    good, rnd = scored["good"]["batch_integration"], scored["random"]["batch_integration"]
    # Random mixes batches perfectly: it wins the mixing metrics...
    assert rnd.metric("entropy_per_cell").value > good.metric("entropy_per_cell").value
    assert rnd.metric("batch_silhouette").value > 0.9
    # ...but loses the combined score, because it destroys the biology.
    assert good.metric("scib_overall").value > rnd.metric("scib_overall").value + 0.1
    assert good.metric("scib_bio_conservation").value > 0.8


def test_scib_metrics_on_planted_structure(scored):
    good, rnd = scored["good"]["batch_integration"], scored["random"]["batch_integration"]
    for name in ("isolated_labels", "clisi_normalized", "nmi_kmeans", "ari_kmeans", "graph_connectivity"):
        assert good.metric(name).value > 0.75, name
    # Random: silhouettes near 0 (0.5 rescaled), k-means at chance, labels mixed in every neighbourhood...
    assert rnd.metric("isolated_labels").value == pytest.approx(0.5, abs=0.03)
    assert rnd.metric("nmi_kmeans").value < 0.05 and abs(rnd.metric("ari_kmeans").value) < 0.05
    assert rnd.metric("clisi_normalized").value < 0.5
    assert rnd.metric("graph_connectivity").value < good.metric("graph_connectivity").value - 0.3
    # ...and batches too, so kBET accepts where the planted batch shifts are rejected.
    assert rnd.metric("kbet_per_label").value > 0.8 > 0.3 > good.metric("kbet_per_label").value
    assert len(good.metric("nmi_kmeans").values_raw) == 2  # k-means is seeded: once per seed
    # No pre-integration data: no PCR, and the totals it is part of say so.
    reason = good.computation["not_applicable"]["pcr_comparison"]
    assert "pre-integration" in reason
    assert good.metric("scib_batch_correction").params == {"without": "pcr_comparison"}
    assert good.metric("scib_overall").params == {"without": "pcr_comparison"}
    assert good.metric("scib_bio_conservation").params == {}
    assert good.computation["kbet_per_label"] == {"method": "exact", "k": 50}


def test_pcr_comparison_reads_the_pre_integration_representation():
    X, labels, batches = planted_embedding(600, batch_shift=0.0, seed=4)
    shifts = np.random.default_rng(5).normal(size=(3, X.shape[1])) * 3.0
    before = X + shifts[np.searchsorted(np.unique(batches), batches)]
    task = get_task("batch_integration")()

    def pcr(embedding):
        ctx = EvaluationContext(embedding, labels=labels, batches=batches, pre_integration=before)
        result = run_task(task, ctx, (0,))
        assert result.metric("scib_overall").params == {}
        return result.metric("pcr_comparison").value

    assert pcr(X) > 0.9  # the batch shifts removed
    assert pcr(before) == 0.0  # nothing removed
    with pytest.raises(EmbeddingError, match="pre-integration representation has 599 rows"):
        EvaluationContext(X, labels=labels, pre_integration=before[1:])
    with pytest.raises(EmbeddingError, match="pre-integration representation has 1 rows with NaN"):
        EvaluationContext(X, pre_integration=np.where(np.arange(600)[:, None] == 3, np.nan, before))


def test_scoped_context_keeps_the_pre_integration_rows():
    X, labels, batches = planted_embedding(200)
    labels = labels.astype(object)
    labels[:10] = None
    pre = np.arange(400, dtype=float).reshape(200, 2)
    ctx = EvaluationContext(X, labels=labels, batches=batches, pre_integration=pre)
    sub = ctx.scoped(get_task("batch_integration")())
    assert sub.n_cells == 190 and np.array_equal(sub.pre_integration, pre[10:])


def test_ilisi_normalized_is_size_robust_where_entropy_is_not():
    """At fixed k = 200, entropy_per_cell drops as the dataset shrinks towards k; iLISI does not."""
    values = {}
    for n in (300, 3000):
        X, labels, batches = planted_embedding(n, n_batches=3, batch_shift=0.0, seed=3)
        (r,) = evaluate(X, labels=labels, batches=batches, tasks=["batch_integration"], seeds=(0,))
        values[n] = (r.metric("entropy_per_cell").value, r.metric("ilisi_normalized").value)
    assert abs(values[300][1] - values[3000][1]) < 0.1


def test_task_not_applicable_without_batches():
    X, labels, _ = planted_embedding(100)
    (r,) = evaluate(X, labels=labels, tasks=["batch_integration"])
    assert r.status == "not_applicable"
    assert "batch" in r.error


def test_one_class_left_is_not_applicable():
    X = np.random.default_rng(0).normal(size=(50, 3))
    labels = np.array(["a"] * 45 + ["b"] * 5)  # one class left after the <10 filter
    (r,) = evaluate(X, labels=labels, tasks=["label_prediction"], seeds=(0,))
    assert r.status == "not_applicable"
    assert "at least 2 labels with >= 10 cells" in r.error


def test_failing_task_is_recorded_not_raised(monkeypatch):
    from czb.evaluation.tasks.embedding import Embedding

    def crash(self, context, *, seed):
        raise RuntimeError("boom")

    monkeypatch.setattr(Embedding, "run", crash)
    X, labels, _ = planted_embedding(100)
    (r,) = evaluate(X, labels=labels, tasks=["embedding"], seeds=(0,))
    assert r.status == "failed"
    assert r.error == "RuntimeError: boom"


def test_bad_task_parameters_fail_early():
    with pytest.raises(TaskError, match="n_folds"):
        get_task("label_prediction")(n_folds="five")
    with pytest.raises(TaskError, match="no_such_param"):
        get_task("clustering")(no_such_param=1)


def test_stochastic_tasks_are_deterministic_per_seed():
    X, labels, batches = planted_embedding(300, separation=1.0)
    a = evaluate(X, labels=labels, batches=batches, tasks=["clustering", "label_prediction"], seeds=(5, 6))
    b = evaluate(X, labels=labels, batches=batches, tasks=["clustering", "label_prediction"], seeds=(5, 6))
    for ra, rb in zip(a, b):
        assert [m.values_raw for m in ra.metrics] == [m.values_raw for m in rb.metrics]


def test_neighbour_graph_is_computed_once_for_all_tasks(monkeypatch):
    import czb.evaluation.context as ctx_module

    calls = []
    real = ctx_module.compute_neighbors
    monkeypatch.setattr(ctx_module, "compute_neighbors", lambda X, k, **kw: calls.append(k) or real(X, k, **kw))
    X, labels, batches = planted_embedding(400)
    results = evaluate(X, labels=labels, batches=batches, seeds=(0,))
    assert all(r.status == "ok" for r in results)
    assert calls == [200]


def test_context_rejects_bad_embeddings():
    from czb.core.errors import EmbeddingError

    with pytest.raises(EmbeddingError, match="NaN"):
        EvaluationContext(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(EmbeddingError, match="2-D"):
        EvaluationContext(np.zeros(5))
    with pytest.raises(EmbeddingError, match="labels has shape"):
        EvaluationContext(np.zeros((5, 2)), labels=np.zeros(4))


def test_aggregate_mean_std_raw():
    values = [MetricValue("m", 1.0), MetricValue("m", 3.0), MetricValue("m", 5.0, {"x": 1})]
    by_params = {tuple(a.params.items()): a for a in aggregate(values)}
    plain = by_params[()]
    assert plain.value == 2.0 and plain.value_std_dev == pytest.approx(np.sqrt(2)) and plain.values_raw == [1.0, 3.0]
    assert by_params[(("x", 1),)].value_std_dev is None


def test_deterministic_task_runs_once():
    X, labels, _ = planted_embedding(100)
    ctx = EvaluationContext(X, labels=labels)
    r = run_task(get_task("embedding")(), ctx, seeds=(0, 1, 2))
    assert r.seeds == [0] and len(r.metrics[0].values_raw) == 1


def test_background_leiden_gives_the_in_process_partition(monkeypatch):

    X, labels, batches = planted_embedding(600, separation=1.0)
    kw = dict(labels=labels, batches=batches, tasks=["batch_integration"], seeds=(3, 4))
    (alone,) = evaluate(X, **kw, n_jobs=1)
    started = _spy_background(monkeypatch)
    (beside,) = evaluate(X, **kw, n_jobs=2)
    assert started == [1, 1]  # one worker per seed's partition
    for name in ("adjusted_rand_index", "normalized_mutual_info", "scib_overall"):
        assert beside.metric(name).values_raw == alone.metric(name).values_raw


def _spy_background(monkeypatch) -> list[int]:
    """Background Leiden at any size and load; the partitions pending after each start."""
    import czb.evaluation.context as ctx_module

    monkeypatch.setattr(ctx_module, "BACKGROUND_LEIDEN_MIN_CELLS", 0)
    monkeypatch.setattr(ctx_module, "_cores_busy", lambda: False)
    started = []
    real = ctx_module.EvaluationContext.start_leiden

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        started.append(len(self._background))

    monkeypatch.setattr(ctx_module.EvaluationContext, "start_leiden", spy)
    return started


def test_resolution_sweep_in_a_worker_gives_the_in_process_values(monkeypatch):
    X, labels, _ = planted_embedding(600, separation=1.0)
    kw = dict(labels=labels, tasks=["clustering"], seeds=(0, 5))
    (alone,) = evaluate(X, **kw, n_jobs=1)
    started = _spy_background(monkeypatch)
    (beside,) = evaluate(X, **kw, n_jobs=2)
    assert started == [5, 5]  # every other resolution of the sweep, per seed
    for name in ("adjusted_rand_index", "normalized_mutual_info", "scib_leiden_nmi", "scib_leiden_ari"):
        assert beside.metric(name).values_raw == alone.metric(name).values_raw


@pytest.mark.parametrize(("running", "own", "cpus", "busy"), [
    (1, 1, 2, False), (2, 1, 2, True), (3, 1, 2, True), (3, 3, 2, False), (2, 1, 4, False), (4, 1, 4, True),
    (2, 1, 1, True),
])
def test_cores_are_busy_when_other_runnable_threads_fill_all_but_one(monkeypatch, tmp_path, running, own, cpus,
                                                                     busy):
    import czb.evaluation.context as ctx_module

    assert ctx_module._own_running_threads() >= 1  # the thread asking
    loadavg = tmp_path / "loadavg"
    loadavg.write_text(f"0.50 0.40 0.30 {running}/300 12345\n")
    monkeypatch.setattr(ctx_module, "_LOADAVG", str(loadavg))
    monkeypatch.setattr(ctx_module, "_own_running_threads", lambda: own)
    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    assert ctx_module._cores_busy() is busy
    loadavg.write_text("garbled")
    assert ctx_module._cores_busy() is False


def test_no_worker_when_every_core_is_busy(monkeypatch):
    import czb.evaluation.context as ctx_module

    monkeypatch.setattr(ctx_module, "BACKGROUND_LEIDEN_MIN_CELLS", 0)
    monkeypatch.setattr(ctx_module, "_cores_busy", lambda: True)
    X, labels, _ = planted_embedding(200)
    context = EvaluationContext(X, labels=labels, n_jobs=2)
    context.start_leiden([0.4, 0.8], seed=0)
    assert context._background == {}


def test_uncollected_background_leiden_is_dropped(monkeypatch):
    import czb.evaluation.context as ctx_module

    monkeypatch.setattr(ctx_module, "BACKGROUND_LEIDEN_MIN_CELLS", 0)
    monkeypatch.setattr(ctx_module, "_cores_busy", lambda: False)
    X, labels, batches = planted_embedding(300)
    context = EvaluationContext(X, labels=labels, batches=batches, n_jobs=2)
    context.start_leiden([1.0, 2.0], seed=0)
    (future, _), (same, _) = context._background.values()
    assert future is same  # one job for both
    context.drop_background()
    assert context._background == {}
    from concurrent.futures import wait

    wait([future], timeout=60)
    assert future.cancelled() or future.exception() is not None  # killed, not left running
