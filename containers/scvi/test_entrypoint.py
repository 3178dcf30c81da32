"""scVI entrypoint tests: a real tiny SCVI reference, saved as the Census publishes it.

The reference is trained once per module (n_latent 4, n_hidden 8, 1 epoch on
``tiny_counts`` keyed by Ensembl IDs, batch key ``batch`` like the Census models) and
saved with ``SCVI.save`` as ``<weights>/homo_sapiens/model.pt``; every test then runs
the entrypoint in-process on a query through scvi-tools' own query path.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scvi
import torch
from conftest import (
    Entrypoint,
    assert_failed,
    assert_not_applicable,
    embeddings,
    read_output,
    tiny_counts,
)

SCVI = Entrypoint(
    "scvi",
    package="scvi-tools",
    dataset=lambda: query_counts(),
    organism="human",
    gene_id_type="ensembl",
    seed=0,
    batch_size=16,
    # The spec's defaults; the host sends them all.
    parameters={"mode": "census_query", "max_epochs": 0, "min_gene_fraction": 0.5},
)
entrypoint = SCVI.module

N_LATENT = 4


def write_reference(folder):
    """Train a tiny SCVI reference and save it as ``<folder>/homo_sapiens/model.pt``.

    Returns its folder, training data, model and own latent means.
    """
    scvi.settings.seed = 0
    adata = tiny_counts(gene_id_type="ensembl")
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=N_LATENT, n_hidden=8, n_layers=1, gene_likelihood="nb")
    model.train(max_epochs=1, accelerator="cpu", batch_size=16, enable_progress_bar=False)
    model.save(str(folder / "homo_sapiens"), save_anndata=False)
    return {
        "folder": folder,
        "adata": adata,
        "model": model,
        "latent": model.get_latent_representation(),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A trained tiny SCVI reference: its folder, training data and own latent means."""
    return write_reference(tmp_path_factory.mktemp("reference"))


def stage(dirs, reference, edit=None):
    """Copy the reference into the weights folder; ``edit`` may change its state dict."""
    shutil.copytree(reference["folder"], dirs["weights"], dirs_exist_ok=True)
    if edit is not None:
        path = dirs["weights"] / "homo_sapiens" / "model.pt"
        saved = torch.load(path, weights_only=False)
        edit(saved["model_state_dict"])
        torch.save(saved, path)


def query_counts():
    # Same genes as the reference, other cells (another seed).
    return tiny_counts(gene_id_type="ensembl", seed=1)


def n_reference_tensors(reference):
    saved = torch.load(reference["folder"] / "homo_sapiens" / "model.pt", weights_only=False)
    return sum(isinstance(v, torch.Tensor) for v in saved["model_state_dict"].values())


def test_embeds_query_with_the_reference_encoder(tmp_path, reference):
    adata = reference["adata"]
    dirs = SCVI.job(tmp_path, adata)
    stage(dirs, reference)
    assert SCVI.run(dirs) == 0
    values, ids, meta = read_output(dirs["output"])
    assert values.shape == (adata.n_obs, N_LATENT)
    assert np.isfinite(values).all()
    assert ids == list(adata.obs_names)
    # The Census encoder takes no batch: the query latent is the reference's own.
    np.testing.assert_allclose(values, reference["latent"], rtol=1e-5, atol=1e-5)
    assert meta["n_weight_tensors_loaded"] == n_reference_tensors(reference) > 30
    assert meta["weights_checksum"]
    assert meta["package"] == "scvi-tools"
    assert scvi.__version__ in (meta.get("version"), meta.get("package_version"))
    assert meta["genes_matched"] == meta["reference_genes"] == 60
    assert meta["genes_zero_filled"] == 0
    assert meta["query_batches"] == 1 and meta["query_batches_in_reference"] == 0
    assert meta["query_training_epochs"] == 0
    assert meta["mode"] == "census_query"


