"""AIDO.Cell entrypoint tests: modelgenerator's own CellFoundation model at a tiny size.

A ``CellFoundationForMaskedLM`` (1 layer, hidden size 8) is random-initialised and saved
with ``save_pretrained`` as the Hugging Face repositories publish it (``config.json`` +
``pytorch_model.bin``); every run then goes through the entrypoint's real loading path.
The model reads all 19,264 genes plus two depth tokens per cell, about a second per cell
on a CPU, so runs use 20 cells at most.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import Entrypoint, assert_failed, assert_not_applicable, read_output, tiny_counts

pytest.importorskip("modelgenerator")
# The declared parameters, with their spec defaults (the host sends every one).
AIDO_CELL = Entrypoint("aido_cell", package="modelgenerator", gene_id_type="symbol",
                       parameters={"precision": "auto"})
entrypoint = AIDO_CELL.module
modeling = entrypoint.install_runtime_fixes()

MODEL_GENES = entrypoint.model_gene_symbols()
HIDDEN = 8
TINY_CONFIG = {
    "hidden_size": HIDDEN,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "intermediate_size": 16,
    "bin_num": 10,
    "max_position_embeddings": len(MODEL_GENES),
    "normalization_type": "LayerNorm",
    "add_linear_bias": False,
    "_use_flash_attention_2": True,
    "architectures": ["CellFoundationForMaskedLM"],
}
# 60 genes spread over the model's list, in model order.
DATASET_GENES = list(MODEL_GENES[::321][:60])


def tiny_config(**overrides):
    from modelgenerator.huggingface_models.cellfoundation import CellFoundationConfig

    return CellFoundationConfig(**{**TINY_CONFIG, **overrides})


def randomise(model, seed=0):
    """Weights large enough that expression values visibly move the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def write_weights(folder):
    """Write a tiny checkpoint in the published layout; return its folder and how many
    encoder tensors it holds."""
    randomise(modeling.CellFoundationForMaskedLM(tiny_config())).save_pretrained(
        folder, safe_serialization=False
    )
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    n_encoder = sum(name.startswith("bert.") for name in saved)
    assert n_encoder > 0 and any(name.startswith("cls.") for name in saved)
    return {"folder": folder, "n_encoder_tensors": n_encoder}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny checkpoint in the published layout, and how many encoder tensors it holds."""
    return write_weights(tmp_path_factory.mktemp("aido_cell_weights"))


def stage(tmp_path, published, adata, edit=None, **request):
    """Write the job folders with the checkpoint; ``edit`` may change its state dict."""
    dirs = AIDO_CELL.job(tmp_path, adata, **request)
    shutil.copytree(published["folder"], dirs["weights"], dirs_exist_ok=True)
    if edit is not None:
        path = dirs["weights"] / "pytorch_model.bin"
        state = torch.load(path, weights_only=True)
        edit(state)
        torch.save(state, path)
    return dirs


def embed_cells(tmp_path, published, adata, **request):
    dirs = stage(tmp_path, published, adata, **request)
    assert AIDO_CELL.run(dirs) == 0
    return read_output(dirs["output"])


def reference_embeddings(folder, adata):
    """Embeddings computed independently: HF ``from_pretrained`` and pandas alignment."""
    frame = pd.DataFrame(adata.X.toarray(), columns=adata.var_names.astype(str))
    frame = frame.loc[:, ~frame.columns.duplicated()]
    counts = torch.tensor(frame.reindex(columns=MODEL_GENES, fill_value=0.0).to_numpy(np.float32))
    total = counts.sum(dim=1, keepdim=True)
    depth = torch.maximum(torch.log10(total), torch.tensor(5.0))
    values = torch.cat([torch.log1p(counts / total * 10000), depth, depth], dim=1).clamp(max=20)
    model = modeling.CellFoundationModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(input_ids=values).last_hidden_state[:, :-2]
    present = torch.from_numpy(np.isin(MODEL_GENES, frame.columns))
    return hidden[:, present].mean(dim=1).numpy()


# --------------------------------------------------------------------------- contract


@pytest.fixture(scope="module")
def twenty_cells(tmp_path_factory, published):
    """One run on 20 cells whose genes are all known to the model, in model order."""
    tmp_path = tmp_path_factory.mktemp("twenty")
    adata = tiny_counts(n_cells=20, symbols=DATASET_GENES)
    dirs = stage(tmp_path, published, adata, seed=3)
    code = AIDO_CELL.run(dirs)
    return {"code": code, "adata": adata, "dirs": dirs}


def test_embeds_every_cell(twenty_cells, published):
    assert twenty_cells["code"] == 0
    values, ids, meta = read_output(twenty_cells["dirs"]["output"])
    assert values.shape == (20, HIDDEN)
    assert np.isfinite(values).all()
    assert ids == list(twenty_cells["adata"].obs_names)
    assert meta["n_weight_tensors_loaded"] == published["n_encoder_tensors"]
    assert meta["weights_checksum"]
    assert meta["package"] == "modelgenerator"
    assert meta["precision"] == "float32"  # CPU default
    assert meta["n_genes_matched"] == len(DATASET_GENES)
    assert meta["n_model_genes"] == 19264
    assert meta["n_cells_dropped_no_counts"] == 0
    # Cells differ (two planted groups), so the embedding is not a constant.
    assert values.std(axis=0).max() > 1e-3


def test_matches_an_independent_computation(twenty_cells, published):
    """Same numbers as HF from_pretrained + pandas reindexing + the published normalisation."""
    values, _, _ = read_output(twenty_cells["dirs"]["output"])
    expected = reference_embeddings(published["folder"], twenty_cells["adata"][:4])
    np.testing.assert_allclose(values[:4], expected, rtol=1e-4, atol=1e-5)


def test_same_seed_same_embeddings(tmp_path, published):
    adata = tiny_counts(n_cells=4, symbols=DATASET_GENES, seed=5)
    first, _, _ = embed_cells(tmp_path / "a", published, adata, seed=7)
    second, _, _ = embed_cells(tmp_path / "b", published, adata, seed=7)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(
            lambda state: state.pop("bert.encoder.layer.0.mlp.up_proj.weight"), id="missing"
        ),
        pytest.param(
            lambda state: state.__setitem__(
                "bert.encoder.ln.gain", state.pop("bert.encoder.ln.weight")
            ),
            id="renamed",
        ),
        pytest.param(
            lambda state: state.__setitem__(
                "bert.position_embedding.weight", state["bert.position_embedding.weight"][:100]
            ),
            id="wrong-shape",
        ),
    ],
)
def test_partial_checkpoint_fails(tmp_path, published, edit):
    adata = tiny_counts(n_cells=3, symbols=DATASET_GENES)
    dirs = stage(tmp_path, published, adata, edit=edit)
    assert_failed(AIDO_CELL.run(dirs), dirs, "PartialLoadError")


def test_missing_weights_fail(tmp_path, published):
    adata = tiny_counts(n_cells=3, symbols=DATASET_GENES)
    dirs = stage(tmp_path, published, adata)
    (dirs["weights"] / "pytorch_model.bin").unlink()
    assert_failed(AIDO_CELL.run(dirs), dirs)


def test_mouse_is_not_applicable(tmp_path, published):
    adata = tiny_counts(n_cells=3, symbols=DATASET_GENES)
    dirs = stage(tmp_path, published, adata, organism="mouse")
    assert_not_applicable(AIDO_CELL.run(dirs), dirs)


def test_no_known_gene_is_not_applicable(tmp_path, published):
    adata = tiny_counts(n_cells=3, n_genes=20)  # GENE0, GENE1...: no model symbol
    dirs = stage(tmp_path, published, adata)
    assert_not_applicable(AIDO_CELL.run(dirs), dirs)


# --------------------------------------------------------------------------- gene alignment


def test_alignment_places_counts_at_model_positions():
    model_genes = np.array(["A", "B", "C", "D", "E"])
    dataset_genes = ["D", "UNKNOWN", "B", "D", "A"]  # shuffled, one unknown, D twice
    counts = sp.csr_matrix(np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.float32))
    columns, positions = entrypoint.align_genes(dataset_genes, model_genes)
    aligned = entrypoint.aligned_counts(counts, columns, positions, len(model_genes))
    # A <- column 4, B <- column 2, D <- its first column 0; C and E missing -> 0.
    np.testing.assert_array_equal(aligned, [[5, 3, 0, 1, 0], [10, 8, 0, 6, 0]])


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_gene_order_unknown_and_duplicate_genes_do_not_change_embeddings(tmp_path, published):
    """Dataset genes shuffled, with unknown and duplicated symbols: same embeddings."""
    ordered = tiny_counts(n_cells=4, symbols=DATASET_GENES, seed=11)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(DATASET_GENES))
    shuffled = ordered[:, order].copy()
    # A duplicated symbol whose second column must be ignored, and genes the model lacks.
    extra_genes = [DATASET_GENES[0], "NOT_A_GENE", "ALSO_NOT_A_GENE"]
    extra = tiny_counts(n_cells=4, n_genes=len(extra_genes), symbols=extra_genes, seed=12)
    extra.obs_names = shuffled.obs_names
    import anndata as ad

    messy = ad.concat([shuffled, extra], axis=1, merge="same")
    messy.obs = ordered.obs.copy()
    assert not messy.var_names.is_unique

    expected, _, meta_ordered = embed_cells(tmp_path / "ordered", published, ordered)
    got, ids, meta_messy = embed_cells(tmp_path / "messy", published, messy)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert ids == list(ordered.obs_names)
    assert meta_ordered["n_genes_matched"] == meta_messy["n_genes_matched"] == len(DATASET_GENES)
    independent = reference_embeddings(published["folder"], messy)
    np.testing.assert_allclose(got, independent, rtol=1e-4, atol=1e-5)

    # The check can fail: the same counts under permuted labels embed differently.
    mislabeled = ordered.copy()
    mislabeled.var_names = np.asarray(DATASET_GENES)[order]
    wrong, _, _ = embed_cells(tmp_path / "mislabeled", published, mislabeled)
    assert not np.allclose(wrong, expected, rtol=1e-3, atol=1e-4)


def test_symbols_from_var_column_when_ids_are_ensembl(tmp_path, published):
    adata = tiny_counts(n_cells=2, symbols=DATASET_GENES, gene_id_type="ensembl")
    values, _, meta = embed_cells(tmp_path, published, adata, gene_id_type="ensembl")
    assert meta["n_genes_matched"] == len(DATASET_GENES)
    expected = reference_embeddings(published["folder"], _by_symbol(adata))
    np.testing.assert_allclose(values, expected, atol=1e-5)


def _by_symbol(adata):
    adata = adata.copy()
    adata.var_names = adata.var["gene_symbol"].astype(str).to_numpy()
    return adata


def test_cells_without_model_gene_counts_are_dropped(tmp_path, published):
    symbols = [*DATASET_GENES, "NOT_A_GENE"]
    adata = tiny_counts(n_cells=3, n_genes=len(symbols), symbols=symbols)
    counts = adata.X.toarray()
    counts[1, :-1] = 0  # cell1 counts only a gene the model does not know
    counts[1, -1] = 5
    adata.X = sp.csr_matrix(counts)
    values, ids, meta = embed_cells(tmp_path, published, adata)
    assert ids == ["cell0", "cell2"]
    assert values.shape == (2, HIDDEN) and np.isfinite(values).all()
    assert meta["n_cells_dropped_no_counts"] == 1


# --------------------------------------------------------------------------- precision


def test_bf16_on_cpu_runs_and_stays_close_to_float32(tmp_path, published):
    adata = tiny_counts(n_cells=3, symbols=DATASET_GENES, seed=4)
    exact, _, meta_exact = embed_cells(tmp_path / "f32", published, adata)
    bf16, _, meta_bf16 = embed_cells(
        tmp_path / "bf16", published, adata, parameters={"precision": "bf16"}
    )
    assert meta_exact["precision"] == "float32" and meta_bf16["precision"] == "bf16"
    assert np.isfinite(bf16).all() and not np.array_equal(bf16, exact)
    norms = np.linalg.norm(bf16, axis=1) * np.linalg.norm(exact, axis=1)
    cosine = (bf16 * exact).sum(axis=1) / norms
    assert cosine.min() > 0.98


def test_unknown_precision_fails(tmp_path, published):
    adata = tiny_counts(n_cells=2, symbols=DATASET_GENES)
    dirs = stage(tmp_path, published, adata, parameters={"precision": "fp8"})
    assert_failed(AIDO_CELL.run(dirs), dirs)


def test_pyarrow_is_pinned_below_21():
    import pyarrow

    assert int(pyarrow.__version__.split(".")[0]) < 21


# --------------------------------------------------------------------------- runtime fixes


def pristine_modeling():
    """A second, untouched copy of modelgenerator's modelling module."""
    package = "modelgenerator.huggingface_models.cellfoundation"
    spec = importlib.util.find_spec(f"{package}.modeling_cellfoundation")
    name = f"{package}._pristine_modeling"
    copy = importlib.util.spec_from_file_location(name, spec.origin)
    module = importlib.util.module_from_spec(copy)
    sys.modules[name] = module
    copy.loader.exec_module(module)
    return module


