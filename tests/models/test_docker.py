"""Model containers through a real Docker engine.

Needs a running daemon and a local base image with python3 and venv
(``CZB_TEST_BASE_IMAGE``, default ``czb-base:bookworm``; ``.ci/run`` makes one with
debootstrap + ``docker import``). Without them these tests skip, unless
``CZB_REQUIRE_DOCKER=1`` (set by CI), where a missing engine is a failure.

The model here is ``tests/fixtures/tiny_model``: an image written from the README's contract
alone, with no czb code inside.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import docker_engine_or_skip
from typer.testing import CliRunner

from czb.cli import app
from czb.core.errors import ModelRunError
from czb.data.reading import load_dataset
from czb.models.docker.images import build_model_image
from czb.models.docker.request import RunOptions
from czb.models.docker.source import DockerModelSource
from czb.pipeline.run import run_benchmark
from czb.specs.catalog import Catalog
from czb.specs.schema import ModelSpec

pytestmark = pytest.mark.docker

TINY_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_model"
BASE_IMAGE = os.environ.get("CZB_TEST_BASE_IMAGE", "czb-base:bookworm")
DATASET = "synthetic_cells_tiny"  # 300 cells × 500 genes, Ensembl IDs


@pytest.fixture(scope="module")
def engine():
    return docker_engine_or_skip()


@pytest.fixture(scope="module")
def catalog():
    return Catalog.load([TINY_DIR])


@pytest.fixture(scope="module")
def tiny_image(engine, catalog):
    return build_model_image(catalog.model("tiny"), base_image=BASE_IMAGE, log=lambda _line: None)


@pytest.fixture(scope="module")
def dataset(catalog):
    return load_dataset(catalog.dataset(DATASET))


@pytest.fixture
def weights(tmp_path, dataset):
    """The tiny model's "weights": the top 16 principal axes of log-normalised counts."""
    folder = tmp_path / "weights"
    folder.mkdir()
    counts = dataset.adata.X.toarray()
    totals = counts.sum(axis=1, keepdims=True)
    normalized = np.log1p(counts / totals * np.median(totals))
    _, _, axes = np.linalg.svd(normalized - normalized.mean(axis=0), full_matrices=False)
    np.save(folder / "projection.npy", axes[:16].T.astype(np.float32))
    folder.chmod(0o755)
    return folder


def _containers(engine) -> list:
    """Containers this test process started and that still exist."""
    return engine.containers.list(all=True, filters={"label": f"org.czb.host-pid={os.getpid()}"})


def _source(catalog, weights, **options) -> DockerModelSource:
    logs: list[str] = []
    options.setdefault("log", logs.append)
    source = DockerModelSource(catalog.model("tiny"), RunOptions(weights_dir=weights, **options))
    source.logs = logs
    return source


def _with_parameters(catalog, **parameters):
    """The tiny spec with test hooks declared (shorthand: the values are their defaults)."""
    spec = catalog.model("tiny")
    return ModelSpec(**{**dict(spec), "parameters": {**spec.parameters, **parameters}})


def test_run_scores_embeddings_and_records_the_image(engine, catalog, tiny_image, weights, tmp_path):
    records = run_benchmark(
        catalog, datasets=[DATASET], tasks=["clustering"], models=["tiny"], baseline=False,
        seeds=[0], output_dir=tmp_path / "out", model_options=RunOptions(weights_dir=weights, log=lambda _l: None),
    )
    (record,) = records
    assert record.status == "ok", record.error
    assert record.model.image_digest == tiny_image.id
    info = record.model.info
    assert info["container_meta"]["n_weight_tensors_loaded"] == 1
    # Written from the README: the plain sha256 of its one weights file is accepted.
    assert info["container_meta"]["weights_checksum"] == hashlib.sha256(
        (weights / "projection.npy").read_bytes()).hexdigest() != info["weights_checksum"]
    assert info["container_meta"]["device"] == "cpu"
    assert info["n_dropped_cells"] == 0
    assert info["cache"] == "miss"
    assert info["genes"]["n_genes_model_input"] == 500
    assert "done" in info["log_tail"]
    # The planted cell types show in the embedding.
    assert record.metric("adjusted_rand_index").value > 0.6
    written = json.loads(next((tmp_path / "out" / "results").glob("*.json")).read_text())
    assert written["model"]["image_digest"] == tiny_image.id
    assert _containers(engine) == []


