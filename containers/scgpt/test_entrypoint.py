"""Tests of the scGPT entrypoint: scGPT's real code at a tiny random-initialised size.

Each test writes ``args.json``, ``vocab.json`` and ``best_model.pt`` in the layout of the
published model zoo folders (flash-attn tensor names, training heads included), so the
entrypoint's real loading path runs. Run in the model's venv (``containers/venv.sh scgpt``).
"""

from __future__ import annotations

import json
import sys

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

# Loading the entrypoint installs the torchtext shim, before scgpt is imported.
# max_length: the spec's default (the host sends every declared parameter).
SCGPT = Entrypoint("scgpt", package="scgpt", gene_id_type="symbol", batch_size=16,
                   parameters={"max_length": 1200})
ep = SCGPT.module

from scgpt.model import TransformerModel
from scgpt.tokenizer import GeneVocab
from scgpt.utils import load_pretrained

ARGS = {
    "embsize": 16,
    "nheads": 2,
    "d_hid": 16,
    "nlayers": 2,
    "n_layers_cls": 1,
    "dropout": 0.2,
    "pad_token": "<pad>",
    "pad_value": -2,
    "mask_value": -1,
    "n_bins": 51,
    "input_emb_style": "continuous",
    "max_seq_len": 1200,
    "fast_transformer": True,
}
# 50 of the 60 genes of tiny_counts are in the vocabulary, plus 10 genes it lacks.
VOCAB_GENES = [f"GENE{i}" for i in range(50)] + [f"OTHER{i}" for i in range(10)]
HEADS = ("decoder.", "mvc_decoder.", "cls_decoder.", "flag_encoder.")


def published_state_dict(flash_names: bool = True) -> dict[str, torch.Tensor]:
    """A tiny scGPT checkpoint as the model zoo ships it.

    Random weights of scGPT's ``TransformerModel``; attention tensors under flash-attn's
    ``Wqkv`` names; the expression and MVC decoders and the generative flag embedding
    included, the classifier head absent (it is not trained in pretraining).
    """
    torch.manual_seed(1)
    vocab = GeneVocab.from_dict(
        {t: i for i, t in enumerate(["<pad>", "<cls>", "<eoc>", *VOCAB_GENES])}
    )
    model = TransformerModel(
        ntoken=len(vocab),
        d_model=ARGS["embsize"],
        nhead=ARGS["nheads"],
        d_hid=ARGS["d_hid"],
        nlayers=ARGS["nlayers"],
        nlayers_cls=ARGS["n_layers_cls"],
        vocab=vocab,
        pad_value=ARGS["pad_value"],
        do_mvc=True,
    )
    state = {
        k: v.clone() for k, v in model.state_dict().items() if not k.startswith("cls_decoder.")
    }
    state["flag_encoder.weight"] = torch.randn(3, ARGS["embsize"])
    if flash_names:
        state = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in state.items()}
    return state


def write_weights(weights_dir, state=None) -> dict[str, torch.Tensor]:
    state = published_state_dict() if state is None else state
    (weights_dir / "args.json").write_text(json.dumps(ARGS))
    tokens = ["<pad>", "<cls>", "<eoc>", *VOCAB_GENES]
    (weights_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    torch.save(state, weights_dir / "best_model.pt")
    return state


def run_job(tmp_path, adata=None, state=None, **request):
    dirs = SCGPT.job(tmp_path, adata, **request)
    write_weights(dirs["weights"], state)
    return SCGPT.run(dirs), dirs


def test_embeds_every_cell(tmp_path):
    code, dirs = run_job(tmp_path)
    assert code == 0
    values, ids, meta = read_output(dirs["output"])
    assert values.shape == (40, ARGS["embsize"])
    assert np.isfinite(values).all()
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, rtol=1e-5)
    assert ids == [f"cell{i}" for i in range(40)]
    state = torch.load(dirs["weights"] / "best_model.pt", weights_only=True)
    used = [k for k in state if not k.startswith(HEADS)]
    assert meta["n_weight_tensors_loaded"] == len(used) == 3 + 6 + 12 * ARGS["nlayers"]
    assert meta["n_training_head_tensors_skipped"] == len(state) - len(used)
    assert meta["weights_checksum"]
    assert meta["package"] == "scgpt"
    assert meta.get("version", meta.get("package_version")) == "0.2.4"  # key named by the contract
    assert meta["n_genes_input"] == 60
    assert meta["n_genes_matched"] == 50
    assert meta["n_cells_dropped"] == 0
    # The two planted groups of tiny_counts separate: cells are closer within a group.
    sim = values @ values.T
    group = np.arange(40) % 2
    assert (
        sim[group[:, None] == group[None, :]].mean() > sim[group[:, None] != group[None, :]].mean()
    )


def test_same_seed_same_embeddings_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        code, dirs = run_job(tmp_path / name, seed=seed)
        assert code == 0
        runs[name] = embeddings(dirs)
    np.testing.assert_array_equal(runs["a"], runs["b"])
    # Binning breaks ties at random: another seed gives other bins, other embeddings.
    assert not np.allclose(runs["a"], runs["c"])


