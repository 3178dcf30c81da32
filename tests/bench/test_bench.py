"""czb bench: content-keyed units, resuming, retries and failures, with the local executor."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from czb.bench.executors.local import LocalExecutor
from czb.cli import app
from czb.core.errors import CzbError, SpecError
from czb.core.records import read_result
from czb.pipeline.execute import run_suite
from czb.pipeline.executors import Job
from czb.pipeline.plan import PlanWarning, plan_suite
from czb.pipeline.progress import SuiteProgress
from czb.pipeline.store import open_store
from czb.specs.catalog import Catalog

SUITES = Path(__file__).resolve().parents[1] / "fixtures" / "bench" / "suite.yaml"


@pytest.fixture
def catalog():
    return Catalog.load(extra_files=[SUITES])


def run(catalog, suite, store, **kw):
    plan = plan_suite(catalog, suite, resolve_images=False)
    return run_suite(plan, open_store(store), LocalExecutor(cpus=2), poll_s=0.2, **kw)


# --------------------------------------------------------------------------- plans


def test_keys_follow_content_not_names(catalog):
    plan = plan_suite(catalog, "smoke")
    # random + the pca baseline; clustering per seed, embedding (deterministic) once
    assert len(plan.embeds) == 2
    assert len(plan.scores) == 2 * (2 + 1)
    assert {(r.model, r.task, r.seeds) for r in plan.records} == {
        (m, t, s) for m in ("random", "pca") for t, s in (("clustering", (0, 1)), ("embedding", (0,)))}
    again = plan_suite(catalog, "smoke")
    assert set(again.scores) == set(plan.scores) and set(again.embeds) == set(plan.embeds)
    # A task added to the suite: the same embeddings, the old score units plus new ones.
    more = plan_suite(catalog, "smoke_more_tasks")
    assert set(more.embeds) == set(plan.embeds)
    assert set(plan.scores) < set(more.scores)
    # Another seed or another task parameter: new score units, same embeddings.
    catalog.suites["smoke"] = catalog.suites["smoke"].model_copy(update={"seeds": [0, 2]})
    reseeded = plan_suite(catalog, "smoke")
    assert set(reseeded.embeds) == set(plan.embeds)  # embeddings use the first seed: still 0
    assert len(set(reseeded.scores) - set(plan.scores)) == 2  # clustering with seed 2, two models
    catalog.suites["smoke"] = catalog.suites["smoke"].model_copy(update={"seeds": [0, 1]})
    catalog.tasks["clustering"] = catalog.tasks["clustering"].model_copy(
        update={"parameters": {**catalog.tasks["clustering"].parameters, "resolution": 0.5}})
    changed = plan_suite(catalog, "smoke")
    assert set(changed.embeds) == set(plan.embeds)
    assert len(set(changed.scores) - set(plan.scores)) == 2 * 2  # clustering, two models, two seeds


def test_included_suites_merge_and_share_units(catalog):
    both = plan_suite(catalog, "both")
    smoke, extra = plan_suite(catalog, "smoke"), plan_suite(catalog, "extra_dataset")
    assert set(both.scores) == set(smoke.scores) | set(extra.scores)
    assert len(both.records) == len(smoke.records) + len(extra.records)


def test_bad_suites_fail_before_anything_runs(catalog, tmp_path):
    from czb.core.errors import UnknownNameError
    from czb.specs.schema import SuiteSpec

    catalog.suites["typo"] = SuiteSpec(name="typo", models=["randm"], datasets=["synthetic_cells_tiny"],
                                       tasks=["clustering"])
    with pytest.raises(UnknownNameError, match="random"):
        plan_suite(catalog, "typo")
    catalog.suites["loop"] = SuiteSpec(name="loop", includes=["loop2"])
    catalog.suites["loop2"] = SuiteSpec(name="loop2", includes=["loop"])
    with pytest.raises(SpecError, match="includes itself"):
        plan_suite(catalog, "loop")
    with pytest.raises(ValueError, match="tasks missing"):
        SuiteSpec(name="half", models=["pca"], datasets=["synthetic_cells_tiny"])
    catalog.suites["cross"] = SuiteSpec(name="cross", models=["random"], datasets=["synthetic_cells_tiny"],
                                        tasks=["cross_species_integration"])
    with pytest.raises(CzbError, match="give two or more"):
        plan_suite(catalog, "cross")



def test_bundled_suites_name_known_models_datasets_and_tasks():
    from czb.pipeline.plan import Matrix, resolve_matrix

    catalog = Catalog.load()
    assert {"cz_benchmarks", "perturbation_analysis", "smoke"} <= set(catalog.suites)
    matrices = {m.name: m for m in catalog.suite_matrices("cz_benchmarks")}
    assert set(matrices) == {"cz_benchmarks_cell_atlas", "cz_benchmarks_cross_species", "cz_benchmarks_sequential",
                             "cz_benchmarks_perturbation_masked_gene", "cz_benchmarks_perturbation_expression_shift"}
    assert len(matrices["cz_benchmarks_cell_atlas"].datasets) == 26
    for name in catalog.suites:
        for matrix in catalog.suite_matrices(name):
            _, models, tasks, built = resolve_matrix(catalog, Matrix.of_suite(matrix))
            predicts = any(b.info.kind == "perturbation" for b in built.values())
            baselines = {"control_mean", "additive_linear"} if predicts else {"pca"}
            assert baselines <= {m.name for m in models}
    _, _, tasks, _ = resolve_matrix(catalog, Matrix.of_suite(catalog.suite("perturbation_analysis")))
    assert len(tasks) == 6  # the hierarchy's six levels


def test_docker_models_without_an_engine_are_keyed_by_tag_with_a_warning(catalog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_suite(catalog, "with_broken_model", resolve_images=False)
    assert any(issubclass(w.category, PlanWarning) and "keyed by the tag" in str(w.message) for w in caught)
    (unit,) = [u for u in plan.embeds.values() if u.model.name == "broken_model"]
    assert unit.parts["model"]["image"] == "czb-test/no-such-image:latest"


# --------------------------------------------------------------------------- runs


def test_suite_runs_then_resumes_and_a_second_run_does_nothing(catalog, tmp_path):
    store = tmp_path / "store"
    first = run(catalog, "smoke", store)
    assert first.complete and first.cached == 0 and first.ran == first.plan.n_units == 8
    assert all(r.status == "ok" for r in first.records), [r.error for r in first.records]
    results = sorted((store / "results").glob("*.json"))
    assert len(results) == len(first.records) == 4
    by_name = {(r.model.name, r.task.name): r for r in map(read_result, results)}
    clustering = by_name[("pca", "clustering")]
    assert clustering.seeds == [0, 1] and len(clustering.metric("adjusted_rand_index").values_raw) == 2
    # planted cell types: PCA recovers them, random vectors do not
    assert clustering.metric("adjusted_rand_index").value > 0.5
    assert by_name[("random", "clustering")].metric("adjusted_rand_index").value < 0.2
    assert by_name[("pca", "embedding")].embedding_sample is not None

    second = run(catalog, "smoke", store)
    assert second.ran == 0 and second.cached == 8
    assert sorted((store / "results").glob("*.json")) == results  # the same files, none added
    assert [r.metrics for r in second.records] == [r.metrics for r in first.records]

    # An interrupted suite: units whose outputs are missing run again, nothing else.
    lost = sorted((store / "scores").glob("*.json"))[:2]
    for path in lost:
        path.unlink()
    resumed = run(catalog, "smoke", store)
    assert resumed.ran == 2 and resumed.cached == 6 and resumed.complete

    # A task added to the suite reuses the stored embeddings.
    more = run(catalog, "smoke_more_tasks", store)
    assert more.complete and more.ran == 2 * 2  # batch integration: two models, two seeds


def test_tasks_over_several_datasets_score_the_stacked_embeddings(catalog, tmp_path):
    from czb.pipeline.run import run_benchmark
    plan = plan_suite(catalog, "cross_species")
    group_units = [u for u in plan.scores.values() if len(u.embed_keys) == 2]
    assert len(group_units) == 2 * 2  # two models, two seeds, each reading both datasets' embeddings
    outcome = run(catalog, "cross_species", tmp_path / "store")
    assert outcome.complete and all(r.status == "ok" for r in outcome.records), [r.error for r in outcome.records]
    cross = {r.model.name: r for r in outcome.records if r.task.name == "cross_species_integration"}
    assert cross["pca"].dataset.name == "synthetic_species_human+synthetic_species_mouse"
    assert [m.name for m in cross["pca"].dataset.members] == ["synthetic_species_human", "synthetic_species_mouse"]
    # the same numbers as czb run, which stacks the embeddings the same way
    direct = run_benchmark(catalog, datasets=["synthetic_species_human", "synthetic_species_mouse"],
                           tasks=["cross_species_integration"], models=["random"], seeds=(0, 1))
    for r in direct:
        assert [m.values_raw for m in r.metrics] == [m.values_raw for m in cross[r.model.name].metrics]


def test_perturbation_predictors_are_scored_like_czb_run(catalog, tmp_path):
    from czb.pipeline.run import run_benchmark
    plan = plan_suite(catalog, "perturbations")
    assert not plan.embeds  # predictors read no embedding; the embedding model gets no units
    assert {u.model for u in plan.scores.values()} == {"control_mean", "additive_linear"}
    outcome = run(catalog, "perturbations", tmp_path / "store")
    statuses = {r.model.name: r.status for r in outcome.records}
    assert outcome.complete and statuses == {"random": "not_applicable", "control_mean": "ok",
                                             "additive_linear": "ok"}, [r.error for r in outcome.records]
    (unscored,) = [r for r in outcome.records if r.model.name == "random"]
    assert "produces embeddings" in unscored.error and unscored.dataset.n_cells > 0  # as the predictors saw it
    ours = {r.model.name: r for r in outcome.records}
    direct = run_benchmark(catalog, datasets=["synthetic_perturbations"], tasks=["perturbation_expression_shift"],
                           models=["control_mean"], seeds=(0, 1))
    for r in direct:
        assert ours[r.model.name].dataset.sha256 == r.dataset.sha256
        assert [m.values_raw for m in r.metrics] == [m.values_raw for m in ours[r.model.name].metrics]


@pytest.mark.filterwarnings("ignore::czb.pipeline.plan.PlanWarning")
def test_a_failing_unit_is_retried_then_recorded_and_the_suite_finishes(catalog, tmp_path):
    store = tmp_path / "store"
    outcome = run(catalog, "with_broken_model", store, retries=1)
    assert not outcome.complete
    (embed_key,) = [k for k, u in outcome.plan.embeds.items() if u.model.name == "broken_model"]
    assert set(outcome.failed) == {embed_key}
    failure = json.loads((store / "failures" / f"{embed_key}.json").read_text())
    assert failure["attempts"] == 2 and failure["error"]
    assert len(outcome.blocked) == 1  # its score unit never ran
    records = {r.model.name: r for r in outcome.records}
    assert records["pca"].status == "ok"
    assert records["broken_model"].status == "failed"
    assert records["broken_model"].error.startswith("embedding failed: ")
    assert len(list((store / "results").glob("*broken_model*.json"))) == 1


def test_a_dataset_changed_since_planning_is_refused(catalog, tmp_path):
    import dataclasses

    from czb.pipeline.work import run_embed_unit

    plan = plan_suite(catalog, "smoke")
    unit = next(iter(plan.embeds.values()))
    stale = dataclasses.replace(unit, parts={**unit.parts, "dataset": {**unit.parts["dataset"], "sha256": "0" * 64}})
    with pytest.raises(CzbError, match="changed since the run was planned"):
        run_embed_unit(stale, str(tmp_path / "store"))
    assert not (tmp_path / "store" / "embeddings").exists()


def crash_on_first_attempt(units, store_url, **kwargs):
    """A score job whose worker dies the first time it runs (for the retry test)."""
    from czb.pipeline.work import run_score_units

    marker = Path(os.environ["CZB_TEST_CRASH_MARKER"])
    if not marker.exists():
        marker.write_text("crashed")
        os._exit(1)
    return run_score_units(units, store_url, **kwargs)


def test_a_job_whose_worker_dies_is_retried(catalog, tmp_path, monkeypatch):
    import czb.pipeline.execute as bench_run

    monkeypatch.setenv("CZB_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    monkeypatch.setattr(bench_run, "run_score_units", crash_on_first_attempt)
    outcome = run(catalog, "smoke", tmp_path / "store")
    assert (tmp_path / "crashed").exists()
    assert outcome.complete and all(r.status == "ok" for r in outcome.records)
    assert outcome.retried >= 1


def test_local_executor_respects_memory_and_survives_a_dead_worker(tmp_path):
    executor = LocalExecutor(cpus=2, memory_gb=10)
    big = [Job(os.getpid, (), memory_gb=6, label=f"big{i}") for i in range(2)]
    for job in big:
        executor.submit(job)
    assert executor.running() == 1 and executor.queued() == 1  # 6 + 6 > 10
    finished = []
    while executor.running() or executor.queued():
        finished += executor.wait(timeout=30)
    assert [e for _, _, e in finished] == [None, None]
    executor.submit(Job(os._exit, (3,), label="dies"))
    (job, result, error), = executor.wait(timeout=60)
    assert error is not None and result is None
    executor.submit(Job(os.getpid, (), label="after"))
    (job, result, error), = executor.wait(timeout=60)
    assert error is None and isinstance(result, int)
    executor.shutdown()


def visible_gpus() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_local_executor_gives_each_gpu_job_its_own_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    executor = LocalExecutor(cpus=2, memory_gb=10, gpus=2)
    jobs = [Job(visible_gpus, (), gpus=1, label=f"gpu{i}") for i in range(3)]
    jobs.append(Job(visible_gpus, (), label="cpu"))
    for job in jobs:
        executor.submit(job)
    assert executor.running() == 2 and executor.queued() == 2  # two GPUs, two CPUs
    seen = {}
    while executor.running() or executor.queued():
        seen.update({job.label: result for job, result, _ in executor.wait(timeout=30)})
    executor.shutdown()
    assert {seen["gpu0"], seen["gpu1"]} == {"0", "1"} and seen["gpu2"] in ("0", "1")
    assert seen["cpu"] is None


def test_a_gpu_model_uses_the_gpus_it_was_given(catalog, monkeypatch):
    from czb.models.docker.engine import _device_requests
    from czb.pipeline.work import assigned_gpus

    plan = plan_suite(catalog, "smoke")
    cpu_unit = next(iter(plan.embeds.values()))
    gpu_unit = cpu_unit.__class__(cpu_unit.key, catalog.model("scgpt"), cpu_unit.dataset, 0, cpu_unit.parts)
    assert gpu_unit.gpus == 1
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert assigned_gpus(True) is None  # as the spec says
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert assigned_gpus(gpu_unit.gpus == 1) == "device=2,3" and assigned_gpus(bool(cpu_unit.gpus)) is None
    (request,) = _device_requests("device=2,3")
    assert request["DeviceIDs"] == ["2", "3"] and request["Count"] in (None, 0)


@pytest.mark.network
def test_suite_on_an_s3_store(catalog, s3, monkeypatch):
    from conftest import S3_TEST_BUCKET

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # the store writes, so it signs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"s3://{S3_TEST_BUCKET}/suites/smoke"
    first = run(catalog, "smoke", url)
    assert first.complete and first.ran == 8
    listed = s3.list_objects_v2(Bucket=S3_TEST_BUCKET, Prefix="suites/smoke/results/")["Contents"]
    assert sum(item["Key"].endswith(".json") for item in listed) == 4
    assert any(item["Key"].endswith(".npz") for item in listed)  # map samples beside them
    again = run(catalog, "smoke", url)
    assert again.ran == 0 and again.cached == 8
    assert [r.metrics for r in again.records] == [r.metrics for r in first.records]


def test_store_urls():
    from czb.pipeline.store import S3Store, StoreError

    assert isinstance(open_store("s3://bucket/some/prefix/"), S3Store)
    assert open_store("s3://bucket/some/prefix/").url == "s3://bucket/some/prefix"
    with pytest.raises(StoreError, match="s3://bucket/prefix"):
        open_store("s3://")
    with pytest.raises(StoreError, match="folder every worker can reach"):
        open_store("gs://bucket/x")


def test_progress_counts_and_eta():
    p = SuiteProgress(total=10, cached=2, done=2, slots=2)
    assert p.eta_s() is None and "2/10 done (2 from earlier runs)" in p.line()
    p.finished(2, 20.0)  # 10 s per unit
    p.failed = 1
    assert p.remaining == 5
    assert p.eta_s() == pytest.approx(10.0 * 5 / 2)
    assert "ETA 25s" in p.line()


# --------------------------------------------------------------------------- CLI


def test_cli_bench_dry_run_then_run(tmp_path):
    store = tmp_path / "store"
    runner = CliRunner()
    dry = runner.invoke(app, ["bench", str(SUITES), "--suite", "smoke", "--store", str(store), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.count("todo") == 8
    ran = runner.invoke(app, ["bench", str(SUITES), "--suite", "smoke", "--store", str(store)])
    assert ran.exit_code == 0, ran.output
    assert "8 units ran, 0 were done before" in ran.stderr
    again = runner.invoke(app, ["bench", str(SUITES), "--suite", "smoke", "--store", str(store), "--dry-run"])
    assert again.stdout.count("done") == 8
    several = runner.invoke(app, ["bench", str(SUITES), "--store", str(store)])
    assert several.exit_code == 2 and "pick one with --suite" in several.stderr


def test_cli_help_shows_bracketed_defaults():
    text = CliRunner().invoke(app, ["bench", "--help"]).stdout
    assert "[default: CZB_OUTPUT_DIR/SUITE, else ./czb-results/SUITE]" in " ".join(text.split())


def test_cli_bench_exits_1_when_units_fail(tmp_path):
    result = CliRunner().invoke(app, ["bench", str(SUITES), "--suite", "with_broken_model",
                                      "--store", str(tmp_path / "store"), "--retries", "0"])
    assert result.exit_code == 1
    assert "failed:" in result.stderr and "broken_model" in result.stderr
