"""Parity of czb's UCE entrypoint with UCE's own inference, ``uce-eval-single-anndata``.

The authors' path is the console script of the installed package (uce-model 0.1.4),
``uce.eval_single_anndata.main``, run in-process on the same checkpoint files and cells:
``AnndataProcessor.preprocess_anndata`` (gene and cell filters, genes without a protein
embedding left out, int64 counts written to disk), ``generate_idxs`` (token rows,
chromosome codes and start positions written to disk) and ``run_eval`` (the real
``Accelerator``, ``MultiDatasetSentences`` sampling the cell sentences, the collator's
padding, ``TransformerModel.forward``'s CLS embedding), read back from the
``*_uce_adata.h5ad`` it writes (``obsm['X_uce']``).

Three things differ from a plain command-line run, none of them in the computation:

* ``run_eval`` hard-codes the published sizes (model width 1280 and an empty token table
  of 145,469 x 5,120 before the checkpoint is loaded into it); with the tiny test model
  those two numbers are replaced by the tiny model's (:func:`tiny_sizes`). Every other
  size and path is given on the script's command line.
* UCE never seeds numpy's global generator, which draws the genes of every cell and the
  chromosome order; it is seeded here with the request's seed right before the run
  (czb seeds it right before sampling), so both draw the same genes.
* UCE reads the protein embeddings from ``./model_files/protein_embeddings`` whatever
  ``--protein_embeddings_dir`` says: the run's working folder holds ``model_files``, a
  link to the weights folder.

Both paths run the same torch operations on the same inputs in one process, so the
embeddings agree bit for bit (measured: 0); the tolerance (atol 1e-6 on unit-norm
vectors) only allows for float32 rounding of a different summation order, had one crept
in. Found with it: czb numbered the token rows from a list of upper-cased symbols kept
twice when two differ only by case (UCE keeps one); the tiny human file has such a pair.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_output
from test_entrypoint import TINY, UCE, entrypoint

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")  # uce.eval_single_anndata imports it (test-only package)

SPEC = Path(__file__).resolve().parents[2] / "configs" / "models" / "uce.yaml"
ATOL = 1e-6
CHROMOSOMES = [*map(str, range(1, 23)), "X", "Y", "MT"]
N_EMBEDDED, N_UNKNOWN, N_CELLS = 200, 100, 30
#: Genes of the dataset with a human protein embedding, and genes without one.
EMBEDDED = [f"C{i}orf{i}" if i % 40 == 7 else f"GENE{i}" for i in range(N_EMBEDDED)]
UNKNOWN = [f"LINC{i:05d}" for i in range(N_UNKNOWN)]
#: Special cells (row in the dataset): too few genes (dropped by UCE's filter), genes of
#: one chromosome only (the shortest sentence), one embedded gene only (1,024 draws of
#: one gene), counts only on genes without a protein embedding (see the last test).
FEW_GENES, ONE_CHROMOSOME, ONE_GENE, NO_EMBEDDED_GENE = 5, 17, 26, 12
#: The genes on chromosome 7, the one chromosome of cell ONE_CHROMOSOME.
ONE_CHROMOSOME_GENES = {g.upper() for g in EMBEDDED[::25]}
OTHER_CHROMOSOMES = [c for c in CHROMOSOMES if c != "7"]


def spec_defaults() -> dict:
    import yaml

    parameters = yaml.safe_load(SPEC.read_text())["models"]["uce"]["parameters"]
    return {name: p["default"] for name, p in parameters.items()}


def write_weights(folder: Path) -> Path:
    """A tiny UCE model (4 and 33 layers) and the gene files of all UCE species.

    UCE's ``generate_idxs`` loads the protein embeddings of every species, so all eight
    files are written. The human file lists its genes in another order than the dataset,
    with genes the dataset lacks, and with two keys equal but for case before the
    dataset's genes: UCE numbers the upper-cased keys once each.
    """
    from torch import nn
    from uce.data_proc.gene_embeddings import MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH
    from uce.model import TransformerModel

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    for name, nlayers in (("4layer_model.torch", 4), ("33l_8ep_1024t_1280.torch", 33)):
        model = TransformerModel(
            token_dim=TINY["token_dim"],
            d_model=TINY["d_model"],
            nhead=TINY["nhead"],
            d_hid=TINY["d_hid"],
            nlayers=nlayers,
            output_dim=TINY["output_dim"],
            dropout=TINY["dropout"],
        )
        model.pe_embedding = nn.Embedding.from_pretrained(
            torch.randn(entrypoint.N_TOKENS, TINY["token_dim"])
        )
        torch.save(model.state_dict(), folder / name)
    # A token file unlike the checkpoint's table: with the trained number of rows both
    # paths must keep the checkpoint's.
    torch.save(torch.randn(entrypoint.N_TOKENS, TINY["token_dim"]), folder / "all_tokens.torch")

    rng = np.random.default_rng(1)
    human = ["MIR100HG", "Mir100hg", *map(str, rng.permutation(EMBEDDED)), "EXTRA1", "EXTRA2"]
    pe_dir = folder / "protein_embeddings"
    pe_dir.mkdir()
    offsets, offset, rows = {}, 4, []  # token rows 0-3: pad, chromosome brackets, CLS
    for species, path in MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH["ESM2"].items():
        genes = human if species == "human" else [f"{species.upper()}GENE{i}" for i in range(5)]
        table = {g: torch.randn(TINY["token_dim"]) for g in genes}
        torch.save(table, pe_dir / Path(path).name)
        offsets[species] = offset
        upper = list(dict.fromkeys(g.upper() for g in genes))
        offset += len(upper)
        for gene in upper:
            chrom = "7" if gene in ONE_CHROMOSOME_GENES else rng.choice(OTHER_CHROMOSOMES)
            rows.append(f"{species},{chrom},{gene},{rng.integers(0, 10**8)}")
    with (folder / "species_offsets.pkl").open("wb") as f:
        pickle.dump(offsets, f)
    (folder / "species_chrom.csv").write_text(
        "species,chromosome,gene_symbol,start\n" + "\n".join(rows) + "\n"
    )
    return folder


def parity_counts(*, with_no_embedded_gene_cell: bool = False):
    """30 cells of sparse, heavy-tailed counts (three in four zero) over 300 genes, a third
    without a protein embedding, and the special cells."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    symbols = np.array([*EMBEDDED, *UNKNOWN])
    order = rng.permutation(len(symbols))
    symbols = symbols[order]
    embedded = np.isin(symbols, EMBEDDED)
    # Negative binomial counts: gene means heavy-tailed, library sizes log-normal.
    gene_mean = rng.lognormal(-2.0, 1.8, len(symbols))
    chrom7 = [j for j, s in enumerate(symbols) if s.upper() in ONE_CHROMOSOME_GENES]
    gene_mean[chrom7] += 2.0  # expressed in 10+ cells, so that UCE keeps them
    mean = gene_mean * rng.lognormal(0.0, 0.6, (N_CELLS, 1))
    counts = rng.negative_binomial(2, 2 / (2 + mean)).astype(np.float32)
    common = np.argsort(-(counts > 0).sum(axis=0), kind="stable")
    common_unknown = [j for j in common if not embedded[j]][:30]
    common_embedded = [j for j in common if embedded[j]]

    def only(cell: int, genes: list[int]) -> None:
        counts[cell] = 0
        counts[cell, genes] = rng.integers(1, 20, len(genes))

    only(FEW_GENES, common_embedded[:10])
    only(ONE_CHROMOSOME, chrom7 + common_unknown)
    only(ONE_GENE, common_embedded[:1] + common_unknown)
    if with_no_embedded_gene_cell:
        only(NO_EMBEDDED_GENE, common_unknown)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(rng.choice(["T", "B", "NK"], N_CELLS))},
        index=[f"{''.join(rng.choice(list('ACGT'), 12))}-1" for _ in range(N_CELLS)],
    )
    var = pd.DataFrame({"gene_symbol": symbols}, index=pd.Index(symbols))
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_weights(tmp_path_factory.mktemp("uce_parity") / "weights")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Both paths run in this process: one torch thread keeps the test quick on a busy
    # machine, and changes nothing that is compared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sizes(monkeypatch) -> None:
    """Build ``run_eval``'s model at the tiny checkpoint's width instead of the published one."""
    import uce.evaluate
    from uce.model import TransformerModel

    def tiny_model(**sizes):
        assert (sizes["d_model"], sizes["nhead"]) == (1280, TINY["nhead"])  # as published
        return TransformerModel(**{**sizes, "d_model": TINY["d_model"]})

    class TorchWithTinyTable:
        """``torch``, but the empty token table is made at the tiny token width."""

        def __getattr__(self, name):
            return getattr(torch, name)

        def zeros(self, *size, **kwargs):
            if size == (entrypoint.N_TOKENS, 5120):
                size = (entrypoint.N_TOKENS, TINY["token_dim"])
            return torch.zeros(*size, **kwargs)

    monkeypatch.setattr(uce.evaluate, "TransformerModel", tiny_model)
    monkeypatch.setattr(uce.evaluate, "torch", TorchWithTinyTable())


