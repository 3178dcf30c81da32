"""Parity of czb's Geneformer entrypoint with helical's own Geneformer inference.

The authors' path, as the helical package (2.2.0, the one the image installs) documents
it::

    geneformer = Geneformer(GeneformerConfig(model_name=..., emb_layer=..., emb_mode=...))
    dataset = geneformer.process_data(adata, gene_names="ensembl_id")
    embeddings = geneformer.get_embeddings(dataset)

Every step is the installed helical itself, run here on the same ``dataset.h5ad`` the
entrypoint reads and the same checkpoint and dictionary files (the tiny random BERT of
``test_entrypoint``). Two things are set from outside, because helical would otherwise
fetch the real 95M files over the network:

- helical's ``Downloader`` is replaced by a recorder that fetches nothing, and
  ``GeneformerConfig`` looks for its files under a temporary cache folder laid out as
  helical's (``geneformer/v2/token_dictionary.pkl``, ``geneformer/v2/<model>/...``), which
  holds copies of the job's weight files;
- helical takes the model's input size from a table of model names (4,096 for
  ``gf-12L-38M-i4096``, 2,048 for ``gf-6L-10M-i2048``), czb from the checkpoint's
  ``max_position_embeddings``; the tiny checkpoint has 24 positions, so
  ``config["input_size"]`` is set to that. (helical's own ``get_embs`` pads to the
  checkpoint's position count too.)

Tolerance: atol 1e-5, rtol 1e-4. Both paths feed the same token sequences to the same
float32 model (sdpa attention on CPU); they differ only in how cells are batched (czb:
the request's ``batch_size``, 16, over the cells it keeps; helical: its default of 24 over
every cell), which changes padding lengths; with the attention mask that could change
summation order, i.e. float32 rounding, no more (measured on CPU: identical, difference 0).

Deliberate differences, each checked here:

- Layer and pooling. czb's defaults (the spec's) are cz-benchmarks': the penultimate
  layer (``emb_layer: -1`` in Geneformer's convention) and the ``<cls>`` state for V2
  models (``emb_mode: auto``). helical's defaults are the last layer (its ``emb_layer=-1``
  indexes ``hidden_states[-1]``) and the mean over gene tokens (``emb_mode="cell"``):
  czb's ``emb_layer: 0, emb_mode: cell`` gives exactly that.
- Cells without any gene of the token dictionary. czb leaves them out (and counts them);
  helical keeps them: with no gene token, its ``cell`` mean is 0/0 (NaN), its ``cls`` state
  is that of ``<cls><eos>`` alone, the same vector for every such cell. A cell with no
  counts at all is one of them (scipy scales its empty row by 1/0 without a NaN).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from conftest import CONTAINERS, read_output
from helical.models.geneformer import Geneformer, GeneformerConfig
from helical.models.geneformer import geneformer_config as helical_config
from helical.models.geneformer import model as helical_model
from test_entrypoint import GENEFORMER, INPUT_SIZE, N_LAYERS, VOCAB_IDS, write_weights

ATOL, RTOL = 1e-5, 1e-4
SPEC = CONTAINERS.parent / "configs" / "models" / "geneformer.yaml"
# helical's names of czb's two variants (gf-12L-95M-i4096 and gf-6L-30M-i2048).
HELICAL_NAMES = {True: "gf-12L-38M-i4096", False: "gf-6L-10M-i2048"}
# Genes the token dictionary lacks. One is a retired ID that ensembl_mapping_dict maps onto
# the dictionary gene the dataset lacks, RETIRED_TO: helical 2.2.0 looks genes up by their
# own ID, so both paths leave it out.
RETIRED_ID, RETIRED_TO = "ENSG99999999999", VOCAB_IDS[-1]
FOREIGN_IDS = [f"ENSG{90_000 + i:011d}" for i in range(29)] + [RETIRED_ID]
N_CELLS = 60
NO_VOCAB_CELLS = (5, 31)  # counts only in foreign genes
NO_COUNT_CELL, ONE_GENE_CELL, THREE_GENE_CELL = 23, 11, 40


def spec_defaults() -> dict:
    """The model spec's parameter defaults, which the host sends with every job
    (``batch_size`` as the request's field, the others as its parameters)."""
    spec = yaml.safe_load(SPEC.read_text())["models"]["geneformer"]
    return {name: p["default"] for name, p in spec["parameters"].items()}


def parity_counts(seed: int = 21) -> ad.AnnData:
    """Seeded raw counts: sparse negative-binomial counts over 49 of the 50 dictionary
    genes and 30 foreign genes interleaved, cells in shuffled-barcode order, special cells.

    Cells ``NO_VOCAB_CELLS`` have counts only in foreign genes, ``NO_COUNT_CELL`` none at all,
    ``ONE_GENE_CELL`` and ``THREE_GENE_CELL`` that many dictionary genes (short, padded
    sequences); large cells hold more dictionary genes than the 22 a V2 input has room for.
    """
    rng = np.random.default_rng(seed)
    gene_ids = np.array([g for g in VOCAB_IDS if g != RETIRED_TO] + FOREIGN_IDS)
    order = rng.permutation(gene_ids.size)
    gene_ids = gene_ids[order]
    vocab = np.isin(gene_ids, VOCAB_IDS)
    gene_means = rng.lognormal(-0.5, 1.5, size=gene_ids.size)
    size = rng.lognormal(0.0, 0.8, size=(N_CELLS, 1))
    counts = rng.poisson(rng.gamma(shape=0.5, scale=gene_means * size / 0.5))
    counts = counts.astype(np.float32)
    for cell in NO_VOCAB_CELLS:
        counts[cell, vocab] = 0
        counts[cell, ~vocab] += rng.integers(0, 3, size=(~vocab).sum())
    counts[NO_COUNT_CELL] = 0
    for cell, n_genes in ((ONE_GENE_CELL, 1), (THREE_GENE_CELL, 3)):
        counts[cell, vocab] = 0
        keep = rng.choice(np.flatnonzero(vocab), size=n_genes, replace=False)
        counts[cell, keep] = rng.integers(1, 20, size=n_genes)
    barcodes = [f"{''.join(rng.choice(list('ACGT'), 12))}-1" for _ in range(N_CELLS)]
    var = pd.DataFrame({"ensembl_id": gene_ids}, index=pd.Index(gene_ids))
    obs = pd.DataFrame(index=pd.Index(barcodes))
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


class OfflineDownloader:
    """Stands in for helical's Downloader: records the names it is asked for, fetches nothing."""

    requested: list[str] = []

    def download_via_name(self, name: str) -> None:
        OfflineDownloader.requested.append(name)


def run_helical(
    monkeypatch, cache: Path, weights: Path, h5ad: Path, special_tokens: bool, **config
):
    """helical's Geneformer on the job's files: ``process_data`` then ``get_embeddings``.

    Returns
    -------
    The embeddings (one row per input cell, input order) and the tokenized dataset.
    """
    name = HELICAL_NAMES[special_tokens]
    version = "v2" if special_tokens else "v1"
    folder = cache / "geneformer" / version
    (folder / name).mkdir(parents=True)
    for file in ("token_dictionary.pkl", "gene_median_dictionary.pkl", "ensembl_mapping_dict.pkl"):
        shutil.copy(weights / file, folder / file)
    for file in (weights / "model").iterdir():
        shutil.copy(file, folder / name / file.name)
    monkeypatch.setattr(helical_config, "CACHE_DIR_HELICAL", cache)
    monkeypatch.setattr(helical_model, "Downloader", OfflineDownloader)
    OfflineDownloader.requested = []

    configurer = GeneformerConfig(model_name=name, **config)
    assert configurer.config["special_token"] is special_tokens
    configurer.config["input_size"] = INPUT_SIZE  # the tiny checkpoint's position count
    geneformer = Geneformer(configurer)
    # Every file helical would have fetched was asked of the stand-in, none fetched.
    assert OfflineDownloader.requested == configurer.list_of_files_to_download
    dataset = geneformer.process_data(ad.read_h5ad(h5ad), gene_names="ensembl_id")
    return np.asarray(geneformer.get_embeddings(dataset), dtype=np.float64), dataset


def run_czb(tmp_path: Path, adata: ad.AnnData, special_tokens: bool, **czb_parameters):
    """czb's entrypoint on ``adata`` with the spec's defaults overridden by ``czb_parameters``.

    Returns
    -------
    The embeddings, cell IDs and meta the entrypoint wrote, and the job's folders.
    """
    parameters = {**spec_defaults(), **czb_parameters}
    batch_size = parameters.pop("batch_size")
    dirs = GENEFORMER.job(tmp_path, adata, batch_size=batch_size, parameters=parameters)
    write_weights(dirs["weights"], special_tokens)
    mapping_file = dirs["weights"] / "ensembl_mapping_dict.pkl"
    mapping = pickle.loads(mapping_file.read_bytes())
    mapping_file.write_bytes(pickle.dumps({**mapping, RETIRED_ID: RETIRED_TO}))
    assert GENEFORMER.run(dirs) == 0
    return (*read_output(dirs["output"]), dirs)


# (special tokens, czb's parameters over the spec's defaults, helical's GeneformerConfig)
CASES = {
    "v2-czb-defaults": (True, {}, {"emb_layer": N_LAYERS - 1, "emb_mode": "cls"}),
    "v2-helical-defaults": (True, {"emb_layer": 0, "emb_mode": "cell"}, {}),
    "v2-cls-last-layer": (True, {"emb_layer": 0, "emb_mode": "cls"}, {"emb_mode": "cls"}),
    "v2-mean-penultimate": (True, {"emb_mode": "cell"}, {"emb_layer": N_LAYERS - 1}),
    "v1-czb-defaults": (False, {}, {"emb_layer": N_LAYERS - 1}),
    "v1-helical-defaults": (False, {"emb_layer": 0}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_embeddings_as_helical(tmp_path, monkeypatch, case):
    special_tokens, czb_parameters, helical_parameters = CASES[case]
    adata = parity_counts()
    values, ids, meta, dirs = run_czb(tmp_path / "job", adata, special_tokens, **czb_parameters)

    expected, dataset = run_helical(
        monkeypatch,
        tmp_path / "helical",
        dirs["weights"],
        dirs["input"] / "dataset.h5ad",
        special_tokens,
        **helical_parameters,
    )
    assert expected.shape == (N_CELLS, 16)
    n_special = 2 if special_tokens else 0
    n_gene_tokens = np.asarray(dataset["length"]) - n_special

    # The sequences exercise truncation, short padded cells and empty ones.
    assert n_gene_tokens.max() == INPUT_SIZE - n_special
    assert n_gene_tokens[ONE_GENE_CELL] == 1 and n_gene_tokens[THREE_GENE_CELL] == 3
    assert (n_gene_tokens[[*NO_VOCAB_CELLS, NO_COUNT_CELL]] == 0).all()
    retired_counts = adata[:, RETIRED_ID].X.toarray().ravel()
    assert retired_counts.sum() > 0  # counted, yet never its mapped gene's token:
    retired_token = VOCAB_IDS.index(RETIRED_TO) + 2 + n_special
    assert all(retired_token not in cell for cell in dataset["input_ids"])

    # Dropped cells: czb leaves out exactly the cells without a counted dictionary gene,
    # and keeps the others in input order.
    barcodes = list(adata.obs_names)
    dropped = [barcodes[c] for c in (*NO_VOCAB_CELLS, NO_COUNT_CELL)]
    assert ids == [b for b in barcodes if b not in dropped]
    assert meta["n_cells_dropped"] == 3
    kept = [barcodes.index(b) for b in ids]
    np.testing.assert_allclose(values, expected[kept], rtol=RTOL, atol=ATOL)

    # What helical makes of the three cells czb drops.
    mode = helical_parameters.get("emb_mode", "cell")
    empty = expected[[*NO_VOCAB_CELLS, NO_COUNT_CELL]]
    if mode == "cell":
        assert np.isnan(empty).all()
    else:  # the <cls> state of "<cls><eos>": one vector for every such cell
        assert np.isfinite(empty).all()
        np.testing.assert_array_equal(empty, np.broadcast_to(empty[0], empty.shape))


def test_czb_defaults_are_not_helical_defaults(tmp_path, monkeypatch):
    # The cases above take czb's defaults from the spec (cz-benchmarks' choice); helical's
    # defaults need both overrides, and give other embeddings.
    assert spec_defaults() == {"batch_size": 16, "emb_layer": -1, "emb_mode": "auto"}
    adata = parity_counts()
    values, ids, _, dirs = run_czb(tmp_path / "job", adata, special_tokens=True)
    expected, _ = run_helical(
        monkeypatch, tmp_path / "helical", dirs["weights"], dirs["input"] / "dataset.h5ad", True
    )
    kept = [list(adata.obs_names).index(b) for b in ids]
    assert np.abs(values - expected[kept]).max() > 0.1
