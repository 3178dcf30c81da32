"""Tests of the UCE entrypoint with a tiny random UCE model in the published file layout.

The checkpoint is a state dict of ``uce.model.TransformerModel`` (token dim 4, model dim 20,
4 layers) with the published token-table size; protein embeddings, species offsets and
chromosome positions are written in the published formats, so UCE's own loading,
filtering and sampling code runs. The entrypoint reads the model sizes from the
checkpoint's tensors, except the number of attention heads (20, as published), which
the tiny model keeps so that the same weights load in the image.
"""

from __future__ import annotations

import pickle
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

#: Sizes of the tiny model; nhead is the published one (not readable from a checkpoint).
TINY = {"token_dim": 4, "d_model": 20, "nhead": 20, "d_hid": 16, "output_dim": 8, "dropout": 0.05}
N_GENES = 60
#: Genes of the dataset with a protein embedding; GENE30..GENE59 have none.
EMBEDDED = [f"GENE{i}" for i in range(30)]
HUMAN_FILE = "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt"
MOUSE_FILE = "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt"
PARAMETERS = {"sample_size": 64}

UCE = Entrypoint(
    "uce",
    package="uce-model",
    dataset=lambda: tiny_counts(n_genes=N_GENES),
    seed=0,
    batch_size=16,
    organism="human",
    gene_id_type="symbol",
    parameters=PARAMETERS,
)
entrypoint = UCE.module


def write_weights(folder: Path, *, nested_protein_embeddings: bool = False) -> Path:
    """Write a tiny UCE model and its gene files as the published ones are laid out."""
    from torch import nn
    from uce.model import TransformerModel

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    model = TransformerModel(
        token_dim=TINY["token_dim"],
        d_model=TINY["d_model"],
        nhead=TINY["nhead"],
        d_hid=TINY["d_hid"],
        nlayers=4,
        output_dim=TINY["output_dim"],
        dropout=TINY["dropout"],
    )
    token_table = torch.randn(entrypoint.N_TOKENS, TINY["token_dim"])
    model.pe_embedding = nn.Embedding.from_pretrained(token_table)
    torch.save(model.state_dict(), folder / "4layer_model.torch")
    torch.save(token_table, folder / "all_tokens.torch")

    # Protein embedding files: gene symbol -> vector, in an order unlike the dataset's,
    # with genes the dataset lacks; the mouse file uses mouse-style symbols.
    rng = np.random.default_rng(1)
    human_genes = [*EMBEDDED[::-1], "EXTRA1", "EXTRA2"]
    mouse_genes = [g.capitalize() for g in human_genes]
    pe_dir = folder / "protein_embeddings"
    if nested_protein_embeddings:
        pe_dir = pe_dir / "protein_embeddings"
    pe_dir.mkdir(parents=True)
    for file_name, genes in ((HUMAN_FILE, human_genes), (MOUSE_FILE, mouse_genes)):
        table = {
            g: torch.tensor(rng.normal(size=TINY["token_dim"]), dtype=torch.float32) for g in genes
        }
        torch.save(table, pe_dir / file_name)
    with (folder / "species_offsets.pkl").open("wb") as f:
        pickle.dump({"human": 4, "mouse": 4 + len(human_genes)}, f)
    rows = [
        f"{species},{['1', '2', 'X'][i % 3]},{gene.upper()},{1000 * (i * 7 % 13)}"
        for species, genes in (("human", human_genes), ("mouse", mouse_genes))
        for i, gene in enumerate(genes)
    ]
    (folder / "species_chrom.csv").write_text(
        "species,chromosome,gene_symbol,start\n" + "\n".join(rows) + "\n"
    )
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("uce") / "weights")


def test_embeds_every_cell(tmp_path, weights):
    dirs = UCE.job(tmp_path)
    assert UCE.run(dirs, weights) == 0
    values, ids, meta = read_output(dirs["output"])
    assert values.shape == (40, TINY["output_dim"])
    assert np.isfinite(values).all()
    # UCE's cell embedding is L2-normalised.
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, rtol=1e-5)
    assert ids == [f"cell{i}" for i in range(40)]
    checkpoint = torch.load(weights / "4layer_model.torch", weights_only=True)
    assert meta["n_weight_tensors_loaded"] == len(checkpoint)
    assert meta["weights_checksum"] == czb_container.weights_checksum(weights)
    assert meta["package"] == "uce-model"
    assert meta["n_cells_dropped"] == 0
    assert meta["n_genes_used"] == len(EMBEDDED)
    assert (meta["variant"], meta["nlayers"], meta["species"]) == ("4layer", 4, "human")
    assert meta["architecture"] == TINY  # read from the checkpoint, nhead as published


def test_same_seed_same_embeddings(tmp_path, weights):
    first = UCE.job(tmp_path / "a")
    second = UCE.job(tmp_path / "b")
    other_seed = UCE.job(tmp_path / "c", seed=1)
    assert UCE.run(first, weights) == UCE.run(second, weights) == UCE.run(other_seed, weights) == 0
    a, b, c = (embeddings(d) for d in (first, second, other_seed))
    np.testing.assert_array_equal(a, b)
    # Gene sampling is random: another seed samples other genes.
    assert not np.allclose(a, c)