def run_uce(
    tmp_path: Path,
    adata,
    weights: Path,
    monkeypatch,
    *,
    seed: int,
    batch_size: int,
    sample_size: int,
    variant: str = "4layer",
):
    """Embed ``adata`` with ``uce-eval-single-anndata``; return the AnnData it writes."""
    import anndata as ad
    import uce.eval_single_anndata
    from uce.data_proc import gene_embeddings

    work = tmp_path / "uce_run"
    (work / "data").mkdir(parents=True)
    (work / "out").mkdir()
    (work / "model_files").symlink_to(weights, target_is_directory=True)
    adata.write_h5ad(work / "data" / "dataset.h5ad")
    settings = entrypoint.VARIANTS[variant]
    argv = [
        "uce-eval-single-anndata",
        "--adata_path", str(work / "data" / "dataset.h5ad"),
        "--dir", f"{work / 'out'}/",
        "--species", "human",
        "--model_loc", str(weights / settings["checkpoint"]),
        "--nlayers", str(settings["nlayers"]),
        "--batch_size", str(batch_size),
        "--sample_size", str(sample_size),
        "--token_dim", str(TINY["token_dim"]),
        "--d_hid", str(TINY["d_hid"]),
        "--output_dim", str(TINY["output_dim"]),
        "--spec_chrom_csv_path", str(weights / "species_chrom.csv"),
        "--token_file", str(weights / "all_tokens.torch"),
        "--protein_embeddings_dir", f"{weights / 'protein_embeddings'}/",
        "--offset_pkl_path", str(weights / "species_offsets.pkl"),
    ]  # fmt: skip
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", argv)
        m.chdir(work)
        tiny_sizes(m)
        # The package's own relative paths (czb's entrypoint makes them absolute).
        paths = gene_embeddings.MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH
        m.setitem(
            paths,
            "ESM2",
            {s: gene_embeddings.EMBEDDING_DIR / Path(p).name for s, p in paths["ESM2"].items()},
        )
        np.random.seed(seed % 2**32)
        uce.eval_single_anndata.main()
    return ad.read_h5ad(work / "out" / "dataset_uce_adata.h5ad")


