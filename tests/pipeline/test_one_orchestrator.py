"""``czb run`` and ``czb bench`` are one path: the same plan, units, store and records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from czb.bench.executors.local import LocalExecutor
from czb.core.errors import CzbError, FetchError
from czb.core.errors import CzbWarning as CzbWarningBase
from czb.core.records import read_result
from czb.pipeline.execute import run_suite
from czb.pipeline.executors import InProcessExecutor, Job
from czb.pipeline.plan import Matrix, plan_matrices, plan_suite
from czb.pipeline.run import run_benchmark
from czb.pipeline.store import open_store
from czb.specs.catalog import Catalog

#: What differs between two records of the same units: when, by which command, on which host.
VOLATILE = ("created_at", "command", "host", "runtime_s", "embedding_runtime_s", "peak_memory_mb")


def _stable(path):
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k not in VOLATILE}


def _results(store):
    return {p.name: _stable(p) for p in sorted((store / "results").glob("*.json"))}


def test_run_and_bench_share_units_and_write_equal_records(tmp_path):
    """The smoke suite's matrix, given to ``czb run``: a suite on the same store runs
    nothing, and each record is the same file with the same content."""
    catalog = Catalog.load()
    (suite,) = catalog.suite_matrices("smoke")
    store = tmp_path / "store"
    records = run_benchmark(catalog, datasets=suite.datasets, tasks=suite.tasks, models=suite.models,
                            seeds=suite.seeds, output_dir=store, n_jobs=1)
    assert records and all(r.status == "ok" for r in records), [r.error for r in records]
    by_run = _results(store)
    assert len(by_run) == len(records)

    outcome = run_suite(plan_suite(catalog, "smoke"), open_store(store), LocalExecutor(cpus=1), poll_s=0.1)
    assert outcome.complete and outcome.ran == 0 and outcome.cached == outcome.plan.n_units
    assert _results(store) == by_run  # the same files, rewritten with the same content

    # And the other way: a run after the suite reuses its units (nothing is embedded again).
    again = run_benchmark(catalog, datasets=suite.datasets, tasks=suite.tasks, models=suite.models,
                          seeds=suite.seeds, output_dir=store, n_jobs=1,
                          progress=lambda line: pytest.fail(f"ran a job: {line}") if ":" in line else None)
    assert [r.metrics for r in again] == [r.metrics for r in records]


def test_run_plans_what_bench_plans_for_the_same_matrix():
    catalog = Catalog.load()
    (suite,) = catalog.suite_matrices("smoke")
    by_suite = plan_suite(catalog, "smoke")
    by_run = plan_matrices(catalog, [Matrix("run", tuple(suite.datasets), tuple(suite.models), tuple(suite.tasks),
                                            tuple(suite.seeds))], name="run")
    assert set(by_run.embeds) == set(by_suite.embeds) and set(by_run.scores) == set(by_suite.scores)
    assert by_run.records == by_suite.records


def test_a_model_of_the_other_kind_gets_not_applicable_records_without_units():
    catalog = Catalog.load()
    plan = plan_matrices(catalog, [Matrix("run", ("synthetic_perturbations",), ("random",),
                                          ("embedding", "perturbation_expression_shift"), (0,))], name="run")
    kinds = {(r.model, r.task): r.not_applicable for r in plan.records}
    assert kinds[("random", "perturbation_expression_shift")].endswith("this task scores perturbation predictions")
    assert kinds[("control_mean", "embedding")].endswith("this task scores embeddings")
    assert kinds[("random", "embedding")] is None
    assert {u.model.name for u in plan.embeds.values()} == {"random", "pca"}  # no predictor is embedded


def test_in_process_executor_runs_score_jobs_first_and_raises_under_debug():
    ran = []

    def job(kind, name, fail=False):
        def fn():
            ran.append(name)
            if fail:
                raise ValueError(name)
            return name
        return Job(fn, (), tag=(kind, [name]), label=name)

    executor = InProcessExecutor()
    for j in (job("embed", "e1"), job("embed", "e2"), job("score", "s1", fail=True)):
        executor.submit(j)
    outcomes = []
    while executor.queued():
        outcomes += executor.wait()
    assert ran == ["s1", "e1", "e2"]
    assert isinstance(outcomes[0][2], ValueError) and [o[1] for o in outcomes[1:]] == ["e1", "e2"]

    debug = InProcessExecutor(raise_errors=True)
    debug.submit(job("embed", "e3", fail=True))
    with pytest.raises(ValueError, match="e3"):
        debug.wait()


def test_a_users_file_that_does_not_fit_stops_the_run_before_the_baselines(tmp_path):
    import numpy as np

    bad = tmp_path / "emb.npy"
    np.save(bad, np.zeros((3, 4), np.float32))  # 3 rows for a dataset of hundreds of cells
    seen = []
    records = run_benchmark(Catalog.load(), datasets=["synthetic_cells_tiny"], tasks=["clustering"],
                            embedding=bad, seeds=(0,), output_dir=tmp_path / "out", progress=seen.append)
    assert [(r.model.name, r.status) for r in records] == [("file:emb.npy", "failed")]
    assert "embedding failed" in records[0].error
    assert not any("pca" in line for line in seen)  # the baseline never ran
    (written,) = (tmp_path / "out" / "results").glob("*.json")
    assert read_result(written).status == "failed"


def test_a_users_file_is_keyed_by_its_content(tmp_path):
    import numpy as np

    catalog = Catalog.load()
    values = np.random.default_rng(0).normal(size=(240, 4)).astype(np.float32)
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, values)
    np.save(second, values)

    def plan(path):
        from czb.pipeline.plan import EmbeddingFile
        matrix = Matrix("run", ("synthetic_cells_tiny",), (), ("clustering",), (0,), baseline=False,
                        file=EmbeddingFile.open(path))
        return plan_matrices(catalog, [matrix], name="run")

    assert set(plan(first).embeds) == set(plan(second).embeds)  # same content, same unit
    np.save(second, values + 1)
    assert set(plan(first).embeds) != set(plan(second).embeds)


def test_no_cache_runs_every_unit_again(tmp_path):
    from czb.models.docker.request import RunOptions

    catalog = Catalog.load()
    args = dict(datasets=["synthetic_cells_tiny"], tasks=["clustering"], models=["random"], seeds=(0,),
                baseline=False, output_dir=tmp_path / "out", n_jobs=1)
    run_benchmark(catalog, **args)
    seen = []
    run_benchmark(catalog, **args, progress=seen.append)
    assert seen == []  # everything reused
    run_benchmark(catalog, **args, progress=seen.append, model_options=RunOptions(use_cache=False))
    assert any("embedding" in line for line in seen) and any("score unit" in line for line in seen)


def test_an_unknown_name_fails_before_the_output_folder_is_made(tmp_path):
    with pytest.raises(CzbError):
        run_benchmark(Catalog.load(), datasets=["no_such_dataset"], tasks=["clustering"], models=["random"],
                      output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_jobs_warnings_come_back_with_its_result_and_are_said_once():
    import warnings

    from czb.core.errors import EmbeddingWarning
    from czb.pipeline.work import JobWarning, say_warnings, with_warnings

    def noisy(x):
        for _ in range(3):
            warnings.warn("pca: capped", EmbeddingWarning, stacklevel=1)
        warnings.warn("slow convergence", RuntimeWarning, stacklevel=1)
        return x + 1

    value, said = with_warnings(noisy, 1)
    assert value == 2
    assert said == [(EmbeddingWarning, "pca: capped"), (JobWarning, "RuntimeWarning: slow convergence")]
    with pytest.warns(CzbWarningBase) as caught:
        say_warnings(said, "tiny/pca: embedding")
    assert [str(w.message) for w in caught] == ["pca: capped", "tiny/pca: embedding: RuntimeWarning: slow convergence"]


def test_bench_says_worker_warnings_as_one_line_each(tmp_path):
    from conftest import assert_clean_exit, invoke

    suite = tmp_path / "suite.yaml"
    suite.write_text("suites:\n  tiny:\n    models: [random]\n    datasets: [synthetic_cells_tiny]\n"
                     "    tasks: [embedding]\n    seeds: [0]\n")
    result = invoke("bench", suite, "--store", tmp_path / "store", "--cpus", "1")
    assert_clean_exit(result, 0)
    assert ".py:" not in result.stderr and "Warning:" not in result.stderr  # no raw warnings from a worker


def test_datasets_are_resolved_where_the_units_run(tmp_path, file_server, monkeypatch):
    """``czb bench --executor ray`` plans on a machine that may not hold the data: a
    worker fetches and hashes each dataset, and the plan is the one made with the data here."""
    import hashlib

    import anndata as ad
    import scipy.sparse as sp

    from czb.io import fetch as fetch_module
    from czb.pipeline.execute import plan_on_workers
    from czb.specs.catalog import Catalog as Cat

    rng = np.random.default_rng(0)
    adata = ad.AnnData(sp.csr_matrix(rng.poisson(1.0, size=(60, 30)).astype(np.float32)))
    adata.obs["cell_type"] = np.repeat(["a", "b", "c"], 20)
    adata.var_names = [f"G{i}" for i in range(30)]
    adata.write_h5ad(tmp_path / "cells.h5ad")
    body = (tmp_path / "cells.h5ad").read_bytes()
    file_server.files["/cells.h5ad"] = body
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"datasets:\n  remote:\n    uri: {file_server.url('/cells.h5ad')}\n    organism: human\n"
                     "    label_key: cell_type\n"
                     "suites:\n  far:\n    models: [random]\n    datasets: [remote]\n    tasks: [embedding]\n"
                     "    seeds: [0]\n")
    catalog = Cat.load(extra_files=[suite])

    def no_download_here(*args, **kwargs):
        if kwargs.get("offline"):  # looking into the cache is allowed
            raise FetchError("not cached")
        raise AssertionError("the planning process downloaded a dataset")

    monkeypatch.setattr(fetch_module, "fetch", no_download_here)  # this process only: workers are others
    plan = plan_on_workers(catalog, "far", LocalExecutor(cpus=1), poll_s=0.1)
    assert not plan.unresolved
    assert {u.parts["dataset"]["sha256"] for u in plan.embeds.values()} == {hashlib.sha256(body).hexdigest()}
    monkeypatch.undo()
    assert set(plan_suite(catalog, "far").embeds) == set(plan.embeds)  # the plan made with the data here
