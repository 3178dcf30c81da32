"""Integration tasks read the data before integration (the dataset's PCA baseline): the
plan makes that a dependency of their score units, started only when a unit needs it."""

from __future__ import annotations

import numpy as np
import pytest

from czb.evaluation.registry import get_task
from czb.pipeline.execute import run_suite
from czb.pipeline.executors import InProcessExecutor
from czb.pipeline.plan import Matrix, plan_matrices
from czb.pipeline.run import run_benchmark
from czb.pipeline.store import open_store
from czb.pipeline.work import _pre_integration
from czb.specs.catalog import Catalog

TINY = ("synthetic_cells_tiny",)


def _plan(models, tasks, *, baseline=True):
    matrix = Matrix("t", TINY, tuple(models), tuple(tasks), (0,), baseline=baseline)
    return plan_matrices(Catalog.load(), [matrix], name="t", offline=True)


def test_integration_units_read_the_pca_baselines_unit():
    assert get_task("batch_integration").reads_pre_integration
    assert not get_task("clustering").reads_pre_integration
    plan = _plan(["random"], ["batch_integration", "clustering"])
    pca = {k for k, u in plan.embeds.items() if u.model.name == "pca"}
    assert len(pca) == 1
    for unit in plan.scores.values():
        if unit.task.name == "batch_integration":
            assert unit.pre_integration in pca and unit.parts["pre_integration"] == unit.pre_integration
            assert unit.needs == (*unit.embed_keys, *(() if unit.model == "pca" else (unit.pre_integration,)))
        else:
            assert unit.pre_integration is None and unit.needs == unit.embed_keys


def test_without_baselines_the_pca_unit_is_planned_but_makes_no_record():
    with_base, without = _plan(["random"], ["batch_integration"]), _plan(["random"], ["batch_integration"],
                                                                         baseline=False)
    assert {r.model for r in without.records} == {"random"}
    assert {u.model.name for u in without.embeds.values()} == {"random", "pca"}
    # The same unit as the baseline's own: its embedding is computed once for both.
    assert set(without.embeds) <= set(with_base.embeds)
    assert set(without.scores) <= set(with_base.scores)


def test_pca_runs_only_when_a_unit_needs_it(tmp_path, monkeypatch):
    """Without baselines, a run of clustering alone never computes the PCA; with batch
    integration it is computed once, after the model's embedding."""
    from czb.models import baselines

    order = []
    for cls in (baselines.PCABaseline, baselines.RandomBaseline):
        original = cls.embed

        def counted(self, *args, _original=original, _name=cls.__name__, **kwargs):
            order.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "embed", counted)
    store = open_store(tmp_path / "a")
    outcome = run_suite(_plan(["random"], ["clustering"], baseline=False), store, InProcessExecutor(), poll_s=0)
    assert outcome.complete and order == ["RandomBaseline"]
    order.clear()
    store = open_store(tmp_path / "b")
    outcome = run_suite(_plan(["random"], ["batch_integration"], baseline=False), store, InProcessExecutor(),
                        poll_s=0)
    assert outcome.complete and order == ["RandomBaseline", "PCABaseline"]


def test_pre_integration_rows_follow_the_embeddings_cells(tmp_path):
    store = open_store(tmp_path)
    pca = np.arange(20, dtype=np.float32).reshape(10, 2)
    store.write_arrays("embeddings/p/embedding.npz", values=pca)
    store.write_json("embeddings/p/unit.json", {"status": "ok"})
    assert np.array_equal(_pre_integration("p", store, rows=None, n_rows=10), pca)
    rows = np.array([1, 4, 9])
    assert np.array_equal(_pre_integration("p", store, rows=rows, n_rows=3), pca[rows])
    # PCA of some cells only: aligned by row, or nothing when it lacks one of the embedding's.
    store.write_arrays("embeddings/q/embedding.npz", values=pca[[1, 4, 5, 9]], cell_index=np.array([1, 4, 5, 9]))
    store.write_json("embeddings/q/unit.json", {"status": "ok"})
    assert np.array_equal(_pre_integration("q", store, rows=rows, n_rows=3), pca[rows])
    assert _pre_integration("q", store, rows=np.array([0, 4]), n_rows=2) is None
    assert _pre_integration("q", store, rows=None, n_rows=10) is None
    # A failed or missing PCA unit: none.
    store.write_json("embeddings/p/unit.json", {"status": "failed"})
    assert _pre_integration("p", store, rows=None, n_rows=10) is None
    assert _pre_integration("absent", store, rows=None, n_rows=10) is None


@pytest.mark.slow
def test_batch_integration_record_holds_the_pcr_comparison_and_the_floor(tmp_path):
    records = run_benchmark(Catalog.load(), datasets=list(TINY), tasks=["batch_integration"], models=["random"],
                            seeds=[0], output_dir=tmp_path, n_jobs=1)
    by_model = {r.model.name: r for r in records}
    assert set(by_model) == {"random", "pca"}
    for record in by_model.values():
        assert record.status == "ok", record.error
        names = {m.name for m in record.metrics}
        assert {"pcr_comparison", "knn_label_accuracy"} <= names, names
    # The bio-conservation floor: the random embedding's labels are near chance, PCA's are not.
    assert by_model["random"].computation["bio_floor"]["near_chance"] is True
    assert by_model["pca"].computation["bio_floor"]["near_chance"] is False
