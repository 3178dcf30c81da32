"""Host side of the model container contract (czb.models.docker), without Docker.

The container side (``containers/common/czb_container.py``) is imported directly, so the
tests check that what the host writes is what an image reads, and the other way round.
Where a run is needed, ``docker_engine`` is replaced by an in-process fake that runs an
entrypoint through ``czb_container.run`` on the folders the host would mount.
"""

from __future__ import annotations

import json
import pickle
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from czb.core.errors import (
    EmbeddingError,
    ModelRunError,
    NotApplicableError,
    SpecError,
    UnknownNameError,
)
from czb.core.hashing import cache_key
from czb.data.dataset import Dataset
from czb.data.reading import load_dataset
from czb.models.docker import engine as docker_engine
from czb.models.docker.cache import EmbeddingCache
from czb.models.docker.contract import CONTRACT_VERSION, read_output
from czb.models.docker.request import (
    RunOptions,
    build_request,
    check_applicable,
    write_input,
)
from czb.models.docker.source import DockerModelSource
from czb.models.weights import directory_checksum
from czb.specs.schema import DEFAULT_BATCH_SIZE, DatasetSpec, ModelSpec, Resources, WeightsVariant

COMMON = Path(__file__).resolve().parents[2] / "containers" / "common"
if str(COMMON) not in sys.path:
    sys.path.insert(0, str(COMMON))
import czb_container  # noqa: E402

N_CELLS, N_GENES = 24, 12


def synthetic(organism: str = "human", expression: str = "raw_counts", **params) -> Dataset:
    spec = DatasetSpec(
        name="synth",
        uri="synthetic:planted_cells",
        organism=organism,
        label_key="cell_type",
        batch_key=["batch", "time_point"],
        expression=expression,
        params={"n_cells": N_CELLS, "n_genes": N_GENES, "n_cell_types": 3, "n_batches": 2, "seed": 1,
                **params},
    )
    return load_dataset(spec)


@pytest.fixture
def dataset() -> Dataset:
    ds = synthetic()
    # CELLxGENE style: symbols beside the Ensembl IDs.
    ds.adata.var["feature_name"] = [f"GENE{i}" for i in range(N_GENES)]
    return ds


def model_spec(**fields) -> ModelSpec:
    base = {
        "name": "tiny",
        "kind": "docker",
        "image": "czb-test/tiny:1",
        "container": "tiny",
        "gene_id_type": "symbol",
        "input": "raw_counts",
        "organisms": ["human", "mouse"],
        "resources": Resources(gpu=True, memory_gb=3, timeout_s=300),
        "parameters": {"batch_size": 16, "min_genes": 0},
    }
    return ModelSpec(**{**base, **fields})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_files(folder: Path, values, ids, meta=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "embeddings.npy", values)
    (folder / "cell_ids.json").write_text(json.dumps(ids))
    if meta is not False:
        (folder / "meta.json").write_text(json.dumps(meta or {"model": "tiny"}))
    return folder


# --------------------------------------------------------------------------- request


def test_build_request_fields_and_batch_size_precedence(dataset):
    spec = model_spec()
    request = build_request(spec, dataset, seed=7, device="cuda", variant="default", gene_id_type="symbol")
    assert request == {
        "contract_version": CONTRACT_VERSION,
        "model": "tiny",
        "variant": "default",
        "seed": 7,
        "device": "cuda",
        "batch_size": 16,  # the spec's parameters.batch_size
        "organism": "human",
        "gene_id_type": "symbol",
        "batch_keys": ["batch", "time_point"],
        "parameters": {"min_genes": 0},  # batch_size is a field of its own
        "dataset_file": "dataset.h5ad",
    }
    assert spec.parameters["batch_size"].default == 16  # the spec is not changed
    over = build_request(spec, dataset, seed=0, device="cpu", variant="v", gene_id_type="symbol", batch_size=4)
    assert over["batch_size"] == 4  # RunOptions.batch_size wins
    plain = build_request(model_spec(parameters={}), dataset, seed=0, device="cpu", variant="v",
                          gene_id_type="ensembl")
    assert plain["batch_size"] == DEFAULT_BATCH_SIZE and plain["parameters"] == {}  # declared or not