def test_finished_run_is_reused_from_the_cache(engine, catalog, tiny_image, weights, dataset):
    first = _source(catalog, weights).embed(dataset, seed=5)
    started = []
    second_source = _source(catalog, weights, on_start=started.append)
    second = second_source.embed(dataset, seed=5)
    assert second.info["cache"] == "hit"
    assert started == []  # no container ran
    np.testing.assert_array_equal(first.values, second.values)
    forced = _source(catalog, weights, use_cache=False, on_start=started.append).embed(dataset, seed=5)
    assert forced.info["cache"] == "off" and len(started) == 1
    other_seed = _source(catalog, weights).embed(dataset, seed=6)
    assert other_seed.info["cache"] == "miss"
    assert not np.array_equal(other_seed.values, first.values)


def test_dropped_cells_are_realigned(engine, catalog, tiny_image, weights, dataset):
    genes_per_cell = np.asarray((dataset.adata.X > 0).sum(axis=1)).ravel()
    spec = _with_parameters(catalog, min_genes=int(np.median(genes_per_cell)))
    emb = DockerModelSource(spec, RunOptions(weights_dir=weights, log=lambda _l: None)).embed(dataset)
    dropped = emb.info["n_dropped_cells"]
    assert 0 < dropped < dataset.n_cells
    assert emb.values.shape[0] == dataset.n_cells - dropped
    assert np.all(np.diff(emb.cell_index) > 0)
    assert np.all(genes_per_cell[emb.cell_index] >= spec.parameters["min_genes"].default)
    dropped_index = np.setdiff1d(np.arange(dataset.n_cells), emb.cell_index)
    assert np.all(genes_per_cell[dropped_index] < spec.parameters["min_genes"].default)


def test_container_runs_sandboxed(engine, catalog, tiny_image, weights, dataset):
    spec = _with_parameters(catalog, probe=True)
    emb = DockerModelSource(spec, RunOptions(weights_dir=weights, use_cache=False, log=lambda _l: None)).embed(dataset)
    probe = emb.info["container_meta"]["probe"]
    assert probe["uid"] != 0
    assert int(probe["cap_eff"], 16) == 0
    assert probe["rootfs_writable"] is False
    assert probe["network"] is False and probe["interfaces"] == ["lo"]
    assert probe["docker_socket"] is False
    assert probe["tmp_writable"] is True
    assert probe["weights_writable"] is False and probe["input_writable"] is False
    assert probe["shm_bytes"] == int(0.25 * 1024) * 1024 * 1024


def test_unsupported_organism_is_not_applicable(engine, catalog, tiny_image, weights, tmp_path):
    # The spec lists mouse, so the host lets it through; the container exits 99.
    spec = catalog.dataset(DATASET).model_copy(update={"name": "tiny_mouse", "organism": "mouse",
                                                       "params": {**catalog.dataset(DATASET).params,
                                                                  "gene_prefix": "ENSMUSG"}})
    catalog.datasets["tiny_mouse"] = spec
    try:
        (record,) = run_benchmark(
            catalog, datasets=["tiny_mouse"], tasks=["clustering"], models=["tiny"], baseline=False,
            seeds=[0], model_options=RunOptions(weights_dir=weights, log=lambda _l: None),
        )
    finally:
        del catalog.datasets["tiny_mouse"]
    assert record.status == "not_applicable"
    assert "no mouse support" in record.error


