"""Parity of czb's AIDO.Cell entrypoint with the authors' embedding procedure.

The authors' procedure (modelgenerator 0.1.3.post0; its AIDO.Cell quickstart and the
``mgen predict --model Embed --model.backbone aido_cell_3m`` path it stands for):

1. ``modelgenerator.cell.utils.align_genes``: symbols aligned to the package's 19,264-gene
   list, duplicated symbols keep their first column, unknown ones are dropped, missing
   model genes are zero-filled; the quickstart's attention mask marks the genes present.
2. ``GenBioCellFoundation.forward`` (the ``aido_cell_*`` backbones): ``log1p`` of counts
   per 10^4, two read-depth tokens ``max(log10(total), 5)``, clip at 20, cast to bf16,
   ``CellFoundationModel`` (built by ``from_pretrained``, as the backbone's ``setup``
   does), depth tokens trimmed from the last hidden state.
3. Cell embedding: the gene-level hidden states at the present genes (the quickstart's
   ``embs[:, attention_mask.astype(bool), :]``), averaged over genes (cz-benchmarks'
   AIDO.Cell model: ``out[:, mask].mean(dim=1)``).

What runs here, and what cannot:

- Steps 1 and 2 are the package's own code: ``align_genes`` and
  ``GenBioCellFoundation.forward`` are compiled from the installed modelgenerator files
  and called. Their modules cannot be imported in this environment: ``cell/utils.py``
  imports bionty (a lamindb client) and lightning at module level, ``backbones``
  imports lightning, peft, lmdb, datasets, pyfaidx... (training and data machinery the
  image does not install), so only these two functions are taken from the files.
- ``CellFoundationModel`` is the package's own class, from a fresh copy of its module,
  not the one czb's entrypoint patches.
- The authors run attention through ``flash_attn_varlen_func`` (flash-attn: CUDA only,
  no build installs here). :func:`flash_attention_reference` stands in for it: its own
  unpacking of the (tokens, heads, dim) layout, each sequence through torch's fused
  attention kernel in float32 (written-out softmax attention takes seconds per head and
  cell at L = 19,266; a test checks the stand-in against the written-out formula),
  output in the input dtype as flash-attn returns it. czb routes the same call to its
  own ``sdpa_varlen_attention``, so the two paths share torch's attention kernel only.
- The package's ``bert_extended_attention_mask`` builds a dense (batch, 1, L, L) float32
  mask (1.5 GB per cell at L = 19,266) that its attention never reads; it is replaced
  by a (batch, 1, 1, L) one here as in czb (``test_entrypoint`` checks the outputs stay
  identical on a short sequence with the dense mask).
- Precision: the backbone casts its input to bf16 and the authors run bf16 (Lightning
  bf16 autocast). czb on CPU runs float32 by default; its ``precision: bf16`` is the
  authors' setting. Both are compared: float32 against the package's forward run with
  its bf16 cast naming float32, bf16 against the package's forward under bf16 autocast.
  (The quickstart casts the whole model to bf16 and cz-benchmarks to fp16: other
  rounding, not compared.)
- Cells without counts over the model's genes: the authors' normalisation divides 0 by
  0 and their embedding is NaN (cz-benchmarks then writes zeros); czb drops them. The
  test checks the dropped set is exactly the authors' NaN set.

Tolerances: float32, atol 1e-5 / rtol 1e-4 (float32 rounding; the paths group the
same operations differently: measured identical). bf16, atol 1e-2 / rtol 1e-2: bf16
keeps 8 significant bits (relative rounding 2^-9) and the paths round at different
points (czb averages the gene states in float32, the authors in bf16); measured 1.2e-3
on values up to 0.95.

Cells: 30 (about a second per cell and path at 19,266 tokens; about 100 s for the file
on this shared 2-core machine), the bf16 comparison on 3 of them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.resources
import importlib.util
import shutil
import sys
import types
from typing import List, Optional, Union

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from conftest import Entrypoint, read_output
from test_entrypoint import TINY_CONFIG

pytest.importorskip("modelgenerator")
pytestmark = [
    # The test dataset holds a duplicated symbol on purpose.
    pytest.mark.filterwarnings("ignore:Variable names are not unique"),
    # The package's align_genes renames the genes of an AnnData view.
    pytest.mark.filterwarnings("ignore:Trying to modify index of attribute"),
]

AIDO_CELL = Entrypoint(
    "aido_cell",
    package="modelgenerator",
    gene_id_type="symbol",
    batch_size=16,  # the spec's default
    parameters={"precision": "auto"},
)
entrypoint = AIDO_CELL.module
MODEL_GENES = entrypoint.model_gene_symbols()

# test_entrypoint's tiny model, dropout off (every cell is 19,266 tokens: about a second per cell
# and path on this CPU). One head: test_entrypoint checks czb's attention on several
# heads against written-out attention.
CONFIG = {**TINY_CONFIG, "attention_probs_dropout_prob": 0.0}
N_CELLS = 30
BF16_CELLS = [0, 3, 7]  # a typical cell, the one-gene cell, the no-gene cell
F32_TOL = {"atol": 1e-5, "rtol": 1e-4}
BF16_TOL = {"atol": 1e-2, "rtol": 1e-2}


# --------------------------------------------------------------------------- the package's code


def package_file(*parts: str):
    return importlib.resources.files("modelgenerator").joinpath(*parts)


def package_definition(path, name: str, namespace: dict, within: str | None = None):
    """Compile one top-level function or class (or a method of class ``within``) from
    an installed modelgenerator file into ``namespace``, and return it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    body = tree.body
    if within is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == within).body
    node = next(
        n
        for n in body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name
    )
    module = ast.Module(body=[node], type_ignores=[])
    namespace.setdefault("__name__", "modelgenerator_parity")
    # dont_inherit: annotations evaluated as in the package (this file's own
    # ``from __future__ import annotations`` would make them strings).
    code = compile(module, str(path), "exec", dont_inherit=True)
    exec(code, namespace)  # noqa: S102 - the package's own code
    return namespace[name]


