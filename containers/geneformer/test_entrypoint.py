"""Tests of the Geneformer entrypoint: helical's Geneformer code and a tiny random BERT.

Each test writes the weights folder in the layout the model spec stages from
``ctheodoris/Geneformer``: ``model/`` saved with ``save_pretrained`` and the token, median
and Ensembl-mapping dictionaries as pickles. Run in the model's venv
(``containers/venv.sh geneformer``).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from conftest import (
    Entrypoint,
    assert_failed,
    assert_not_applicable,
    assert_one_cell_dropped,
    embeddings,
    read_output,
    tiny_counts,
    without_known_genes,
)
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForMaskedLM

GENEFORMER = Entrypoint(
    "geneformer",
    package="helical",
    dataset=lambda: tiny_counts(gene_id_type="ensembl"),
    gene_id_type="ensembl",
    batch_size=16,
    parameters={"emb_layer": -1, "emb_mode": "auto"},  # the spec's defaults; the host sends both
)

INPUT_SIZE = 24  # max_position_embeddings: cells (about 50 expressed genes) get truncated
N_LAYERS = 2
# 50 of the 60 genes of tiny_counts are in the token dictionary.
VOCAB_IDS = [f"ENSG{i:011d}" for i in range(50)]


def dictionaries(special_tokens: bool = True) -> dict[str, dict]:
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if special_tokens else [])
    tokens = {t: i for i, t in enumerate(specials + VOCAB_IDS)}
    rng = np.random.default_rng(7)
    medians = {
        g: float(m) for g, m in zip(VOCAB_IDS, rng.uniform(0.5, 5.0, len(VOCAB_IDS)), strict=True)
    }
    mapping = {g: g for g in VOCAB_IDS}
    return {"tokens": tokens, "medians": medians, "mapping": mapping}


def write_weights(weights_dir, special_tokens: bool = True) -> dict[str, dict]:
    dicts = dictionaries(special_tokens)
    config = BertConfig(
        vocab_size=len(dicts["tokens"]),
        hidden_size=16,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=INPUT_SIZE,
        hidden_act="relu",
        pad_token_id=0,
    )
    torch.manual_seed(1)
    BertForMaskedLM(config).save_pretrained(weights_dir / "model")
    for name, key in (
        ("token_dictionary.pkl", "tokens"),
        ("gene_median_dictionary.pkl", "medians"),
        ("ensembl_mapping_dict.pkl", "mapping"),
    ):
        with (weights_dir / name).open("wb") as f:
            pickle.dump(dicts[key], f)
    return dicts


def run_job(tmp_path, adata=None, special_tokens=True, edit_weights=None, **request):
    dirs = GENEFORMER.job(tmp_path, adata, **request)
    write_weights(dirs["weights"], special_tokens)
    if edit_weights is not None:
        edit_weights(dirs["weights"] / "model" / "model.safetensors")
    return GENEFORMER.run(dirs), dirs


def expected_input_ids(counts: np.ndarray, dicts: dict, special_tokens: bool) -> list[int]:
    """Geneformer's rank value encoding of one cell, written out independently."""
    scaled = counts / counts.sum() * 10_000
    values = {g: scaled[i] / dicts["medians"][g] for i, g in enumerate(VOCAB_IDS) if counts[i] > 0}
    ranked = [dicts["tokens"][g] for g in sorted(values, key=values.get, reverse=True)]
    if special_tokens:
        return [dicts["tokens"]["<cls>"], *ranked[: INPUT_SIZE - 2], dicts["tokens"]["<eos>"]]
    return ranked[:INPUT_SIZE]


def reference_embedding(weights_dir, input_ids: list[int], special_tokens: bool) -> np.ndarray:
    """The penultimate layer's <cls> state (V2) or mean over genes (V1), computed directly."""
    model = BertForMaskedLM.from_pretrained(weights_dir / "model", output_hidden_states=True).eval()
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([input_ids])).hidden_states[N_LAYERS - 1][0]
    return (hidden[0] if special_tokens else hidden.mean(dim=0)).numpy()