def test_same_seed_same_embedding_and_nothing_written_outside_output(
    tmp_path, reference, monkeypatch
):
    # The working directory must stay empty: lightning logs or checkpoints would fail
    # on a read-only root filesystem.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    runs = []
    for name in ("a", "b"):
        dirs = SCVI.job(tmp_path / name, seed=3, parameters={"max_epochs": 2})
        stage(dirs, reference)
        weights_before = sorted(p.relative_to(dirs["weights"]) for p in dirs["weights"].rglob("*"))
        assert SCVI.run(dirs) == 0
        assert (
            sorted(p.relative_to(dirs["weights"]) for p in dirs["weights"].rglob("*"))
            == weights_before
        )
        runs.append(read_output(dirs["output"]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][2]["query_training_epochs"] == 2
    assert list(cwd.iterdir()) == []


def test_query_training_keeps_reference_weights_frozen(tmp_path, reference):
    outputs = []
    for epochs in (0, 3):
        dirs = SCVI.job(tmp_path / str(epochs), parameters={"max_epochs": epochs})
        stage(dirs, reference)
        assert SCVI.run(dirs) == 0
        outputs.append(embeddings(dirs))
    # The encoder takes no batch, so scArches freezes all of it: not one bit moves
    # (scvi's default weight decay of 1e-6 would nudge it).
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("change", ["remove", "rename"])
def test_partial_checkpoint_fails_and_keeps_nothing(tmp_path, reference, change):
    def edit(state):
        tensor = state.pop("z_encoder.mean_encoder.weight")
        if change == "rename":
            state["z_encoder.mean_encoder.weight_renamed"] = tensor

    dirs = SCVI.job(tmp_path)
    stage(dirs, reference, edit)
    assert_failed(SCVI.run(dirs), dirs, "PartialLoadError", "mean_encoder.weight")


def test_partial_load_check_names_tensors_not_loaded(reference):
    saved = torch.load(reference["folder"] / "homo_sapiens" / "model.pt", weights_only=False)
    ref = entrypoint.Reference(
        path=reference["folder"],
        tensors=dict(saved["model_state_dict"]),
        var_names=np.array([]),
        batch_key="batch",
        batches=[],
        layer=None,
        init_params={},
        scvi_version=None,
    )
    del ref.tensors["pyro_param_store"]
    module = reference["model"].module
    assert entrypoint.check_reference_loaded(module, ref) == len(ref.tensors)
    ref.tensors["px_r"] = ref.tensors["px_r"] + 1.0
    with pytest.raises(entrypoint.PartialLoadError, match="px_r"):
        entrypoint.check_reference_loaded(module, ref)


def test_unsupported_organism_is_not_applicable(tmp_path, reference):
    dirs = SCVI.job(tmp_path, organism="zebrafish")
    stage(dirs, reference)
    assert_not_applicable(SCVI.run(dirs), dirs)


def test_variant_of_another_organism_is_not_applicable(tmp_path, reference):
    dirs = SCVI.job(tmp_path, organism="mouse", variant="homo_sapiens")
    stage(dirs, reference)
    assert_not_applicable(SCVI.run(dirs), dirs)


def test_missing_genes_are_zero_filled_and_counted(tmp_path, reference):
    adata = reference["adata"]
    rng = np.random.default_rng(0)
    dropped = rng.choice(adata.n_vars, size=15, replace=False)
    kept = np.setdiff1d(np.arange(adata.n_vars), dropped)
    query = adata[:, rng.permutation(kept)].copy()  # other gene order
    # Versioned IDs, as some datasets write them, match the unversioned reference.
    query.var_names = [f"{g}.7" for g in query.var_names]
    extra = tiny_counts(
        n_genes=5, gene_id_type="ensembl", ensembl_ids=[f"ENSG9{i:010d}" for i in range(5)]
    )
    extra.obs_names = query.obs_names
    import anndata as ad

    query = ad.concat([query, extra], axis=1, merge="first")
    dirs = SCVI.job(tmp_path, query)
    stage(dirs, reference)
    assert SCVI.run(dirs) == 0
    values, ids, meta = read_output(dirs["output"])
    assert meta["genes_matched"] == 45
    assert meta["genes_zero_filled"] == 15
    assert meta["dataset_genes_not_in_reference"] == 5
    assert meta["gene_match_fraction"] == pytest.approx(0.75)
    # Same as the reference encoder on the training data with those genes set to zero.
    zeroed = adata.copy()
    zeroed.X = zeroed.X.toarray()
    zeroed.X[:, dropped] = 0
    expected = reference["model"].get_latent_representation(zeroed)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    assert ids == list(adata.obs_names)


def test_too_few_reference_genes_fails_clearly(tmp_path, reference):
    query = query_counts()[:, :10].copy()
    dirs = SCVI.job(tmp_path, query, parameters={"min_gene_fraction": 0.5})
    stage(dirs, reference)
    assert_failed(SCVI.run(dirs), dirs, "only 10 of the 60 reference genes", "min_gene_fraction")


def test_symbol_keyed_dataset_uses_the_ensembl_column(tmp_path, reference):
    query = tiny_counts(gene_id_type="symbol", seed=1)
    dirs = SCVI.job(tmp_path, query, gene_id_type="symbol")
    stage(dirs, reference)
    assert SCVI.run(dirs) == 0
    assert read_output(dirs["output"])[2]["genes_matched"] == 60


def test_batch_keys_make_census_style_batch_labels(tmp_path, reference):
    query = query_counts()
    # "b" + "0" and "b" + "1" are the reference's batches; "x" + "9" is new.
    query.obs["dataset_id"] = ["x" if i % 4 == 3 else "b" for i in range(query.n_obs)]
    query.obs["donor_id"] = ["9" if i % 4 == 3 else str(i % 2) for i in range(query.n_obs)]
    dirs = SCVI.job(
        tmp_path, query, batch_keys=["dataset_id", "donor_id"], parameters={"max_epochs": 1}
    )
    stage(dirs, reference)
    assert SCVI.run(dirs) == 0
    values, _, meta = read_output(dirs["output"])
    assert values.shape == (query.n_obs, N_LATENT)
    assert meta["query_batches"] == 3
    assert meta["query_batches_in_reference"] == 2
    assert meta["reference_batches"] == 2
    assert meta["batch_keys"] == ["dataset_id", "donor_id"]
    # New batches grow the decoder's batch columns; the loaded count is the reference's.
    assert meta["n_weight_tensors_loaded"] == n_reference_tensors(reference)


def test_missing_batch_column_fails(tmp_path, reference):
    dirs = SCVI.job(tmp_path, batch_keys=["donor_id"])
    stage(dirs, reference)
    assert_failed(SCVI.run(dirs), dirs, "donor_id")