def exact_attention(query, key, value, bounds):
    """softmax(q k^T / sqrt(d)) v within each packed sequence, head by head."""
    out = torch.empty_like(query)
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))  # heads, tokens, dim
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out[start:end] = (weights @ v).transpose(0, 1)
    return out


def test_varlen_attention_equals_exact_attention():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2 * 7, 3, 4, generator=generator) for _ in range(3))
    bounds = torch.tensor([0, 7, 14], dtype=torch.int32)
    got = entrypoint.sdpa_varlen_attention(
        query, key, value, bounds, bounds, 7, 7, 0.0, softmax_scale=0.5
    )
    np.testing.assert_allclose(got, exact_attention(query, key, value, [0, 7, 14]), atol=1e-5)


def layer_attention(module, hidden_states):
    """Exact attention of one CellFoundation attention block, from its own weights."""
    block = module.encoder.layer[0].attention
    normed = block.ln(hidden_states)
    batch, length, _ = normed.shape
    heads = block.self.num_heads

    def split(linear):
        return linear(normed).reshape(batch * length, heads, -1)

    bounds = list(range(0, (batch + 1) * length, length))
    query, key, value = (split(getattr(block.self, name)) for name in ("query", "key", "value"))
    context = exact_attention(query, key, value, bounds)
    return block.output(context.reshape(batch, length, -1), hidden_states)