def test_partial_checkpoint_fails(tmp_path, weights):
    partial = tmp_path / "partial"
    shutil.copytree(weights, partial)
    state = torch.load(partial / "4layer_model.torch", weights_only=True)
    del state["transformer_encoder.layers.3.linear2.weight"]
    torch.save(state, partial / "4layer_model.torch")
    dirs = UCE.job(tmp_path)
    code = UCE.run(dirs, partial)
    assert_failed(code, dirs, "PartialLoadError", "transformer_encoder.layers.3.linear2.weight")


def test_unsupported_organism_is_not_applicable(tmp_path, weights):
    dirs = UCE.job(tmp_path, organism="fruit_fly")
    assert_not_applicable(UCE.run(dirs, weights), dirs)


def test_drops_cells_with_few_genes(tmp_path, weights):
    adata = tiny_counts(n_genes=N_GENES)
    counts = adata.X.toarray()
    for cell in (3, 7, 20):  # 10 expressed genes, fewer than UCE's 25
        counts[cell, 10:] = 0
        counts[cell, :10] = 2
    counts[11, :30] = 0  # 30 expressed genes, none with a protein embedding
    counts[11, 30:] = 1
    import scipy.sparse as sp

    adata.X = sp.csr_matrix(counts)
    dirs = UCE.job(tmp_path, adata)
    assert UCE.run(dirs, weights) == 0
    values, ids, meta = read_output(dirs["output"])
    kept = [f"cell{i}" for i in range(40) if i not in (3, 7, 11, 20)]
    assert ids == kept
    assert values.shape == (len(kept), TINY["output_dim"])
    assert meta["n_cells_out"] == len(kept)
    assert meta["n_cells_in"] == 40
    assert meta["n_cells_dropped"] == 4
    assert meta["n_cells_dropped_min_genes"] == 3
    assert meta["n_cells_dropped_no_embedded_genes"] == 1


def test_reads_weights_only_and_writes_nothing_in_working_dir(tmp_path, weights, monkeypatch):
    # UCE looks for model_files/... in the working directory: run from an empty one.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cwd.chmod(0o555)
    monkeypatch.chdir(cwd)
    before = snapshot(weights)
    dirs = UCE.job(tmp_path)
    assert UCE.run(dirs, weights) == 0
    assert list(cwd.iterdir()) == []
    assert snapshot(weights) == before


def test_protein_embeddings_left_in_archive_folder(tmp_path, weights):
    # The published archive unpacks to protein_embeddings/protein_embeddings/*.pt.
    nested = write_weights(tmp_path / "nested", nested_protein_embeddings=True)
    flat_run, nested_run = UCE.job(tmp_path / "flat"), UCE.job(tmp_path / "nested_run")
    assert UCE.run(flat_run, weights) == 0
    assert UCE.run(nested_run, nested) == 0
    np.testing.assert_array_equal(embeddings(flat_run), embeddings(nested_run))


def test_mouse_symbols(tmp_path, weights):
    adata = tiny_counts(n_genes=N_GENES, symbols=[f"Gene{i}" for i in range(N_GENES)])
    dirs = UCE.job(tmp_path, adata, organism="mouse")
    assert UCE.run(dirs, weights) == 0
    values, _ids, meta = read_output(dirs["output"])
    assert values.shape == (40, TINY["output_dim"])
    assert (meta["species"], meta["n_genes_used"]) == ("mouse", len(EMBEDDED))


def test_ensembl_ids_fail_clearly(tmp_path, weights):
    dirs = UCE.job(tmp_path, tiny_counts(n_genes=N_GENES, gene_id_type="ensembl"))
    assert_failed(UCE.run(dirs, weights), dirs, "protein embedding")


def test_chromosome_codes_as_array_sample_as_the_package():
    # The entrypoint hands UCE's sampler the chromosome codes as an array, where UCE's
    # own pipeline hands it a pandas Series indexed by gene: same sentences.
    from argparse import Namespace

    import pandas as pd
    from uce.eval_data import sample_cell_sentences

    rng = np.random.default_rng(0)
    n = 50
    chroms = pd.Series(rng.integers(0, 5, n).astype(np.int16), index=[f"G{i}" for i in range(n)])
    starts = rng.integers(0, 10_000, n)
    token_idxs = torch.arange(100, 100 + n)
    counts = torch.from_numpy(rng.poisson(2.0, (1, n)).astype(np.int64))
    weights = torch.log1p(counts) / torch.log1p(counts).sum()
    args = Namespace(**{**entrypoint.SENTENCE_DEFAULTS, "sample_size": 128})
    sentences = []
    for codes in (chroms, chroms.to_numpy()):
        np.random.seed(3)
        sentences.append(
            sample_cell_sentences(
                counts, weights, "d", args, {"d": token_idxs}, {"d": codes}, {"d": starts}
            )[0]
        )
    assert torch.equal(sentences[0], sentences[1])