def test_request_json_is_what_the_container_reads(dataset, tmp_path):
    request = build_request(model_spec(), dataset, seed=3, device="cpu", variant="default",
                            gene_id_type="symbol")
    write_input(dataset, tmp_path / "input", request)
    parsed = czb_container.Request.from_file(tmp_path / "input" / "request.json")
    assert parsed == czb_container.Request(
        model="tiny", seed=3, device="cpu", batch_size=16, variant="default", organism="human",
        gene_id_type="symbol", batch_keys=("batch", "time_point"), parameters={"min_genes": 0},
        dataset_file="dataset.h5ad", contract_version=CONTRACT_VERSION,
    )
    assert czb_container.CONTRACT_VERSION == CONTRACT_VERSION


def test_declared_parameters_reach_the_request_and_the_job_reads_them(dataset, tmp_path):
    spec = model_spec(parameters={
        "batch_size": {"type": "int", "default": 16, "minimum": 1, "description": "cells per pass"},
        "min_genes": {"type": "int", "default": 0, "minimum": 0, "description": "fewer: dropped"},
        "mode": {"type": "str", "default": "auto", "choices": ["auto", "fast"], "description": "how"},
    })
    request = build_request(spec, dataset, seed=0, device="cpu", variant="default", gene_id_type="symbol")
    assert request["batch_size"] == 16 and request["parameters"] == {"min_genes": 0, "mode": "auto"}
    # Values the run sets: strings parsed as declared, batch_size still a field of its own.
    source = DockerModelSource(spec, RunOptions(parameters={"min_genes": "5"}, batch_size=4))
    assert source.parameters == {"batch_size": 4, "min_genes": 5, "mode": "auto"}
    assert source.describe()["parameters"] == source.parameters
    request = build_request(spec, dataset, seed=0, device="cpu", variant="default", gene_id_type="symbol",
                            parameters=source.parameters)
    assert request["batch_size"] == 4 and request["parameters"] == {"min_genes": 5, "mode": "auto"}
    write_input(dataset, tmp_path / "input", request)
    job = czb_container.Job(czb_container.Request.from_file(tmp_path / "input" / "request.json"),
                            tmp_path / "input", tmp_path / "weights", tmp_path / "output")
    assert job.parameter("min_genes") == 5 and job.parameter("mode") == "auto"
    # A parameter the host did not send (the spec does not declare it) is the contract's error.
    with pytest.raises(czb_container.ContractError, match=r"parameter 'emb_layer' missing \(sent: min_genes, "
                       r"mode\); .*declare emb_layer under the spec's parameters"):
        job.parameter("emb_layer")