def test_embeds_every_cell(tmp_path):
    code, dirs = run_job(tmp_path)
    assert code == 0
    values, ids, meta = read_output(dirs["output"])
    assert values.shape == (40, 16)
    assert np.isfinite(values).all()
    assert ids == [f"cell{i}" for i in range(40)]
    stored = load_file(dirs["weights"] / "model" / "model.safetensors")
    assert meta["n_weight_tensors_loaded"] == len(stored)
    assert meta["weights_checksum"]
    assert meta["package"] == "helical"
    assert meta.get("version", meta.get("package_version")) == "2.2.0"  # key named by the contract
    assert meta["n_genes_input"] == 60 and meta["n_genes_matched"] == 50
    assert meta["emb_mode"] == "cls" and meta["hidden_states_index"] == N_LAYERS - 1
    assert meta["model_input_size"] == INPUT_SIZE


def test_rank_value_encoding_and_cls_state(tmp_path):
    adata = tiny_counts(gene_id_type="ensembl")
    x = adata.X.tolil()
    x[1, 5:] = 0  # a short cell: 5 genes, padded in its batch
    adata.X = x.tocsr()
    code, dirs = run_job(tmp_path, adata=adata)
    assert code == 0
    values = embeddings(dirs)
    dicts = dictionaries(special_tokens=True)
    for cell, length in ((0, INPUT_SIZE), (1, 5 + 2), (17, INPUT_SIZE)):
        ids = expected_input_ids(adata.X[cell].toarray().ravel(), dicts, special_tokens=True)
        assert len(ids) == length  # long cells truncated to the model's input size
        np.testing.assert_allclose(
            values[cell], reference_embedding(dirs["weights"], ids, True), atol=1e-5
        )


def test_v1_model_mean_pools_genes(tmp_path):
    adata = tiny_counts(gene_id_type="ensembl")
    code, dirs = run_job(tmp_path, adata=adata, special_tokens=False)
    assert code == 0
    values, _, meta = read_output(dirs["output"])
    assert meta["emb_mode"] == "cell"
    dicts = dictionaries(special_tokens=False)
    ids = expected_input_ids(adata.X[3].toarray().ravel(), dicts, special_tokens=False)
    np.testing.assert_allclose(
        values[3], reference_embedding(dirs["weights"], ids, False), atol=1e-5
    )
    code, dirs = run_job(tmp_path / "cls", special_tokens=False, parameters={"emb_mode": "cls"})
    assert_failed(code, dirs, "<cls>")


def test_same_seed_same_embeddings(tmp_path):
    first = run_job(tmp_path / "a", seed=5)
    second = run_job(tmp_path / "b", seed=5)
    assert first[0] == second[0] == 0
    np.testing.assert_array_equal(embeddings(first[1]), embeddings(second[1]))


def test_partial_checkpoint_fails(tmp_path):
    def drop_tensor(path):
        state = load_file(path)
        del state["bert.encoder.layer.1.output.dense.weight"]
        save_file(state, path, metadata={"format": "pt"})

    code, dirs = run_job(tmp_path, edit_weights=drop_tensor)
    assert_failed(code, dirs, "PartialLoadError", "output.dense.weight")
    # transformers alone loads it, keeping a random tensor, and only reports it:
    _, info = BertForMaskedLM.from_pretrained(dirs["weights"] / "model", output_loading_info=True)
    assert info["missing_keys"] == {"bert.encoder.layer.1.output.dense.weight"}


def test_unexpected_tensor_fails(tmp_path):
    def add_pooler(path):
        state = load_file(path)
        state["bert.pooler.dense.weight"] = torch.zeros(16, 16)
        save_file(state, path, metadata={"format": "pt"})

    code, dirs = run_job(tmp_path, edit_weights=add_pooler)
    assert_failed(code, dirs, "unexpected", "bert.pooler.dense.weight")


