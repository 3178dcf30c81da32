"""The host's side of ``scvi_denovo``: scVI trained de novo in the scvi image, no weights.

The training itself runs in the scvi model's own environment
(``containers/scvi/test_denovo.py``); here: the bundled spec, that nothing asks for or
mounts weights, that ``--param`` cannot switch the scvi image's mode, and that the
image's gene selection (``containers/scvi/hvg.py``, numpy only) picks scanpy's genes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from czb.cli import app
from czb.core.errors import SpecError
from czb.data.reading import load_dataset
from czb.models.docker import engine as docker_engine
from czb.models.docker.request import RunOptions
from czb.models.docker.source import DockerModelSource
from czb.models.weights import resolve_weights, stage_weights
from czb.specs.catalog import Catalog
from czb.specs.parameters import resolve_parameters
from czb.specs.schema import DatasetSpec

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"
if str(CONTAINERS / "common") not in sys.path:
    sys.path.insert(0, str(CONTAINERS / "common"))
import czb_container


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hvg = _load(CONTAINERS / "scvi" / "hvg.py", "czb_test_scvi_hvg")


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load([])


# --------------------------------------------------------------------------- the spec


def test_bundled_spec_runs_the_scvi_image_without_weights(catalog):
    spec, query = catalog.model("scvi_denovo"), catalog.model("scvi")
    assert spec.kind == "docker" and (spec.image, spec.container) == (query.image, query.container)
    assert spec.image == "czb/scvi:1.4.2"
    assert spec.input == "raw_counts" and spec.gene_id_type == "any" and spec.organisms == []
    assert spec.variants == {} and spec.variant()[1].weights == []
    # scIB's settings and scvi-tools' rule for the epochs (0).
    assert resolve_parameters(spec) == {
        "mode": "de_novo", "batch_size": 1024, "n_top_genes": 2000, "n_latent": 30, "n_hidden": 128,
        "n_layers": 2, "gene_likelihood": "nb", "max_epochs": 0, "train_size": 1.0, "train_batch_size": 128,
    }
    assert resolve_parameters(query)["mode"] == "census_query"


@pytest.mark.parametrize(("model", "other"), [("scvi", "de_novo"), ("scvi_denovo", "census_query")])
def test_param_cannot_switch_the_mode(catalog, model, other):
    with pytest.raises(SpecError, match=f"parameter mode must be one of .*, got '{other}'"):
        resolve_parameters(catalog.model(model), {"mode": other})


def test_no_weights_are_staged_or_resolved(catalog, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr("czb.io.fetch.fetch", no_download)
    spec = catalog.model("scvi_denovo")
    for staged in (stage_weights(spec), resolve_weights(spec)):
        assert staged.path is None and staged.checksum is None and staged.variant == "default"
    from czb.core.settings import get_settings

    assert not (get_settings().cache_dir / "weights").exists()


def test_cli_lists_it_and_fetch_weights_has_nothing_to_do(monkeypatch):
    monkeypatch.setattr("czb.io.fetch.fetch", lambda *a, **k: pytest.fail("nothing may be downloaded"))
    runner = CliRunner()
    listed = runner.invoke(app, ["list", "models", "--format", "json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["scvi_denovo"]["kind"] == "docker" and rows["scvi_denovo"]["output_dim"] == 30
    fetched = runner.invoke(app, ["models", "fetch-weights", "scvi_denovo"])
    assert fetched.exit_code == 0, fetched.output
    assert "scvi_denovo/default: no weights needed" in fetched.stdout


def test_a_run_mounts_no_weights_and_sends_the_mode(catalog, monkeypatch, tmp_path):
    """docker_engine faked: the 'container' is czb_container.run in-process."""
    dataset = load_dataset(DatasetSpec(
        name="synth", uri="synthetic:planted_cells", organism="mouse", label_key="cell_type",
        batch_key=["batch"], expression="raw_counts",
        params={"n_cells": 20, "n_genes": 10, "n_cell_types": 2, "n_batches": 2, "seed": 0},
    ))
    seen = SimpleNamespace(mounts=None, request=None)

    def embed(job):
        seen.request = job.request
        adata = job.read_dataset()
        values = np.random.default_rng(0).normal(size=(adata.n_obs, 3))
        return czb_container.ModelOutput(values, adata.obs_names, n_weight_tensors=0)

    def run_container(engine, image, *, mounts, log_file, name, **kwargs):
        seen.mounts = dict(mounts)
        rc = czb_container.run(embed, model=name, input_dir=mounts["/input"][0],
                               weights_dir=tmp_path / "absent", output_dir=mounts["/output"][0])
        log_file.write_text("")
        return docker_engine.ContainerRun(exit_code=rc, log_tail=[], runtime_s=0.01)

    monkeypatch.setattr(docker_engine, "client", lambda: object())
    monkeypatch.setattr(docker_engine, "image_info",
                        lambda engine, tag, *, model: docker_engine.ImageInfo(tag=tag, id="sha256:" + "c" * 64))
    monkeypatch.setattr(docker_engine, "run_container", run_container)
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # czb_container.run sets it; restore it after
    source = DockerModelSource(catalog.model("scvi_denovo"), RunOptions(gpus="none"))
    result = source.embed(dataset, seed=4)
    assert set(seen.mounts) == {"/input", "/output"}
    assert result.values.shape == (20, 3) and result.info["weights_checksum"] is None
    assert seen.request.parameters["mode"] == "de_novo" and seen.request.seed == 4
    assert seen.request.batch_keys == ("batch",) and seen.request.organism == "mouse"


# --------------------------------------------------------------------------- gene selection


def _counts(seed: int, n_batches: int):
    rng = np.random.default_rng(seed)
    n_cells, n_genes = 400, 300
    kinds = rng.integers(0, 3, n_cells)
    rates = rng.gamma(0.5, 1.0, size=(3, n_genes)) * rng.lognormal(0, 1, size=n_genes)
    depth = rng.lognormal(0, 0.5, size=n_cells)
    x = rng.poisson(rates[kinds] * depth[:, None]).astype(np.float64)
    batches = np.array([f"b{i % n_batches}" for i in range(n_cells)])
    if n_batches > 1:
        x[batches == "b1", :7] = 0  # genes not expressed in one batch
    x[3] = 0  # a cell without counts
    return x, batches


def _scanpy_genes(x, batches, n_top_genes):
    import scanpy as sc

    adata = ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame({"batch": pd.Categorical(batches)}))
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top_genes, flavor="cell_ranger", batch_key="batch")
    return np.flatnonzero(adata.var["highly_variable"].to_numpy())


@pytest.mark.parametrize(("seed", "n_batches", "n_top_genes"),
                         [(0, 1, 100), (1, 2, 100), (2, 3, 50), (3, 3, 200), (4, 2, 25)])
def test_gene_selection_is_scanpys_batch_aware_cell_ranger(seed, n_batches, n_top_genes, monkeypatch):
    x, batches = _counts(seed, n_batches)
    monkeypatch.setattr(hvg, "CHUNK_CELLS", 97)  # several chunks, one batch spread over them
    chosen = hvg.select_genes(sp.csr_matrix(x), batches, n_top_genes)
    assert len(chosen) == n_top_genes and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, _scanpy_genes(x, batches, n_top_genes))


def test_gene_selection_keeps_every_gene_when_asked_for_all_or_more():
    x, batches = _counts(0, 2)
    for n in (0, 300, 5000):
        np.testing.assert_array_equal(hvg.select_genes(x, batches, n), np.arange(300))