def test_misspelled_parameter_fails_before_any_container_or_dataset_work(dataset, monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the container engine was called")

    monkeypatch.setattr(docker_engine, "client", refused)
    options = RunOptions(parameters={"min_gene": 1})
    with pytest.raises(UnknownNameError, match="model 'tiny' has no parameter 'min_gene'; did you mean 'min_genes'"):
        DockerModelSource(model_spec(), options)
    with pytest.raises(UnknownNameError, match="did you mean 'min_genes'"):
        build_request(model_spec(), dataset, seed=0, device="cpu", variant="default", gene_id_type="symbol",
                      parameters={"min_gene": 1})
    with pytest.raises(SpecError, match="parameter batch_size must be at least 1, got 0"):
        DockerModelSource(model_spec(), RunOptions(parameters={"batch_size": 0}))


def test_host_and_container_name_the_same_files_and_exit_codes():
    # Two copies by design (images never import czb); they must not drift apart.
    from czb.models.docker import contract as host
    for name in ("CONTRACT_VERSION", "EXIT_OK", "EXIT_NOT_APPLICABLE", "DATASET_FILE", "REQUEST_FILE",
                 "EMBEDDINGS_FILE", "CELL_IDS_FILE", "META_FILE", "REASON_FILE"):
        assert getattr(host, name) == getattr(czb_container, name), name


# --------------------------------------------------------------------------- applicability


def test_check_applicable_organism():
    spec = model_spec(organisms=["human"])
    mouse = synthetic(organism="mouse", gene_prefix="ENSMUSG")
    with pytest.raises(NotApplicableError, match=r"tiny \(default\) supports human; dataset synth is mouse"):
        check_applicable(spec, mouse, "default")
    check_applicable(model_spec(organisms=[]), mouse, "default")  # empty: any organism


def test_check_applicable_variant_organisms_override_the_models():
    spec = model_spec(
        organisms=["human", "mouse"],
        default_variant="human_only",
        variants={"human_only": WeightsVariant(organisms=["human"]), "both": WeightsVariant()},
    )
    mouse = synthetic(organism="mouse", gene_prefix="ENSMUSG")
    with pytest.raises(NotApplicableError, match=r"tiny \(human_only\) supports human;"):
        check_applicable(spec, mouse, "human_only")
    check_applicable(spec, mouse, "both")  # no organisms of its own: the model's
    check_applicable(spec, synthetic(), "human_only")


def test_check_applicable_raw_counts_model_on_log_normalized_data():
    log_norm = synthetic(expression="log_normalized")
    with pytest.raises(NotApplicableError, match="tiny reads raw counts; dataset synth provides log_normalized"):
        check_applicable(model_spec(), log_norm, "default")
    check_applicable(model_spec(input="any"), log_norm, "default")


# --------------------------------------------------------------------------- input


def test_write_input_h5ad(dataset, tmp_path):
    request = build_request(model_spec(), dataset, seed=0, device="cpu", variant="default",
                            gene_id_type="symbol")
    summary = write_input(dataset, tmp_path / "input", request)
    written = ad.read_h5ad(tmp_path / "input" / "dataset.h5ad")
    assert sp.issparse(written.X) and written.X.format == "csr" and written.X.dtype == np.float32
    np.testing.assert_array_equal(written.X.toarray(), dataset.adata.X.toarray())
    assert list(written.obs_names) == list(dataset.adata.obs_names)
    assert list(written.var_names) == [f"GENE{i}" for i in range(N_GENES)]
    assert list(written.var["gene_symbol"]) == list(written.var_names)
    assert list(written.var["ensembl_id"]) == list(dataset.adata.var_names)
    assert list(written.obs.columns) == ["batch", "time_point"]
    assert all(isinstance(v, str) for v in written.obs["time_point"])  # ints written as strings
    assert list(written.obs["time_point"]) == [str(t) for t in dataset.adata.obs["time_point"]]
    assert list(written.obs["batch"].astype(str)) == list(dataset.adata.obs["batch"].astype(str))
    assert summary["n_genes_model_input"] == N_GENES and summary["mapping"] == "dataset var['feature_name']"


def test_write_input_ensembl_ids_and_left_out_genes(dataset, tmp_path):
    dataset.adata.var["feature_name"] = ["A", "A", *[f"G{i}" for i in range(N_GENES - 2)]]
    dataset.adata.var_names = [f"{g}.3" for g in dataset.adata.var_names]  # versioned IDs
    request = build_request(model_spec(), dataset, seed=0, device="cpu", variant="default",
                            gene_id_type="symbol")
    summary = write_input(dataset, tmp_path / "in", request)
    written = ad.read_h5ad(tmp_path / "in" / "dataset.h5ad")
    assert summary["n_genes_ambiguous"] == 2 and written.n_vars == N_GENES - 2
    np.testing.assert_array_equal(written.X.toarray(), dataset.adata.X[:, 2:].toarray())
    assert list(written.var["ensembl_id"]) == [g[:-2] for g in dataset.adata.var_names[2:]]

    request = {**request, "gene_id_type": "ensembl"}
    write_input(dataset, tmp_path / "ens", request)
    written = ad.read_h5ad(tmp_path / "ens" / "dataset.h5ad")
    assert written.n_vars == N_GENES and written.var_names[0].startswith("ENSG")
    assert not written.var_names[0].endswith(".3")
    assert list(written.var["gene_symbol"][:2]) == ["A", "A"]


def test_write_input_without_symbols_writes_empty_strings(tmp_path):
    ds = synthetic()  # Ensembl IDs only
    request = build_request(model_spec(gene_id_type="ensembl"), ds, seed=0, device="cpu",
                            variant="default", gene_id_type="ensembl")
    write_input(ds, tmp_path / "in", request)
    written = ad.read_h5ad(tmp_path / "in" / "dataset.h5ad")
    assert list(written.var["gene_symbol"]) == [""] * N_GENES


def test_written_input_is_readable_by_others_and_by_the_container(dataset, tmp_path):
    request = build_request(model_spec(), dataset, seed=0, device="cpu", variant="default",
                            gene_id_type="symbol")
    input_dir = tmp_path / "input"
    input_dir.mkdir(mode=0o700)
    write_input(dataset, input_dir, request)
    assert mode(input_dir) == 0o755
    assert mode(input_dir / "dataset.h5ad") == 0o644
    assert mode(input_dir / "request.json") == 0o644
    job = czb_container.Job(czb_container.Request.from_file(input_dir / "request.json"), input_dir,
                            tmp_path / "weights", tmp_path / "output")
    adata = job.read_dataset()
    assert adata.shape == (N_CELLS, N_GENES)
    assert list(adata.var_names) == [f"GENE{i}" for i in range(N_GENES)]


# --------------------------------------------------------------------------- output


def test_read_output_happy_path(tmp_path):
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    folder = write_files(tmp_path / "out", values, ["a", "b", "c"], {"model": "tiny", "dim": 4})
    out = read_output(folder, name="tiny")
    np.testing.assert_array_equal(out.values, values)
    assert out.values.dtype == np.float32
    assert out.cell_ids.dtype == object and list(out.cell_ids) == ["a", "b", "c"]
    assert out.meta == {"model": "tiny", "dim": 4}


def test_read_output_refuses_float64(tmp_path):
    folder = write_files(tmp_path / "out", np.zeros((2, 3)), ["a", "b"])
    with pytest.raises(EmbeddingError, match="tiny: embeddings.npy has dtype float64; the contract asks for float32"):
        read_output(folder, name="tiny")


def test_read_output_without_meta_means_the_run_did_not_finish(tmp_path):
    folder = write_files(tmp_path / "out", np.zeros((2, 3), np.float32), ["a", "b"], meta=False)
    with pytest.raises(EmbeddingError, match=r"wrote no meta.json \(the run did not finish\)"):
        read_output(folder, name="tiny")


def test_read_output_missing_embeddings_file(tmp_path):
    folder = write_files(tmp_path / "out", np.zeros((2, 3), np.float32), ["a", "b"])
    (folder / "embeddings.npy").unlink()
    with pytest.raises(EmbeddingError, match="output file embeddings.npy missing"):
        read_output(folder, name="tiny")


def test_read_output_length_mismatch_and_shape(tmp_path):
    folder = write_files(tmp_path / "out", np.zeros((3, 2), np.float32), ["a", "b"])
    with pytest.raises(EmbeddingError, match=r"shape \(3, 2\) but cell_ids.json lists 2 cells"):
        read_output(folder, name="tiny")
    folder = write_files(tmp_path / "flat", np.zeros(2, np.float32), ["a", "b"])
    with pytest.raises(EmbeddingError, match=r"shape \(2,\)"):
        read_output(folder, name="tiny")
    folder = write_files(tmp_path / "ints", np.zeros((2, 2), np.float32), [1, 2])
    with pytest.raises(EmbeddingError, match="cell_ids.json must be a JSON list of strings"):
        read_output(folder, name="tiny")


class _Tripwire:
    """Unpickling this touches a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_read_output_never_unpickles(tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "out"
    folder.mkdir()
    evil = np.empty((2, 1), dtype=object)
    evil[0, 0], evil[1, 0] = _Tripwire(marker), _Tripwire(marker)
    np.save(folder / "embeddings.npy", evil, allow_pickle=True)
    (folder / "cell_ids.json").write_text('["a", "b"]')
    (folder / "meta.json").write_text("{}")
    with pytest.raises(EmbeddingError, match="tiny: unreadable output"):
        read_output(folder, name="tiny")
    assert not marker.exists()
    pickle.loads(pickle.dumps(evil[0, 0]))  # the tripwire works
    assert marker.exists()


def test_read_output_names_the_cell_with_nan(tmp_path):
    values = np.ones((3, 2), np.float32)
    values[1, 0] = np.nan
    folder = write_files(tmp_path / "out", values, ["a", "cell_b", "c"])
    with pytest.raises(EmbeddingError, match=r"1 of 3 rows have NaN or infinite values \(cell IDs 'cell_b'\)"):
        read_output(folder, name="tiny")


def test_container_outputs_round_trip_to_the_host(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 3))  # float64: the container side converts
    ids = np.array([f"cell_{i}" for i in range(5)])
    out = tmp_path / "out"
    out.mkdir()
    czb_container.write_outputs(out, czb_container.ModelOutput(values, ids, n_weight_tensors=2),
                                {"model": "tiny", "n_weight_tensors_loaded": 2})
    got = read_output(out, name="tiny")
    np.testing.assert_array_equal(got.values, values.astype(np.float32))
    assert list(got.cell_ids) == list(ids)
    assert got.meta == {"model": "tiny", "n_weight_tensors_loaded": 2}


def test_weights_checksum_is_the_same_on_both_sides(tmp_path):
    folder = tmp_path / "w"
    (folder / "nested" / "deeper").mkdir(parents=True)
    (folder / "model.pt").write_bytes(bytes(range(256)) * 10)
    (folder / "nested" / "deeper" / "vocab.json").write_text('{"CD4": 1}')
    (folder / "nested" / "args.json").write_text("{}")
    assert czb_container.weights_checksum(folder) == directory_checksum(folder) is not None
    (folder / "nested" / "args.json").write_text('{"x": 1}')
    assert czb_container.weights_checksum(folder) == directory_checksum(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert czb_container.weights_checksum(empty) is None and directory_checksum(empty) is None


# --------------------------------------------------------------------------- cache


def key_parts(**changes) -> dict:
    parts = {
        "contract_version": 1,
        "image_id": "sha256:" + "1" * 64,
        "weights_checksum": "2" * 64,
        "dataset": {"sha256": "3" * 64, "layer": "X", "gene_key": None, "gene_id_type": "ensembl",
                    "n_cells": 10, "n_genes": 5},
        "request": {"seed": 0, "batch_size": 16, "parameters": {"a": 1}},
    }
    for path, value in changes.items():
        target = parts
        *inner, last = path.split("__")
        for name in inner:
            target = target[name]
        target[last] = value
    return parts


def test_cache_key_is_stable_and_sensitive():
    base = cache_key(key_parts())
    assert len(base) == 64 and base == cache_key(key_parts())
    reordered = dict(reversed(list(key_parts().items())))
    assert cache_key(reordered) == base
    changed = [
        cache_key(key_parts(image_id="sha256:" + "9" * 64)),
        cache_key(key_parts(weights_checksum="8" * 64)),
        cache_key(key_parts(weights_checksum=None)),
        cache_key(key_parts(dataset__sha256="7" * 64)),
        cache_key(key_parts(request__seed=1)),
        cache_key(key_parts(request__parameters={"a": 2})),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_embedding_cache_put_get_replace(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    key = cache_key(key_parts())
    assert cache.get(key, name="tiny") is None
    first = write_files(tmp_path / "run1", np.eye(2, 3, dtype=np.float32), ["a", "b"], {"run": 1})
    entry = cache.put(key, first, key_parts())
    assert entry == tmp_path / "cache" / "embeddings" / key and not first.exists()
    assert json.loads((entry / "key.json").read_text())["image_id"] == "sha256:" + "1" * 64
    got = cache.get(key, name="tiny")
    assert got.meta == {"run": 1} and list(got.cell_ids) == ["a", "b"]

    second = write_files(tmp_path / "run2", -np.eye(2, 3, dtype=np.float32), ["a", "b"], {"run": 2})
    assert cache.put(key, second, key_parts()) == entry
    got = cache.get(key, name="tiny")
    assert got.meta == {"run": 2} and got.values[0, 0] == -1
    assert sorted(p.name for p in cache.root.iterdir()) == [key]  # no leftovers


def test_embedding_cache_uses_the_cache_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "c"))
    assert EmbeddingCache().root == tmp_path / "c" / "embeddings"


def test_damaged_cache_entry_is_dropped(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    key = cache_key(key_parts())
    entry = cache.put(key, write_files(tmp_path / "run", np.eye(2, 3, dtype=np.float32), ["a", "b"]), key_parts())
    (entry / "embeddings.npy").unlink()
    assert cache.get(key, name="tiny") is None
    assert not entry.exists()


# --------------------------------------------------------------------------- the source


def test_limits_precedence():
    from czb.models.docker.engine import RunLimits

    spec = model_spec(resources=Resources(gpu=True, memory_gb=3, shm_gb=0.5, timeout_s=300),
                      read_only_rootfs=False)
    assert DockerModelSource(spec).limits() == RunLimits(
        gpus="all", memory_gb=3, shm_gb=0.5, timeout_s=300, read_only_rootfs=False
    )
    options = RunOptions(gpus="none", memory_gb=8, shm_gb=1.5, timeout_s=20)
    assert DockerModelSource(spec, options).limits() == RunLimits(
        gpus="none", memory_gb=8, shm_gb=1.5, timeout_s=20, read_only_rootfs=False
    )
    cpu = DockerModelSource(model_spec(resources=Resources()))
    limits = cpu.limits()
    assert limits.gpus == "none" and limits.memory_gb is None and limits.shm_gb == 2.0
    assert limits.timeout_s is None and limits.read_only_rootfs is True
    assert DockerModelSource(model_spec(), RunOptions(gpus="1")).limits().gpus == "1"


def test_describe_and_variants(tmp_path):
    spec = model_spec(default_variant="small",
                      variants={"small": WeightsVariant(), "large": WeightsVariant()})
    source = DockerModelSource(spec, cache_dir=tmp_path)
    assert source.describe() == {
        "name": "tiny",
        "kind": "docker",
        "image": "czb-test/tiny:1",
        "image_digest": None,
        "variant": "small",
        "parameters": {"batch_size": 16, "min_genes": 0},
    }
    assert DockerModelSource(spec, RunOptions(variant="large")).variant == "large"
    assert source.cache.root == tmp_path / "embeddings"
    # An unknown variant fails when the source is made, before any work
    # (UnknownNameError is a SpecError).
    with pytest.raises(SpecError, match="'huge'"):
        DockerModelSource(spec, RunOptions(variant="huge"))
    with pytest.raises(EmbeddingError, match="'pca' is not a docker model"):
        DockerModelSource(ModelSpec(name="pca", kind="baseline", implementation="pca"))


# --------------------------------------------------------------------------- a whole run, faked


def projection_embed(job):
    """An entrypoint: log1p counts times a fixed matrix, shifted by the seed."""
    adata = job.read_dataset()
    x = np.log1p(adata.X.toarray())
    w = np.linspace(-1, 1, adata.n_vars * 4).reshape(adata.n_vars, 4)
    return czb_container.ModelOutput(x @ w + job.request.seed, adata.obs_names, n_weight_tensors=1,
                                     info={"n_genes_seen": adata.n_vars})


@pytest.fixture
def fake_docker(monkeypatch, tmp_path):
    """docker_engine without Docker: the 'container' is czb_container.run in-process."""
    state = SimpleNamespace(runs=[], embed=projection_embed, image_id="sha256:" + "a" * 64,
                            weights_seen=None, engine_used=False)

    def client():
        state.engine_used = True
        return object()

    def image_info(engine, tag, *, model):
        return docker_engine.ImageInfo(tag=tag, id=state.image_id)

    def run_container(engine, image, *, mounts, limits, name, log=None, log_file=None,
                      on_start=None, environment=None):
        state.runs.append({"mounts": dict(mounts), "limits": limits, "image": image})
        weights = state.weights_seen or (mounts["/weights"][0] if "/weights" in mounts
                                         else tmp_path / "no-weights")
        rc = czb_container.run(state.embed, model=name, input_dir=mounts["/input"][0],
                               weights_dir=weights, output_dir=mounts["/output"][0])
        log_file.write_text("fake log line\n")
        return docker_engine.ContainerRun(exit_code=rc, log_tail=["fake log line"], runtime_s=0.01)

    monkeypatch.setattr(docker_engine, "client", client)
    monkeypatch.setattr(docker_engine, "image_info", image_info)
    monkeypatch.setattr(docker_engine, "run_container", run_container)
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # czb_container.run sets it; restore it after
    return state


def test_fake_run_then_cache_hit(dataset, fake_docker):
    source = DockerModelSource(model_spec(), RunOptions(gpus="none"))
    first = source.embed(dataset, seed=0)
    assert first.values.shape == (N_CELLS, 4) and first.cell_index is None
    assert first.info["cache"] == "miss" and first.info["genes"]["n_genes_model_input"] == N_GENES
    assert first.info["container_meta"]["n_genes_seen"] == N_GENES
    assert first.info["request"]["device"] == "cpu"
    run = fake_docker.runs[0]
    assert {k: m for k, (_, m) in run["mounts"].items()} == {"/input": "ro", "/output": "rw"}
    assert run["limits"].gpus == "none" and run["limits"].memory_gb == 3

    again = source.embed(dataset, seed=0)
    assert again.info["cache"] == "hit" and len(fake_docker.runs) == 1
    np.testing.assert_array_equal(again.values, first.values)
    assert again.info["cache_key"] == first.info["cache_key"]
    assert again.info["log_tail"] == ["fake log line"]

    other_seed = source.embed(dataset, seed=1)
    assert other_seed.info["cache"] == "miss" and len(fake_docker.runs) == 2
    assert other_seed.info["cache_key"] != first.info["cache_key"]
    np.testing.assert_allclose(other_seed.values, first.values + 1, rtol=1e-6)

    fake_docker.image_id = "sha256:" + "b" * 64  # a rebuilt image
    rebuilt = source.embed(dataset, seed=0)
    assert rebuilt.info["cache"] == "miss" and rebuilt.info["cache_key"] != first.info["cache_key"]

    off = DockerModelSource(model_spec(), RunOptions(gpus="none", use_cache=False)).embed(dataset, seed=0)
    assert off.info["cache"] == "off" and len(fake_docker.runs) == 4


def test_fake_run_weights_are_mounted_and_keyed(dataset, fake_docker, tmp_path):
    weights = tmp_path / "my-weights"
    weights.mkdir()
    (weights / "w.npy").write_bytes(b"v1")
    source = DockerModelSource(model_spec(), RunOptions(gpus="none", weights_dir=weights))
    first = source.embed(dataset)
    assert fake_docker.runs[-1]["mounts"]["/weights"] == (weights.resolve(), "ro")
    assert first.info["weights_checksum"] == directory_checksum(weights)
    assert first.info["container_meta"]["weights_checksum"] == directory_checksum(weights)
    (weights / "w.npy").write_bytes(b"v2")
    second = source.embed(dataset)
    assert second.info["cache"] == "miss" and second.info["cache_key"] != first.info["cache_key"]

    # The container reporting other weights than the host staged is an error.
    other = tmp_path / "other"
    other.mkdir()
    (other / "w.npy").write_bytes(b"other")
    fake_docker.weights_seen = other
    with pytest.raises(EmbeddingError, match="meta.json reports weights_checksum [0-9a-f]{64}, but .* must be"):
        DockerModelSource(model_spec(), RunOptions(weights_dir=weights, use_cache=False)).embed(dataset)


def test_fake_run_not_applicable_and_failure(dataset, fake_docker):
    def not_applicable(job):
        job.require_organism(["mouse"])

    fake_docker.embed = not_applicable
    with pytest.raises(NotApplicableError, match="tiny: not applicable: tiny supports mouse; dataset organism is human"):
        DockerModelSource(model_spec()).embed(dataset)

    def broken(job):
        raise RuntimeError("boom")

    fake_docker.embed = broken
    with pytest.raises(ModelRunError, match=r"container failed \(exit code 1\): RuntimeError: boom") as excinfo:
        DockerModelSource(model_spec()).embed(dataset)
    assert "fake log line" in str(excinfo.value) and excinfo.value.log_tail == ["fake log line"]
    assert not list(EmbeddingCache().root.glob("*/meta.json"))  # nothing cached


def test_host_side_check_comes_before_any_docker_call(fake_docker):
    log_norm = synthetic(expression="log_normalized")
    with pytest.raises(NotApplicableError):
        DockerModelSource(model_spec()).embed(log_norm)
    assert not fake_docker.engine_used and fake_docker.runs == []