def test_attention_fix_gives_exact_attention_and_package_fallback_does_not():
    config = tiny_config(num_attention_heads=2, hidden_size=8)
    fixed = randomise(modeling.CellFoundationModel(config)).eval()
    pristine = pristine_modeling()
    assert not hasattr(pristine, "flash_attn_varlen_func")  # no flash-attn: package fallback
    unfixed = pristine.CellFoundationModel(config).eval()
    unfixed.load_state_dict(fixed.state_dict())

    hidden = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = layer_attention(fixed, hidden)
        got = fixed.encoder.layer[0].attention(hidden)[0]
        package = unfixed.encoder.layer[0].attention(hidden)[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not torch.allclose(package, expected, atol=1e-3)


def test_small_attention_mask_leaves_outputs_unchanged():
    """The dense (batch, 1, L, L) mask the package builds is never read by its attention."""
    config = tiny_config(num_attention_heads=2, hidden_size=8)
    fixed = randomise(modeling.CellFoundationModel(config)).eval()
    pristine = pristine_modeling()
    pristine.flash_attn_varlen_func = entrypoint.sdpa_varlen_attention  # only the attention fix
    dense_mask = pristine.CellFoundationModel(config).eval()
    dense_mask.load_state_dict(fixed.state_dict())

    values = torch.rand(2, 30, generator=torch.Generator().manual_seed(2)) * 5
    mask = torch.ones(2, 30)
    mask[:, 5:9] = 0
    assert pristine.bert_extended_attention_mask(mask).shape == (2, 1, 30, 30)
    assert entrypoint.key_padding_mask(mask).shape == (2, 1, 1, 30)
    with torch.no_grad():
        small = fixed(input_ids=values, attention_mask=mask).last_hidden_state
        dense = dense_mask(input_ids=values, attention_mask=mask).last_hidden_state
    np.testing.assert_array_equal(small, dense)