def run_czb(tmp_path: Path, adata, weights: Path, **request):
    """Embed ``adata`` with czb's entrypoint; return its embeddings, cell IDs and meta."""
    # UCE's run_eval takes the GPU when there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dirs = UCE.job(tmp_path / "czb", adata, organism="human", device=device, **request)
    assert UCE.run(dirs, weights) == 0
    return read_output(dirs["output"])


def assert_same_embeddings(czb, authors) -> None:
    values, ids, meta = czb
    assert ids == list(authors.obs_names)  # the same cells kept, in the same order
    assert meta["n_cells_out"] == authors.n_obs
    np.testing.assert_allclose(values, authors.obsm["X_uce"], rtol=0, atol=ATOL)


def test_spec_defaults_are_uce_defaults():
    from uce.eval_single_anndata import parser

    defaults = parser.parse_args([])
    spec = spec_defaults()
    assert spec["batch_size"] == defaults.batch_size
    assert spec["sample_size"] == defaults.sample_size
    for name, value in entrypoint.SENTENCE_DEFAULTS.items():
        assert getattr(defaults, name) == value, name


def test_same_embeddings_as_uce_with_spec_defaults(tmp_path, weights, monkeypatch):
    # The spec's defaults are UCE's (25 cells a batch, 1,024 genes a cell).
    defaults = spec_defaults()
    adata = parity_counts()
    authors = run_uce(tmp_path, adata, weights, monkeypatch, seed=0, **defaults)
    czb = run_czb(tmp_path, adata, weights, seed=0, batch_size=defaults["batch_size"],
                  parameters={"sample_size": defaults["sample_size"]})  # fmt: skip
    assert_same_embeddings(czb, authors)
    # The special cells took the paths they were made for.
    names = adata.obs_names
    assert names[FEW_GENES] not in czb[1]
    assert czb[2]["n_cells_dropped"] == czb[2]["n_cells_dropped_min_genes"] == 1
    expressed = authors[[names[ONE_CHROMOSOME], names[ONE_GENE]]].X.toarray() > 0
    genes = authors.var_names.str.upper()
    assert 1 < expressed[0].sum() == np.isin(genes[expressed[0]], list(ONE_CHROMOSOME_GENES)).sum()
    assert expressed[1].sum() == 1
    assert authors.n_vars < N_EMBEDDED  # genes in fewer than 10 cells left out