def quiet(*_args, **_kwargs):
    """Stands in for lightning's ``rank_zero_info`` (logging only)."""


def package_align_genes():
    """``modelgenerator.cell.utils.align_genes``."""
    namespace = {"ad": ad, "np": np, "rank_zero_info": quiet}
    return package_definition(package_file("cell", "utils.py"), "align_genes", namespace)


class Float32Torch(types.ModuleType):
    """``torch`` as the backbone's forward sees it when run in float32: its cast to
    ``torch.bfloat16`` names float32 (everything else is torch)."""

    bfloat16 = torch.float32

    def __getattr__(self, name):
        return getattr(torch, name)


def package_backbone_forward(precision: str):
    """``GenBioCellFoundation.forward``, with ``SequenceBackboneOutput`` from base.py."""
    namespace = {
        "dataclasses": dataclasses,
        "torch": torch if precision == "bf16" else Float32Torch("torch"),
        "Tensor": torch.Tensor,
        "Optional": Optional,
        "Union": Union,
        "List": List,
    }
    package_definition(package_file("backbones", "base.py"), "SequenceBackboneOutput", namespace)
    return package_definition(
        package_file("backbones", "backbones.py"), "forward", namespace, within="GenBioCellFoundation"
    )


def pristine_modeling():
    """A fresh copy of modelgenerator's modelling module (czb's fixes patch the other)."""
    package = "modelgenerator.huggingface_models.cellfoundation"
    origin = importlib.util.find_spec(f"{package}.modeling_cellfoundation").origin
    name = f"{package}._parity_modeling"
    spec = importlib.util.spec_from_file_location(name, origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def flash_attention_reference(
    query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False,
):
    """What ``flash_attn_varlen_func`` computes for the package's call: each packed
    sequence attends within itself, softmax(scale q k^T) v, output in q's dtype.

    Exact attention at L = 19,266 written out (scores, softmax, product) takes seconds
    per head and cell here, so each sequence goes to torch's fused attention kernel in
    float32; :func:`test_reference_attention_is_exact_softmax_attention` checks this
    against the written-out formula.
    """
    assert dropout_p == 0.0 and not causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
    out = torch.empty_like(query)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # packed (tokens, heads, dim) -> (1, heads, tokens, dim), float32
        q, k, v = (t[start:end].float().permute(1, 0, 2)[None] for t in (query, key, value))
        attended = F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
        out[start:end] = attended[0].permute(1, 0, 2).to(query.dtype)
    return out


def unread_mask(attention_mask):
    """(batch, 1, 1, L) key mask: the package's attention never reads the mask."""
    return (attention_mask < 0.5).unsqueeze(1).unsqueeze(1)


class AuthorsBackbone:
    """What ``GenBioCellFoundation.forward`` reads of its instance: the encoder."""

    def __init__(self, encoder, forward):
        self.encoder = encoder
        self._forward = forward

    def __call__(self, **kwargs):
        return self._forward(self, **kwargs)


def authors_embeddings(weights, adata, precision: str, batch_size: int = 16):
    """The authors' procedure on ``adata``: (embeddings with NaN rows, cell IDs)."""
    modeling = pristine_modeling()
    assert not hasattr(modeling, "flash_attn_varlen_func")  # no flash-attn here
    modeling.flash_attn_varlen_func = flash_attention_reference
    modeling.bert_extended_attention_mask = unread_mask
    config = modeling.CellFoundationConfig.from_pretrained(str(weights))
    encoder = modeling.CellFoundationModel.from_pretrained(str(weights), config=config).eval()
    backbone = AuthorsBackbone(encoder, package_backbone_forward(precision))

    aligned = package_align_genes()(adata, MODEL_GENES, ensembl_field=None)
    # The quickstart's attention mask: model genes present in the dataset.
    present = np.isin(MODEL_GENES, adata.var_names.astype(str))
    counts = aligned.X.toarray() if sp.issparse(aligned.X) else np.asarray(aligned.X)
    out = []
    with torch.no_grad():
        for start in range(0, adata.n_obs, batch_size):
            batch = torch.from_numpy(counts[start : start + batch_size].astype(np.float32))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                hidden = backbone(input_ids=batch).last_hidden_state
            out.append(hidden[:, present].mean(dim=1).float().numpy())
    return np.concatenate(out), list(aligned.obs_names)


# --------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-initialised checkpoint in the published layout."""
    folder = tmp_path_factory.mktemp("aido_cell_parity_weights")
    modeling = pristine_modeling()
    model = modeling.CellFoundationForMaskedLM(modeling.CellFoundationConfig(**CONFIG))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            # Large enough that expression values visibly move the output.
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(folder, safe_serialization=False)
    return folder


@pytest.fixture(scope="module")
def dataset():
    """30 cells: 300 model genes, 10 unknown symbols and a duplicated symbol, shuffled;
    sparse heavy-tailed counts; a cell with one expressed gene and a cell with counts
    only in genes the model lacks."""
    rng = np.random.default_rng(0)
    known = list(MODEL_GENES[rng.choice(len(MODEL_GENES), size=300, replace=False)])
    symbols = np.array(known + [f"NOT_A_GENE{i}" for i in range(10)] + [known[5]])
    order = rng.permutation(len(symbols))
    symbols = symbols[order]
    means = rng.lognormal(-1.0, 1.5, size=len(symbols))
    size = rng.lognormal(0.0, 0.6, size=(N_CELLS, 1))
    counts = rng.poisson(rng.gamma(0.5, means * size / 0.5)).astype(np.float32)
    model_gene = np.isin(symbols, MODEL_GENES)
    counts[3] = 0
    counts[3, np.flatnonzero(model_gene)[0]] = 2  # one expressed gene
    counts[7] = 0
    counts[7, ~model_gene] = 4  # only genes the model lacks
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(N_CELLS)]
    adata.var_names = symbols
    assert 0.5 < (counts == 0).mean() < 0.95
    return adata


