"""Tests of the TranscriptFormer entrypoint with a tiny random model in the published layout.

The checkpoint folder holds ``config.json``, ``model_weights.pt`` (a state dict of the
package's ``Transcriptformer`` with embedding size 16, 2 layers, 63 gene positions) and
``vocabs/`` with per-species gene -> ESM2 embedding files (HDF5, as published) and the
assay vocabulary, so the package's own vocabulary, loading and inference code runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    Entrypoint,
    assert_failed,
    assert_not_applicable,
    embeddings,
    read_output,
    snapshot,
    tiny_counts,
)

torch = pytest.importorskip("torch")
import czb_container

SPECIAL_TOKENS = ["unknown", "[PAD]", "[START]", "[END]", "[RD]", "[CELL]", "[MASK]"]
EMBED_DIM = 16
N_GENES = 60
#: The dataset's genes ENSG...0 to ENSG...49 are in the human vocabulary; 50..59 are not.
HUMAN_VOCAB = [f"ENSG{i:011d}" for i in range(50)]
MOUSE_VOCAB = [f"ENSMUSG{i:011d}" for i in range(40)]

TRANSCRIPTFORMER = Entrypoint(
    "transcriptformer",
    package="transcriptformer",
    dataset=lambda: tiny_counts(n_genes=N_GENES, gene_id_type="ensembl"),
    seed=0,
    batch_size=8,
    organism="human",
    gene_id_type="ensembl",
    parameters={"precision": "auto", "compile": "auto"},  # the spec's defaults; the host sends both
)


def checkpoint_config(species: list[str]) -> dict:
    """A ``config.json`` as published: the model, data and loss sections of the checkpoint."""
    return {
        "model": {
            "model_type": "transcriptformer",
            "model_config": {
                "log_counts_eps": 1e-6,
                "num_heads": 2,
                "num_layers": 2,
                "model_dim": 32,
                "embed_dim": EMBED_DIM,
                "dropout": 0.1,
                "activation": "gelu",
                "attn_bias": False,
                "fw_bias": False,
                "mu_link_fn": "softmax",
                "softcap": 10,
                "seq_len": 63,
                "aux_len": 1,
                "block_len": 64,
                "gene_head_hidden_dim": 32,
                "compile_block_mask": True,
            },
            "data_config": {
                "aux_vocab_path": "vocabs",
                "pin_memory": True,
                "aux_cols": "assay",
                "gene_col_name": "ensembl_id",
                "clip_counts": 30,
                "filter_to_vocabs": True,
                "filter_outliers": 0.0,
                "pad_zeros": True,
                "normalize_to_scale": 0,
                "n_data_workers": 1,
                "sort_genes": False,
                "randomize_genes": False,
                "min_expressed_genes": 0,
                "gene_pad_token": "[PAD]",
                "aux_pad_token": "unknown",
                "esm2_mappings": [f"{s}_gene.h5" for s in species],
                "special_tokens": SPECIAL_TOKENS,
            },
            "loss_config": {"gene_id_loss_weight": 1.0, "softplus_approx": True},
        }
    }


def write_checkpoint(folder: Path, vocabs: dict[str, list[str]]) -> Path:
    """Write a tiny random TranscriptFormer in the published checkpoint layout."""
    import h5py
    from omegaconf import OmegaConf
    from transcriptformer.model.model import Transcriptformer
    from transcriptformer.tokenizer.vocab import construct_gene_embeddings

    (folder / "vocabs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for species, genes in vocabs.items():
        with h5py.File(folder / "vocabs" / f"{species}_gene.h5", "w") as f:
            f.create_dataset("keys", data=np.array(genes, dtype="S"))
            arrays = f.create_group("arrays")
            for gene in genes:
                arrays.create_dataset(gene, data=rng.normal(size=8).astype(np.float32))
    assays = {"unknown": 0, "10x 3' v3": 1, "Smart-seq2": 2}
    (folder / "vocabs" / "assay_vocab.json").write_text(json.dumps(assays))
    config = checkpoint_config(list(vocabs))
    (folder / "config.json").write_text(json.dumps(config))

    cfg = OmegaConf.create(config).model
    files = [str(folder / "vocabs" / f"{s}_gene.h5") for s in vocabs]
    gene_vocab, emb_matrix = construct_gene_embeddings(files, SPECIAL_TOKENS)
    torch.manual_seed(0)
    model = Transcriptformer(
        data_config=cfg.data_config,
        model_config=cfg.model_config,
        loss_config=cfg.loss_config,
        gene_vocab_dict=gene_vocab,
        aux_vocab_dict={"assay": assays},
        emb_matrix=torch.tensor(emb_matrix),
    )
    torch.save(model.state_dict(), folder / "model_weights.pt")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights folder with tf_sapiens (human) and tf_exemplar (human and mouse)."""
    folder = tmp_path_factory.mktemp("transcriptformer") / "weights"
    write_checkpoint(folder / "tf_sapiens", {"homo_sapiens": HUMAN_VOCAB})
    # The published archive unpacks to <variant>/<variant>/.
    write_checkpoint(
        folder / "tf_exemplar" / "tf_exemplar",
        {"homo_sapiens": HUMAN_VOCAB, "mus_musculus": MOUSE_VOCAB},
    )
    return folder