def test_same_embeddings_33layer_other_seed_and_sizes(tmp_path, weights, monkeypatch):
    adata = parity_counts()[:20].copy()
    kwargs = {"seed": 7, "batch_size": 8}
    authors = run_uce(
        tmp_path, adata, weights, monkeypatch, sample_size=64, variant="33layer", **kwargs
    )
    czb = run_czb(
        tmp_path, adata, weights, variant="33layer", parameters={"sample_size": 64}, **kwargs
    )
    assert_same_embeddings(czb, authors)


def test_batch_size_is_part_of_uce_embeddings(tmp_path, weights, monkeypatch):
    # UCE's padding mask is a float mask, added to the attention scores: padding is
    # attended, so a cell's embedding depends on the longest sentence of its batch.
    # czb equals UCE at any batch size, and only at the same one.
    adata = parity_counts()
    kwargs = {"seed": 5, "parameters": {"sample_size": 64}}
    one = run_czb(tmp_path / "one", adata, weights, batch_size=1, **kwargs)
    authors = run_uce(tmp_path, adata, weights, monkeypatch, seed=5, batch_size=1, sample_size=64)
    assert_same_embeddings(one, authors)
    all_in_one = run_czb(tmp_path / "all", adata, weights, batch_size=adata.n_obs, **kwargs)
    assert np.abs(all_in_one[0] - one[0]).max() > 1e-3


def test_cell_without_embedded_genes(tmp_path, weights, monkeypatch):
    # UCE keeps a cell whose counts all sit on genes without a protein embedding and
    # then fails on it (its sampling weights are 0/0); czb drops it. On the other cells
    # czb equals UCE run without that cell.
    adata = parity_counts(with_no_embedded_gene_cell=True)
    kwargs = {"seed": 3, "batch_size": 16, "sample_size": 64}
    with pytest.raises(ValueError, match="NaN"):
        run_uce(tmp_path / "all", adata, weights, monkeypatch, **kwargs)
    keep = np.arange(adata.n_obs) != NO_EMBEDDED_GENE
    authors = run_uce(tmp_path / "kept", adata[keep].copy(), weights, monkeypatch, **kwargs)
    czb = run_czb(tmp_path, adata, weights, seed=3, batch_size=16, parameters={"sample_size": 64})
    assert_same_embeddings(czb, authors)
    assert czb[2]["n_cells_dropped_no_embedded_genes"] == 1
    assert adata.obs_names[NO_EMBEDDED_GENE] not in czb[1]