def test_unsupported_organism_not_applicable(tmp_path):
    assert_not_applicable(*run_job(tmp_path, organism="mouse"))


def test_symbols_only_fail_clearly(tmp_path):
    adata = tiny_counts(gene_id_type="symbol")
    del adata.var["ensembl_id"]
    assert_failed(*run_job(tmp_path / "symbols", adata=adata, gene_id_type="symbol"), "Ensembl")
    # Symbols labelled as Ensembl IDs match nothing: a clear failure, not an empty embedding.
    code, dirs = run_job(tmp_path / "mislabelled", adata=tiny_counts(gene_id_type="symbol"))
    assert_failed(code, dirs, "none of the 60 genes")


def test_symbol_dataset_uses_ensembl_id_column_and_versions_are_stripped(tmp_path):
    code, dirs = run_job(tmp_path / "ensembl")
    assert code == 0
    reference = embeddings(dirs)
    code, dirs = run_job(
        tmp_path / "symbol", adata=tiny_counts(gene_id_type="symbol"), gene_id_type="symbol"
    )
    assert code == 0
    np.testing.assert_array_equal(embeddings(dirs), reference)
    versioned = tiny_counts(gene_id_type="ensembl")
    versioned.var_names = [f"{g}.{i % 9 + 1}" for i, g in enumerate(versioned.var_names)]
    code, dirs = run_job(tmp_path / "versioned", adata=versioned)
    assert code == 0
    np.testing.assert_array_equal(embeddings(dirs), reference)


def test_columns_with_the_same_ensembl_id_are_summed_into_the_first(tmp_path):
    # helical's tokenizer stops with KeyError on such a dataset; Geneformer's own sums them.
    import anndata as ad
    import scipy.sparse as sp

    plain = tiny_counts(gene_id_type="ensembl")
    code, dirs = run_job(tmp_path / "plain", adata=plain)
    assert code == 0
    reference = embeddings(dirs)
    counts = plain.X.toarray()
    half = np.floor(counts[:, 3] / 2)  # gene 3's counts split over two columns, the second last
    split = np.hstack([counts, (counts[:, 3] - half)[:, None]])
    split[:, 3] = half
    var_names = [*plain.var_names[:3], f"{plain.var_names[3]}.1", *plain.var_names[4:], f"{plain.var_names[3]}.2"]
    duplicated = ad.AnnData(X=sp.csr_matrix(split.astype(np.float32)), obs=plain.obs)
    duplicated.var_names = var_names
    duplicated.var["gene_symbol"] = [*plain.var["gene_symbol"], plain.var["gene_symbol"].iloc[3]]
    duplicated.var["ensembl_id"] = var_names
    code, dirs = run_job(tmp_path / "duplicated", adata=duplicated)
    assert code == 0
    np.testing.assert_array_equal(embeddings(dirs), reference)
    assert read_output(dirs["output"])[2]["n_genes_merged"] == 1


def test_cell_without_vocabulary_genes_is_dropped(tmp_path):
    # cell5 keeps counts only in the 10 genes the dictionary lacks.
    adata = without_known_genes(tiny_counts(gene_id_type="ensembl"), cell=5, n_known=50)
    assert_one_cell_dropped(*run_job(tmp_path, adata=adata), "cell5", n_cells=40)


@pytest.mark.parametrize(
    ("parameters", "index"), [({"emb_layer": 0}, N_LAYERS), ({"emb_mode": "cell"}, N_LAYERS - 1)]
)
def test_layer_and_mode_parameters(tmp_path, parameters, index):
    code, dirs = run_job(tmp_path / "default")
    default = embeddings(dirs)
    code, dirs = run_job(tmp_path / "other", parameters=parameters)
    assert code == 0
    values, _, meta = read_output(dirs["output"])
    assert meta["hidden_states_index"] == index
    assert not np.allclose(values, default)
