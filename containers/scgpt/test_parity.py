"""Parity of czb's scGPT entrypoint with the authors' own inference, ``scgpt.tasks.embed_data``.

Both paths run here, on the same checkpoint files (the tiny random-initialised
checkpoint of ``test_entrypoint``, in the model zoo's layout) and the same cells:

(a) czb's entrypoint end to end (``dataset.h5ad`` + ``request.json``, weights folder,
    output folder), under the contract;
(b) ``scgpt.tasks.embed_data`` from the installed ``scgpt`` 0.2.4, called as its tutorial
    calls it (model folder, gene column, ``max_length``, ``batch_size``), which reads the
    vocabulary and ``args.json``, drops genes outside the vocabulary, builds the model,
    loads ``best_model.pt`` with ``load_pretrained`` and calls
    ``get_batch_cell_embeddings`` (no normalisation of its own: ``DataCollator`` bins the
    raw counts per cell, 51 bins; ``<cls>`` first with value ``pad_value``; the ``<cls>``
    output of the last layer, L2-normalised).

What embed_data does differently, and how the test handles it:

- Random steps. Binning breaks ties at random (``np.random``) and cells with more than
  ``max_length - 1`` expressed genes are subsampled with ``torch.randperm``, both from the
  global generators. embed_data runs its ``DataLoader`` with
  ``min(CPU count, batch_size)`` worker processes, each with its own random stream, so
  its output depends on the machine. czb runs the same loop in the main process. The
  test gives embed_data no workers (``os.sched_getaffinity`` reports no CPU while it
  runs) and seeds numpy and torch exactly as the contract does before ``embed``; then
  both paths draw the same numbers for the same cells, and the embeddings agree cell
  for cell, subsampled cells included (``max_length`` 12 below).
- flash-attn is not installed: embed_data's model falls back to torch's attention (its
  own fallback) and ``load_pretrained`` renames the ``Wqkv`` tensors, as czb does.
- A cell with no expressed gene in the vocabulary makes embed_data fail (binning an
  empty row); czb leaves such cells out. The test checks embed_data fails on the whole
  dataset, then compares on the cells it can embed: they must be exactly czb's cells.

Tolerance: atol 1e-5, rtol 1e-4 on the L2-normalised embeddings (entries about 0.25).
Both paths run the same float32 operations on the same device; only the batches differ
(czb's spec default 32 cells, embed_data's default 64), which changes the padded length
and so the summation order in attention: float32 rounding, far below 1e-5 here.
"""

from __future__ import annotations

import os

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import czb_container, read_output
from test_entrypoint import ARGS, SCGPT, VOCAB_GENES, write_weights

ATOL, RTOL = 1e-5, 1e-4

# Only now: loading the entrypoint (test_entrypoint) installed the torchtext shim.
from scgpt.tasks import embed_data  # noqa: E402
from scgpt.tokenizer import GeneVocab  # noqa: E402

SEED = 7
# Gene symbols the checkpoint's vocabulary lacks.
NOVEL_GENES = [f"NOVEL{i}" for i in range(20)]
# Cells with no count in any vocabulary gene: czb leaves them out, embed_data fails on them.
NO_VOCAB_CELLS = ("cell_onlynovel", "cell_empty")


def parity_counts(seed: int = 0, gene_id_type: str = "symbol") -> ad.AnnData:
    """60 cells of sparse, heavy-tailed raw counts over 50 vocabulary and 20 novel genes.

    Columns are shuffled (so column order is not vocabulary order), cell IDs are not
    sorted, and a few cells are planted: one with a single expressed vocabulary gene,
    one with two, one with counts only in novel genes and one with no counts at all.
    """
    rng = np.random.default_rng(seed)
    genes = np.array(VOCAB_GENES[:50] + NOVEL_GENES)
    genes = genes[rng.permutation(genes.size)]
    n_cells = 60
    # Negative binomial counts: lognormal gene means and cell sizes, dispersion 2.
    mean = rng.lognormal(-1.0, 1.5, size=genes.size) * rng.lognormal(0.0, 0.5, size=(n_cells, 1))
    counts = rng.poisson(rng.gamma(0.5, mean / 0.5)).astype(np.float32)
    ids = [f"cell_{i:02d}" for i in rng.permutation(n_cells)]
    vocab_cols = np.flatnonzero(np.char.startswith(genes, "GENE"))
    novel_cols = np.flatnonzero(np.char.startswith(genes, "NOVEL"))
    planted = {
        5: ("cell_one", vocab_cols[:1]),
        17: ("cell_two", vocab_cols[3:5]),
        30: ("cell_onlynovel", novel_cols[:4]),
        44: ("cell_empty", []),
    }
    for row, (name, cols) in planted.items():
        counts[row] = 0
        counts[row, cols] = rng.integers(1, 30, size=len(cols))
        ids[row] = name
    ensembl = [f"ENSG{i:011d}" for i in range(genes.size)]
    var = pd.DataFrame({"gene_symbol": genes, "ensembl_id": ensembl})
    var.index = pd.Index(genes if gene_id_type == "symbol" else ensembl)
    return ad.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame(index=pd.Index(ids)), var=var)