def test_killed_container_is_a_failure_and_nothing_is_kept(engine, catalog, tiny_image, weights, dataset, tmp_path):
    from czb.core.settings import get_settings

    spec = _with_parameters(catalog, sleep_s=120)
    killed = threading.Event()

    def kill_when_sleeping(container):
        def watch():
            for chunk in container.logs(stream=True, follow=True):
                if b"sleeping" in chunk:
                    container.kill()
                    killed.set()
                    return

        threading.Thread(target=watch, daemon=True).start()

    source = DockerModelSource(spec, RunOptions(weights_dir=weights, on_start=kill_when_sleeping, log=lambda _l: None))
    with pytest.raises(ModelRunError, match="killed") as excinfo:
        source.embed(dataset)
    assert killed.is_set()
    assert "sleeping" in excinfo.value.log_tail
    cache = get_settings().cache_dir
    assert not any((cache / "embeddings").glob("*/embeddings.npy"))  # nothing half-written kept
    assert list((cache / "runs").iterdir()) == []
    assert _containers(engine) == []

    # Through the benchmark the failure becomes a record, with the container's last lines.
    spec_catalog = Catalog.load([TINY_DIR])
    spec_catalog.models["tiny"] = spec
    (record,) = run_benchmark(
        spec_catalog, datasets=[DATASET], tasks=["clustering"], models=["tiny"], baseline=False, seeds=[0],
        model_options=RunOptions(weights_dir=weights, timeout_s=5, log=lambda _l: None),
    )
    assert record.status == "failed"
    assert "timeout" in record.error and "sleeping" in record.error
    assert record.model.image_digest == tiny_image.id


def test_memory_limit_kills_and_says_so(engine, catalog, tiny_image, weights, dataset):
    spec = _with_parameters(catalog, allocate_mb=1024)
    source = DockerModelSource(spec, RunOptions(weights_dir=weights, memory_gb=0.2, use_cache=False, log=lambda _l: None))
    with pytest.raises(ModelRunError, match=r"0.2 GB memory limit \(raise --memory-gb\)") as excinfo:
        source.embed(dataset)
    assert "allocating 1024 MB" in excinfo.value.log_tail
    assert _containers(engine) == []


def test_gpus_on_a_daemon_without_gpu_driver(engine, catalog, tiny_image, weights, dataset):
    has_gpu_runtime = "nvidia" in (engine.info().get("Runtimes") or {})
    if has_gpu_runtime:
        pytest.skip("this daemon has a GPU runtime")
    source = _source(catalog, weights, gpus="all", use_cache=False)
    with pytest.raises(ModelRunError, match="no GPU driver.*--gpus none"):
        source.embed(dataset)
    assert _containers(engine) == []


def test_missing_image_names_the_build_command(engine, catalog, weights, dataset):
    spec = catalog.model("tiny").model_copy(update={"image": "czb-test/not-built:0"})
    with pytest.raises(ModelRunError, match="czb models build tiny"):
        DockerModelSource(spec, RunOptions(weights_dir=weights)).embed(dataset)