def run_czb(tmp_path, weights, adata, **request):
    """czb's entrypoint end to end: its output, and the dataset file it read."""
    dirs = AIDO_CELL.job(tmp_path, adata, **request)
    shutil.copytree(weights, dirs["weights"], dirs_exist_ok=True)
    assert AIDO_CELL.run(dirs) == 0
    return read_output(dirs["output"]), ad.read_h5ad(dirs["input"] / "dataset.h5ad")


def assert_parity(czb, authors, authors_ids, tolerance):
    values, ids, meta = czb
    nan = np.isnan(authors).any(axis=1)
    # czb drops exactly the cells the authors' procedure cannot embed (NaN), and keeps
    # the others in dataset order.
    assert ids == [cell for cell, missing in zip(authors_ids, nan) if not missing]
    assert meta["n_cells_dropped_no_counts"] == int(nan.sum())
    np.testing.assert_allclose(values, authors[~nan], **tolerance)
    gap = float(np.abs(values - authors[~nan]).max())
    print(f"largest difference {gap:.3g}, largest value {float(np.abs(values).max()):.3g}")


# --------------------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def float32_runs(tmp_path_factory, weights, dataset):
    """czb's default (float32 on CPU) and the authors' procedure in float32, same file."""
    czb, same_file = run_czb(tmp_path_factory.mktemp("float32"), weights, dataset)
    authors, authors_ids = authors_embeddings(weights, same_file, "float32")
    return {"czb": czb, "authors": authors, "authors_ids": authors_ids}