def run_czb(tmp_path, adata, max_length: int):
    """czb's entrypoint on ``adata``: its embeddings, cell IDs and meta."""
    dirs = SCGPT.job(
        tmp_path,
        adata,
        seed=SEED,
        batch_size=32,
        gene_id_type="ensembl" if adata.var_names[0].startswith("ENSG") else "symbol",
        parameters={"max_length": max_length},
    )
    write_weights(dirs["weights"])
    assert SCGPT.run(dirs) == 0
    return (*read_output(dirs["output"]), dirs)


def run_embed_data(monkeypatch, adata, model_dir, gene_col, max_length, seed=SEED):
    """``scgpt.tasks.embed_data`` on ``adata``, in this process, seeded as the contract seeds."""
    with monkeypatch.context() as patch:
        # embed_data uses as many DataLoader workers as CPUs it sees; none: no workers.
        patch.setattr(os, "sched_getaffinity", lambda pid: set())
        czb_container.seed_everything(seed)
        out = embed_data(
            adata,
            model_dir,
            gene_col=gene_col,
            max_length=max_length,
            batch_size=64,
            device="cpu",
        )
    return out.obsm["X_scGPT"], list(out.obs_names)


def expressed_vocab_genes(adata, gene_col: str, model_dir) -> np.ndarray:
    """Per cell, how many expressed genes scGPT's ``GeneVocab`` finds in ``vocab.json``."""
    vocab = GeneVocab.from_file(model_dir / "vocab.json")
    symbols = adata.var_names if gene_col == "index" else adata.var[gene_col]
    in_vocab = np.array([g in vocab for g in symbols])
    return np.asarray((adata.X[:, in_vocab] > 0).sum(axis=1)).ravel()


@pytest.mark.parametrize("gene_id_type", ["symbol", "ensembl"])
def test_same_embeddings_as_embed_data(tmp_path, monkeypatch, gene_id_type):
    adata = parity_counts(gene_id_type=gene_id_type)
    x = adata.X.toarray()
    assert (x == 0).mean() > 0.6 and x.max() > 20 * np.median(x[x > 0])  # sparse, long tail
    values, ids, meta, dirs = run_czb(tmp_path, adata, max_length=1200)

    # embed_data reads the same dataset file with the same checkpoint files.
    gene_col = "index" if gene_id_type == "symbol" else "gene_symbol"
    authors = ad.read_h5ad(dirs["input"] / czb_container.DATASET_FILE)
    n_expressed = expressed_vocab_genes(authors, gene_col, dirs["weights"])
    assert n_expressed.max() < 1200  # no cell is subsampled at the default max_length
    planted = authors.obs_names.get_indexer(["cell_one", "cell_two", *NO_VOCAB_CELLS])
    assert list(n_expressed[planted]) == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="zero-size array"):
        run_embed_data(monkeypatch, authors.copy(), dirs["weights"], gene_col, 1200)

    # The cells embed_data can embed are exactly czb's, in the dataset's order.
    embeddable = authors[n_expressed > 0].copy()
    assert ids == list(embeddable.obs_names)
    assert set(authors.obs_names) - set(ids) == set(NO_VOCAB_CELLS)
    assert meta["n_cells_dropped"] == len(NO_VOCAB_CELLS)
    assert meta["n_genes_matched"] == 50 and meta["n_genes_input"] == 70
    expected, expected_ids = run_embed_data(
        monkeypatch, embeddable, dirs["weights"], gene_col, 1200
    )
    assert expected_ids == ids
    assert values.shape == expected.shape == (58, ARGS["embsize"])
    np.testing.assert_allclose(values, expected, atol=ATOL, rtol=RTOL)

    # The agreement rests on the random tie-breaking of binning being the same draws:
    # another seed gives embed_data other bins and embeddings well outside the tolerance.
    other, _ = run_embed_data(monkeypatch, embeddable, dirs["weights"], gene_col, 1200, seed=8)
    assert np.abs(other - values).max() > 100 * ATOL


def test_subsampled_cells_as_embed_data(tmp_path, monkeypatch):
    # max_length 12: <cls> and 11 genes; most cells express more and are subsampled.
    adata = parity_counts(seed=1)
    values, ids, _, dirs = run_czb(tmp_path, adata, max_length=12)
    authors = ad.read_h5ad(dirs["input"] / czb_container.DATASET_FILE)
    n_expressed = expressed_vocab_genes(authors, "index", dirs["weights"])
    embeddable = authors[n_expressed > 0].copy()
    long = n_expressed[n_expressed > 0] > 11
    assert 10 < long.sum() < long.size  # subsampled and padded cells, mixed in batches
    expected, expected_ids = run_embed_data(monkeypatch, embeddable, dirs["weights"], "index", 12)
    assert expected_ids == ids
    np.testing.assert_allclose(values, expected, atol=ATOL, rtol=RTOL)

    # The subsampling is random: the full cells give other embeddings for the long cells.
    full, _ = run_embed_data(monkeypatch, embeddable, dirs["weights"], "index", 1200)
    assert np.abs(full[long] - values[long]).max() > 100 * ATOL