def test_staged_weights_and_cli(engine, tiny_image, weights, tmp_path, monkeypatch):
    # A config with a published (here: local) weights file, staged by fetch-weights.
    config = tmp_path / "config"
    config.mkdir()
    text = (TINY_DIR / "models.yaml").read_text().replace("container: .", f"container: {TINY_DIR}")
    text += (
        "    default_variant: v1\n"
        "    variants:\n"
        "      v1:\n"
        "        license: CC0-1.0\n"
        "        weights:\n"
        f"          - uri: {weights / 'projection.npy'}\n"
        "            path: projection.npy\n"
    )
    (config / "models.yaml").write_text(text)
    runner = CliRunner()
    result = runner.invoke(app, ["run", "-m", "tiny", "-t", "clustering", "-d", DATASET, "--seeds", "0",
                                 "--config-dir", str(config), "--no-baseline", "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "czb models fetch-weights tiny --variant v1" in result.output

    result = runner.invoke(app, ["models", "fetch-weights", "tiny", "--config-dir", str(config)])
    assert result.exit_code == 0, result.output
    assert "CC0-1.0" in result.output

    result = runner.invoke(app, ["run", "-m", "tiny", "-t", "clustering", "-d", DATASET, "--seeds", "0",
                                 "--config-dir", str(config), "--format", "json", "--output-dir", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    records = json.loads(result.stdout)
    tiny = next(r for r in records if r["model"]["name"] == "tiny")
    assert tiny["status"] == "ok"
    assert tiny["model"]["image_digest"] == tiny_image.id
    assert tiny["model"]["info"]["weights_license"] == "CC0-1.0"
    assert {r["model"]["name"] for r in records} == {"tiny", "pca"}  # the baseline is always there

    result = runner.invoke(app, ["list", "models", "--config-dir", str(config), "--format", "json"])
    row = next(r for r in json.loads(result.stdout) if r["name"] == "tiny")
    assert row["image"] == "czb-test/tiny:1" and row["memory_gb"] == 1 and row["variants"] == ["v1"]


# ----------------------------------------------------------------------------- a real model image

# Trains a small scVI reference inside the scvi image itself (the host has no torch) and
# saves it in the Census layout, <weights>/homo_sapiens/model.pt.
_TRAIN_REFERENCE = """
import anndata as ad, scvi
adata = ad.read_h5ad("/work/reference.h5ad")
scvi.settings.seed = 0
scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
model = scvi.model.SCVI(adata, n_latent=10, n_hidden=64, n_layers=1, gene_likelihood="nb")
model.train(max_epochs=60, accelerator="cpu", batch_size=128, enable_progress_bar=False, logger=False,
            enable_checkpointing=False)
model.save("/work/weights/homo_sapiens", save_anndata=False)
"""


@pytest.mark.slow
def test_scvi_image_builds_and_maps_a_query_through_docker(engine, tmp_path):
    """`czb models build scvi` on the local base, then `czb run --model scvi` on CPU."""
    import anndata as ad

    catalog = Catalog.load([])
    spec = catalog.model("scvi")
    image = build_model_image(spec, base_image=BASE_IMAGE, log=lambda _line: None)

    data = load_dataset(catalog.dataset(DATASET))
    work = tmp_path / "work"
    (work / "weights").mkdir(parents=True)
    reference = ad.AnnData(X=data.adata.X.astype(np.float32), obs=data.adata.obs[["batch"]].astype(str))
    reference.var_names = data.adata.var_names
    reference.write_h5ad(work / "reference.h5ad")
    for path in (work, work / "weights"):
        path.chmod(0o777)
    engine.containers.run(
        image.id, entrypoint=["/opt/venv/bin/python", "-c", _TRAIN_REFERENCE], network_mode="none",
        user="10001:10001", volumes={str(work): {"bind": "/work", "mode": "rw"}},
        environment={"HOME": "/tmp"}, remove=True,
    )
    assert (work / "weights" / "homo_sapiens" / "model.pt").is_file()

    result = CliRunner().invoke(app, [
        "run", "--model", "scvi", "--task", "clustering", "--task", "batch_integration", "--dataset", DATASET,
        "--weights", str(work / "weights"), "--gpus", "none", "--seeds", "0", "--format", "json",
        "--output-dir", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    records = {(r["model"]["name"], r["task"]["name"]): r for r in json.loads(result.stdout)}
    clustering = records[("scvi", "clustering")]
    assert clustering["status"] == "ok", clustering["error"]
    assert clustering["model"]["image_digest"] == image.id
    meta = clustering["model"]["info"]["container_meta"]
    assert meta["model"] == "scvi" and meta["device"] == "cpu"
    assert meta["n_weight_tensors_loaded"] > 0 and meta["weights_checksum"]
    ari = {m["name"]: m["value"] for m in clustering["metrics"]}["adjusted_rand_index"]
    assert ari > 0.5  # the planted cell types, through a reference trained on these cells
    assert records[("pca", "clustering")]["status"] == "ok"  # the baseline beside it
    assert _containers(engine) == []


@pytest.mark.slow
def test_scvi_denovo_trains_in_the_scvi_image_through_docker(engine, tmp_path):
    """`czb run --model scvi_denovo` on CPU: the scvi image trains on the dataset, no weights."""
    catalog = Catalog.load([])
    # The scvi image itself (same tag); its layers are cached when the test above built it.
    image = build_model_image(catalog.model("scvi_denovo"), base_image=BASE_IMAGE, log=lambda _line: None)
    result = CliRunner().invoke(app, [
        "run", "--model", "scvi_denovo", "--task", "clustering", "--dataset", DATASET,
        "--param", "max_epochs=100", "--param", "n_top_genes=300", "--gpus", "none", "--seeds", "0",
        "--format", "json", "--output-dir", str(tmp_path / "out"),
    ])
    assert result.exit_code == 0, result.output
    records = {(r["model"]["name"], r["task"]["name"]): r for r in json.loads(result.stdout)}
    record = records[("scvi_denovo", "clustering")]
    assert record["status"] == "ok", record["error"]
    assert record["model"]["image_digest"] == image.id
    meta = record["model"]["info"]["container_meta"]
    assert meta["mode"] == "de_novo" and meta["device"] == "cpu"
    assert meta["n_weight_tensors_loaded"] == 0 and meta["weights_checksum"] is None
    assert meta["training_epochs"] == 100 and meta["genes_used"] == 300 and meta["n_batch"] > 1
    ari = {m["name"]: m["value"] for m in record["metrics"]}["adjusted_rand_index"]
    assert ari > 0.5  # the planted cell types, learnt from these cells alone
    assert _containers(engine) == []


# ----------------------------------------------------------------------------- perturbation predictions


def test_docker_predictor_answers_perturbation_requests(engine, catalog, tiny_image, tmp_path):
    """The tiny image predicts "no change" through predictions.h5ad: its scores must equal
    the in-process control_mean baseline's, on both formulations."""
    predictor = catalog.model("tiny").model_copy(update={"name": "tiny_predictor", "output": "predictions"})
    catalog.models["tiny_predictor"] = predictor
    small = catalog.dataset("synthetic_perturbations").model_copy(update={
        "name": "small_screen",
        "params": {"n_genes": 300, "n_targets": 8, "n_doubles": 8, "n_control_cells": 200,
                   "n_cells_per_condition": 60, "seed": 0},
    })
    catalog.datasets["small_screen"] = small
    try:
        out = run_benchmark(
            catalog, datasets=["small_screen"],
            tasks=["perturbation_expression_shift", "perturbation_masked_gene"],
            models=["tiny_predictor"], seeds=[0], output_dir=tmp_path / "out",
            model_options=RunOptions(weights_dir=tmp_path, log=lambda _l: None),
        )
    finally:
        del catalog.models["tiny_predictor"], catalog.datasets["small_screen"]
    by_key = {(r.model.name, r.task.name): r for r in out}
    for task in ("perturbation_expression_shift", "perturbation_masked_gene"):
        docker, baseline = by_key[("tiny_predictor", task)], by_key[("control_mean", task)]
        assert docker.status == "ok", docker.error
        assert docker.model.image_digest == tiny_image.id
        for metric in baseline.metrics:
            assert docker.metric(metric.name).value == pytest.approx(metric.value, abs=1e-4), metric.name
    assert _containers(engine) == []


_THREADS_SCRIPT = """
import threading
started, gate = 0, threading.Event()
try:
    for _ in range(300):
        threading.Thread(target=gate.wait, daemon=True).start()
        started += 1
except RuntimeError:
    pass
print("threads", started, flush=True)
gate.set()
"""


def test_container_processes_and_threads_are_bounded(engine, tmp_path):
    """A fork bomb stops at the container's pids limit, never at the host's; the default
    limit leaves room for hundreds of threads."""
    from czb.models.docker import engine as docker_engine
    folder = tmp_path / "threads"
    folder.mkdir()
    (folder / "Dockerfile").write_text(
        "ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nCOPY probe/threads.py /opt/threads.py\n"
        'ENTRYPOINT ["python3", "/opt/threads.py"]\n')
    (folder / "threads.py").write_text(_THREADS_SCRIPT)
    image = docker_engine.build_image(engine, context_parts={"probe": folder}, dockerfile="probe/Dockerfile",
                                      tag="czb-test/threads:1", build_args={"BASE_IMAGE": BASE_IMAGE},
                                      log=lambda _line: None)
    seen: dict[str, int] = {}

    def run(limits):
        lines: list[str] = []

        def inspect(container):
            container.reload()
            seen[str(limits.pids)] = container.attrs["HostConfig"]["PidsLimit"]

        outcome = docker_engine.run_container(engine, image, mounts={}, limits=limits, name="threads",
                                              log=lines.append, on_start=inspect)
        assert outcome.exit_code == 0, lines
        (line,) = [ln for ln in lines if ln.startswith("threads ")]
        return int(line.split()[1])

    assert run(docker_engine.RunLimits(pids=64)) < 64
    assert run(docker_engine.RunLimits()) == 300
    assert seen == {"64": 64, str(docker_engine.MAX_PIDS): docker_engine.MAX_PIDS}
    assert _containers(engine) == []