def test_batch_size_does_not_change_embeddings(tmp_path):
    # Cells are binned and sampled one after another in one process, so the random
    # streams a cell sees do not depend on batching (or on the machine's CPU count).
    outputs = []
    for batch_size in (16, 7):
        code, dirs = run_job(
            tmp_path / str(batch_size), batch_size=batch_size, parameters={"max_length": 12}
        )
        assert code == 0
        outputs.append(embeddings(dirs))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)


def test_partial_checkpoint_fails(tmp_path):
    state = published_state_dict()
    del state["transformer_encoder.layers.1.linear2.weight"]
    # scGPT's own loader accepts it silently and keeps the random tensor:
    model = TransformerModel(
        ntoken=63,
        d_model=16,
        nhead=2,
        d_hid=16,
        nlayers=2,
        vocab=GeneVocab.from_dict({"<pad>": 0}),
        do_mvc=True,
    )
    random_init = model.state_dict()["transformer_encoder.layers.1.linear2.weight"].clone()
    load_pretrained(model, state, verbose=False)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["transformer_encoder.layers.1.linear2.weight"], random_init)
    torch.testing.assert_close(
        loaded["transformer_encoder.layers.1.linear1.weight"],
        state["transformer_encoder.layers.1.linear1.weight"],
    )
    assert_failed(*run_job(tmp_path, state=state), "PartialLoadError", "linear2.weight")


def test_renamed_tensor_fails(tmp_path):
    state = published_state_dict()
    state["encoder.norm.weight"] = state.pop("encoder.enc_norm.weight")
    assert_failed(*run_job(tmp_path, state=state), "1 missing", "1 unexpected")


def test_unsupported_organism_not_applicable(tmp_path):
    assert_not_applicable(*run_job(tmp_path, organism="mouse"))


def test_flash_attention_names_are_mapped(tmp_path):
    flash = published_state_dict(flash_names=True)
    plain = published_state_dict(flash_names=False)
    assert any(".self_attn.Wqkv.weight" in k for k in flash)
    assert not any("in_proj" in k for k in flash)
    assert ep.remap_flash_attention_keys(flash).keys() == plain.keys()
    outputs = []
    for name, state in (("flash", flash), ("plain", plain)):
        code, dirs = run_job(tmp_path / name, state=state)
        assert code == 0
        outputs.append(read_output(dirs["output"]))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    assert outputs[0][2]["n_weight_tensors_loaded"] == outputs[1][2]["n_weight_tensors_loaded"]


def test_torchtext_shim_serves_gene_vocab(tmp_path):
    assert sys.modules["torchtext.vocab"] is sys.modules["torchtext_shim"]
    tokens = ["<pad>", "<cls>", "GENE1", "GENE2"]
    vocab = GeneVocab.from_dict({t: i for i, t in enumerate(tokens)})
    vocab.save_json(tmp_path / "vocab.json")
    again = GeneVocab.from_file(tmp_path / "vocab.json")
    assert again.get_stoi() == vocab.get_stoi() == {t: i for i, t in enumerate(tokens)}
    assert again.get_itos() == tokens
    # "<pad>" is the default: unknown genes map to it, as with torchtext.
    assert again(["GENE2", "NOPE"]) == [3, 0]
    assert "GENE1" in again and "NOPE" not in again
    again.append_token("<eoc>")
    assert again["<eoc>"] == 4 and len(again) == 5
    with pytest.raises(RuntimeError, match="already exists"):
        again.append_token("GENE1")
    with pytest.raises(RuntimeError, match="out of bounds"):
        # scGPT requires consecutive indices; a gap is an error, not a silent shift.
        GeneVocab.from_dict({"<pad>": 0, "GENE1": 5})
    built = GeneVocab(["B", "A", "B"], specials=["<pad>"])
    assert built.get_itos() == ["<pad>", "B", "A"]  # specials first, then by frequency


def test_genes_outside_vocab_dropped_none_matched_fails(tmp_path):
    # Ensembl IDs where symbols are expected: nothing matches, the run fails clearly.
    adata = tiny_counts()
    adata.var_names = adata.var["ensembl_id"].to_numpy()
    assert_failed(*run_job(tmp_path, adata=adata), "none of the 60 genes")


def test_ensembl_dataset_uses_gene_symbol_column(tmp_path):
    code, dirs = run_job(tmp_path / "symbol")
    assert code == 0
    by_symbol = embeddings(dirs)
    code, dirs = run_job(
        tmp_path / "ensembl", adata=tiny_counts(gene_id_type="ensembl"), gene_id_type="ensembl"
    )
    assert code == 0
    np.testing.assert_array_equal(embeddings(dirs), by_symbol)


def test_cell_without_vocabulary_genes_is_dropped(tmp_path):
    # cell5 keeps counts only in the 10 genes the vocabulary lacks.
    adata = without_known_genes(tiny_counts(), cell=5, n_known=50)
    assert_one_cell_dropped(*run_job(tmp_path, adata=adata), "cell5", n_cells=40)


def test_long_cells_are_subsampled_reproducibly(tmp_path):
    runs = []
    for name in ("a", "b"):
        code, dirs = run_job(tmp_path / name, parameters={"max_length": 8})
        assert code == 0
        values, _, meta = read_output(dirs["output"])
        assert meta["max_length"] == 8
        runs.append(values)
    np.testing.assert_array_equal(runs[0], runs[1])
    code, dirs = run_job(tmp_path / "full")
    assert not np.allclose(runs[0], embeddings(dirs))