def test_embeds_every_cell(tmp_path, weights):
    dirs = TRANSCRIPTFORMER.job(tmp_path)
    assert TRANSCRIPTFORMER.run(dirs, weights) == 0
    values, ids, meta = read_output(dirs["output"])
    assert values.shape == (40, EMBED_DIM)
    assert np.isfinite(values).all()
    assert np.abs(values).sum(axis=1).min() > 0
    assert ids == [f"cell{i}" for i in range(40)]
    checkpoint = torch.load(weights / "tf_sapiens" / "model_weights.pt", weights_only=True)
    assert meta["n_weight_tensors_loaded"] == len(checkpoint)
    assert meta["weights_checksum"] == czb_container.weights_checksum(weights)
    assert meta["package"] == "transcriptformer"
    assert meta["n_genes_used"] == len(HUMAN_VOCAB)
    assert (meta["variant"], meta["species"], meta["precision"]) == (
        "tf_sapiens",
        "homo_sapiens",
        "32",
    )
    assert meta["compiled_attention"] is False


def test_same_as_package_inference(tmp_path, weights, monkeypatch):
    # The entrypoint's output is what the package's run_inference gives, configured as
    # `transcriptformer inference --device cpu --precision 32 --disable-compile-block-mask`.
    from omegaconf import OmegaConf
    from transcriptformer.model.inference import run_inference

    dirs = TRANSCRIPTFORMER.job(tmp_path)
    assert TRANSCRIPTFORMER.run(dirs, weights) == 0
    values = embeddings(dirs)

    checkpoint = weights / "tf_sapiens"
    import transcriptformer.cli

    defaults = Path(transcriptformer.cli.__file__).parent / "conf" / "inference_config.yaml"
    cfg = OmegaConf.merge(
        OmegaConf.create(json.loads((checkpoint / "config.json").read_text())),
        OmegaConf.load(defaults),
    )
    cfg.model.inference_config.batch_size = 8
    cfg.model.inference_config.precision = "32"
    cfg.model.inference_config.device = "cpu"
    cfg.model.data_config.use_raw = None
    cfg.model.model_config.compile_block_mask = False
    cfg.model.inference_config.load_checkpoint = str(checkpoint / "model_weights.pt")
    cfg.model.data_config.aux_vocab_path = str(checkpoint / "vocabs")
    cfg.model.data_config.esm2_mappings_path = str(checkpoint / "vocabs")
    adata = tiny_counts(n_genes=N_GENES, gene_id_type="ensembl")
    adata.obs = adata.obs.drop(columns="batch")
    adata.obs["assay"] = "unknown"
    monkeypatch.chdir(tmp_path)  # run_inference writes ./logs
    reference = run_inference(cfg, data_files=[adata]).obsm["embeddings"]
    np.testing.assert_allclose(values, np.asarray(reference), rtol=1e-5, atol=1e-6)