def test_float32_matches_the_authors_procedure(float32_runs, dataset):
    czb, authors = float32_runs["czb"], float32_runs["authors"]
    assert czb[2]["precision"] == "float32"  # czb's CPU default
    assert czb[2]["n_genes_matched"] == 300
    assert float32_runs["authors_ids"] == list(dataset.obs_names)
    # Only the cell without model-gene counts is NaN on the authors' path.
    assert np.isnan(authors[7]).all() and np.isfinite(np.delete(authors, 7, axis=0)).all()
    assert_parity(czb, authors, float32_runs["authors_ids"], F32_TOL)
    # The comparison can fail: cells differ, the one-gene cell included.
    spread = czb[0].max(axis=0) - czb[0].min(axis=0)
    assert spread.max() > 100 * F32_TOL["atol"]
    assert not np.allclose(czb[0][2], czb[0][0], **F32_TOL)


def test_bf16_matches_the_authors_precision(tmp_path, weights, dataset, float32_runs):
    cells = dataset[BF16_CELLS].copy()
    czb, same_file = run_czb(tmp_path, weights, cells, parameters={"precision": "bf16"})
    assert czb[2]["precision"] == "bf16"
    authors, authors_ids = authors_embeddings(weights, same_file, "bf16")
    assert_parity(czb, authors, authors_ids, BF16_TOL)
    # The setting matters: bf16 is not the float32 result.
    float32 = float32_runs["authors"][BF16_CELLS]
    keep = np.isfinite(float32).all(axis=1)
    assert not np.allclose(czb[0], float32[keep], **F32_TOL)


def test_reference_attention_is_exact_softmax_attention():
    """The flash-attn stand-in against a one-line softmax attention on a short input."""
    generator = torch.Generator().manual_seed(0)
    # Two sequences of 5 tokens, 2 heads of dimension 4, packed as the package packs them.
    query, key, value = (torch.randn(2 * 5, 2, 4, generator=generator) for _ in range(3))
    bounds = torch.tensor([0, 5, 10], dtype=torch.int32)
    got = flash_attention_reference(query, key, value, bounds, bounds, 5, 5, 0.0, 0.5)
    for start in (0, 5):
        q, k, v = (t[start : start + 5].transpose(0, 1) for t in (query, key, value))
        expected = (torch.softmax(q @ k.transpose(1, 2) * 0.5, -1) @ v).transpose(0, 1)
        torch.testing.assert_close(got[start : start + 5], expected)