def test_same_seed_same_embeddings(tmp_path, weights):
    first, second = TRANSCRIPTFORMER.job(tmp_path / "a"), TRANSCRIPTFORMER.job(tmp_path / "b")
    assert TRANSCRIPTFORMER.run(first, weights) == TRANSCRIPTFORMER.run(second, weights) == 0
    np.testing.assert_array_equal(embeddings(first), embeddings(second))


@pytest.mark.parametrize("change", ["remove", "rename"])
def test_partial_checkpoint_fails(tmp_path, weights, change):
    partial = tmp_path / "partial"
    shutil.copytree(weights / "tf_sapiens", partial / "tf_sapiens")
    path = partial / "tf_sapiens" / "model_weights.pt"
    state = torch.load(path, weights_only=True)
    tensor = state.pop("transformer_encoder.encoder_layers.1.linear2.weight")
    if change == "rename":
        state["transformer_encoder.encoder_layers.1.linear_2.weight"] = tensor
    torch.save(state, path)
    dirs = TRANSCRIPTFORMER.job(tmp_path)
    code = TRANSCRIPTFORMER.run(dirs, partial)
    assert_failed(code, dirs, "PartialLoadError", "encoder_layers.1.linear2.weight")


def test_unsupported_organism_is_not_applicable(tmp_path, weights):
    # tf_sapiens knows human genes only.
    adata = tiny_counts(n_genes=len(MOUSE_VOCAB), ensembl_ids=MOUSE_VOCAB, gene_id_type="ensembl")
    dirs = TRANSCRIPTFORMER.job(tmp_path, adata, organism="mouse")
    assert_not_applicable(TRANSCRIPTFORMER.run(dirs, weights), dirs)


def test_multi_species_variant_embeds_mouse(tmp_path, weights):
    adata = tiny_counts(n_genes=len(MOUSE_VOCAB), ensembl_ids=MOUSE_VOCAB, gene_id_type="ensembl")
    dirs = TRANSCRIPTFORMER.job(tmp_path, adata, organism="mouse", variant="tf_exemplar")
    assert TRANSCRIPTFORMER.run(dirs, weights) == 0
    values, ids, meta = read_output(dirs["output"])
    assert values.shape == (40, EMBED_DIM)
    assert ids == [f"cell{i}" for i in range(40)]
    assert (meta["variant"], meta["species"], meta["n_genes_used"]) == (
        "tf_exemplar",
        "mus_musculus",
        40,
    )
    # tf_exemplar knows neither rat nor any organism outside its vocabulary files.
    rat = TRANSCRIPTFORMER.job(tmp_path / "rat", adata, organism="rat", variant="tf_exemplar")
    assert_not_applicable(TRANSCRIPTFORMER.run(rat, weights), rat)


def test_runs_from_read_only_working_dir(tmp_path, weights, monkeypatch):
    # Lightning's CSVLogger("logs") in run_inference writes into the working directory.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cwd.chmod(0o555)
    monkeypatch.chdir(cwd)
    before = snapshot(weights)
    dirs = TRANSCRIPTFORMER.job(tmp_path)
    assert TRANSCRIPTFORMER.run(dirs, weights) == 0
    assert list(cwd.iterdir()) == []
    assert Path.cwd() == cwd
    assert snapshot(weights) == before


def test_assay_column_is_used(tmp_path, weights):
    plain = TRANSCRIPTFORMER.job(tmp_path / "plain")
    adata = tiny_counts(n_genes=N_GENES, gene_id_type="ensembl")
    adata.obs["assay"] = "10x 3' v3"
    with_assay = TRANSCRIPTFORMER.job(tmp_path / "assay", adata)
    assert TRANSCRIPTFORMER.run(plain, weights) == TRANSCRIPTFORMER.run(with_assay, weights) == 0
    a, b = embeddings(plain), embeddings(with_assay)
    assert not np.allclose(a, b)
    assert read_output(with_assay["output"])[2]["aux_columns_from_obs"] == ["assay"]


def test_gene_symbols_fail_clearly(tmp_path, weights):
    dirs = TRANSCRIPTFORMER.job(tmp_path, tiny_counts(n_genes=N_GENES, gene_id_type="symbol"))
    assert_failed(TRANSCRIPTFORMER.run(dirs, weights), dirs, "Ensembl")
