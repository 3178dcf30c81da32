"""Parity of czb's scVI entrypoint with the authors' own query mapping.

The authors' path is scvi-tools' documented query mapping as the CELLxGENE Census
notebook ``comp_bio_scvi_model_use`` runs it on the Census reference, and as
cz-benchmarks' scVI model runs it::

    adata.obs["batch"] = <batch label>        # "unassigned" (notebook) or the Census
                                              # dataset_id+assay+suspension_type+donor_id
    SCVI.prepare_query_anndata(adata, model_dir)   # zero-fill, reference gene order
    vae_q = SCVI.load_query_data(adata, model_dir) # scArches surgery, default freezing
    vae_q.is_trained = True                        # no query training
    latent = vae_q.get_latent_representation()     # mean of q(z | x)

Every step is the installed scvi-tools 1.4.2 itself, called here on the same
``dataset.h5ad`` the entrypoint reads, with the same ``model.pt``. The reference is a
small SCVI trained here and saved with ``SCVI.save``, registered as the Census models are
(batch key ``batch``, negative binomial, batch not encoded).

Tolerance: atol 1e-5, rtol 1e-4. Both paths run the same float32 encoder on the same
float32 counts; they differ only in how cells are batched (czb: the request's
``batch_size``; the notebook: scvi's default of 128), which can change summation order
in the matrix products, i.e. float32 rounding. Measured on CPU: identical (largest
difference 0.0, latent values up to about 0.5).
"""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scvi
from conftest import Entrypoint, read_output

SCVI = Entrypoint(
    "scvi",
    package="scvi-tools",
    organism="human",
    gene_id_type="ensembl",
    seed=0,
    # The spec's defaults (configs/models/scvi.yaml).
    batch_size=1024,
    parameters={"mode": "census_query", "max_epochs": 0, "min_gene_fraction": 0.5},
)

CENSUS_BATCH_KEYS = ["dataset_id", "assay", "suspension_type", "donor_id"]
N_REFERENCE_GENES = 120
N_QUERY_CELLS = 60
ATOL, RTOL = 1e-5, 1e-4
REFERENCE_IDS = np.array([f"ENSG{i:011d}" for i in range(N_REFERENCE_GENES)])


def heavy_tailed_counts(rng, n_cells: int, gene_means: np.ndarray) -> sp.csr_matrix:
    """Negative-binomial counts (gamma-Poisson) with log-normal gene means and cell
    sizes: mostly zeros, a few large counts."""
    size = rng.lognormal(0.0, 0.6, size=(n_cells, 1))
    rate = rng.gamma(shape=0.5, scale=gene_means * size / 0.5)
    return sp.csr_matrix(rng.poisson(rate).astype(np.float32))


def census_obs(cells: list[str], datasets: list[str], donors: list[str]) -> pd.DataFrame:
    """Census-style obs columns, one row per cell."""
    return pd.DataFrame(
        {
            "dataset_id": datasets,
            "assay": ["10x 3' v3"] * len(cells),
            "suspension_type": ["cell"] * len(cells),
            "donor_id": donors,
        },
        index=pd.Index(cells),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A small SCVI reference registered as the Census models are, saved by scvi-tools."""
    rng = np.random.default_rng(0)
    n_cells = 300
    gene_means = rng.lognormal(-1.0, 1.5, size=N_REFERENCE_GENES)
    obs = census_obs(
        [f"ref{i}" for i in range(n_cells)],
        [f"dataset{i % 2}" for i in range(n_cells)],
        [f"donor{i % 3}" for i in range(n_cells)],
    )
    adata = ad.AnnData(X=heavy_tailed_counts(rng, n_cells, gene_means), obs=obs)
    adata.var_names = REFERENCE_IDS
    # The Census label: the four columns concatenated without separator.
    adata.obs["batch"] = obs[CENSUS_BATCH_KEYS].astype(str).agg("".join, axis=1)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=6, n_hidden=32, n_layers=2, gene_likelihood="nb")
    model.train(max_epochs=5, accelerator="cpu", batch_size=64, enable_progress_bar=False)
    folder = tmp_path_factory.mktemp("census_reference")
    model.save(str(folder / "homo_sapiens"), save_anndata=False)
    return {"folder": folder, "gene_means": gene_means}


@pytest.fixture(scope="module")
def query(reference):
    """60 cells: 100 of the reference genes (20 zero-filled), 12 genes the reference
    lacks, shuffled gene order, a cell with one expressed gene, a cell with counts only
    in genes the reference lacks, batches both known to the reference and new."""
    rng = np.random.default_rng(1)
    measured = rng.choice(N_REFERENCE_GENES, size=100, replace=False)
    foreign = np.array([f"ENSG9{i:010d}" for i in range(12)])
    genes = np.concatenate([REFERENCE_IDS[measured], foreign])
    means = np.concatenate([reference["gene_means"][measured], rng.lognormal(-1, 1.5, 12)])
    order = rng.permutation(len(genes))
    genes, means = genes[order], means[order]
    counts = heavy_tailed_counts(rng, N_QUERY_CELLS, means).toarray()
    in_reference = np.isin(genes, REFERENCE_IDS)
    counts[0] = 0
    counts[0, np.flatnonzero(in_reference)[0]] = 3  # one expressed gene
    counts[1] = 0
    counts[1, ~in_reference] = 2  # only genes the reference lacks
    cells = [f"q{i}" for i in range(N_QUERY_CELLS)]
    # Half the cells from a dataset the reference holds (its own batch labels), half new.
    datasets = ["dataset0" if i % 2 else "dataset_new" for i in range(N_QUERY_CELLS)]
    donors = [f"donor{i % 3}" if i % 2 else f"donor_new{i % 2}" for i in range(N_QUERY_CELLS)]
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=census_obs(cells, datasets, donors))
    adata.var_names = genes
    assert 0.5 < (adata.X.toarray() == 0).mean() < 0.95  # sparse, as real data
    return adata


def run_entrypoint(tmp_path, reference, adata, **request):
    dirs = SCVI.job(tmp_path, adata, **request)
    shutil.copytree(reference["folder"], dirs["weights"], dirs_exist_ok=True)
    assert SCVI.run(dirs) == 0
    return dirs


def authors_latent(dirs, batch_labels=None):
    """The Census notebook's / cz-benchmarks' query mapping on the job's own files."""
    adata = ad.read_h5ad(dirs["input"] / "dataset.h5ad")
    if batch_labels is None:
        adata.obs["batch"] = "unassigned"  # the notebook's dummy batch
    else:
        # cz-benchmarks: functools.reduce(a + b) over the four columns as strings
        adata.obs["batch"] = adata.obs[batch_labels].astype(str).agg("".join, axis=1)
    model_dir = str(dirs["weights"] / "homo_sapiens")
    scvi.model.SCVI.prepare_query_anndata(adata, model_dir)
    vae_q = scvi.model.SCVI.load_query_data(adata, model_dir)
    vae_q.is_trained = True
    return vae_q.get_latent_representation(), list(adata.obs_names)


def assert_same_cells(czb_dirs, expected, expected_ids):
    values, ids, meta = read_output(czb_dirs["output"])
    # No cell is dropped on either path; rows come in the dataset's order.
    assert ids == expected_ids
    assert values.shape == expected.shape
    np.testing.assert_allclose(values, expected, atol=ATOL, rtol=RTOL)
    return values, meta


def test_census_batches_match_the_authors_query_mapping(tmp_path, reference, query):
    dirs = run_entrypoint(tmp_path, reference, query, batch_keys=CENSUS_BATCH_KEYS)
    expected, expected_ids = authors_latent(dirs, CENSUS_BATCH_KEYS)
    values, meta = assert_same_cells(dirs, expected, expected_ids)
    assert expected_ids == list(query.obs_names)
    assert meta["genes_zero_filled"] == 20
    assert meta["dataset_genes_not_in_reference"] == 12
    assert meta["query_batches_in_reference"] == 3 and meta["query_batches"] == 4
    # The comparison can fail: cells differ, and the near-empty cells too.
    assert values.std(axis=0).min() > 1e-3
    assert not np.allclose(values[0], values[1], atol=1e-3)


def test_no_batch_columns_match_the_census_notebook(tmp_path, reference, query):
    dirs = run_entrypoint(tmp_path, reference, query)
    expected, expected_ids = authors_latent(dirs)
    assert_same_cells(dirs, expected, expected_ids)


def test_query_training_keeps_the_authors_latent(tmp_path, reference, query):
    """``max_epochs`` > 0 (czb's option; the authors' default is 0) trains the query
    model scArches-style; the Census encoder takes no batch, so it is frozen whole."""
    dirs = run_entrypoint(
        tmp_path, reference, query, batch_keys=CENSUS_BATCH_KEYS, parameters={"max_epochs": 2}
    )
    expected, expected_ids = authors_latent(dirs, CENSUS_BATCH_KEYS)
    assert_same_cells(dirs, expected, expected_ids)


def test_mislabelled_genes_break_parity(tmp_path, reference, query):
    """The check sees gene matching: the same counts under shuffled IDs map elsewhere."""
    shuffled = query.copy()
    shuffled.var_names = np.random.default_rng(2).permutation(query.var_names.to_numpy())
    dirs = run_entrypoint(tmp_path, reference, shuffled, batch_keys=CENSUS_BATCH_KEYS)
    values, _, _ = read_output(dirs["output"])
    correct = run_entrypoint(tmp_path / "correct", reference, query, batch_keys=CENSUS_BATCH_KEYS)
    expected, _, _ = read_output(correct["output"])
    assert not np.allclose(values, expected, atol=ATOL, rtol=RTOL)


def test_min_gene_fraction_zero_maps_what_the_authors_map(tmp_path, reference, query):
    """czb refuses a query measuring under ``min_gene_fraction`` (0.5) of the reference
    genes, where scvi-tools only warns (under 80%); ``min_gene_fraction: 0`` runs it as
    the authors' path does."""
    known = np.flatnonzero(np.isin(query.var_names, REFERENCE_IDS))
    sparse_query = query[:, known[:40]].copy()  # 40 of 120 reference genes: a third
    dirs = SCVI.job(tmp_path / "default", sparse_query, batch_keys=CENSUS_BATCH_KEYS)
    shutil.copytree(reference["folder"], dirs["weights"], dirs_exist_ok=True)
    assert SCVI.run(dirs) == 1
    dirs = run_entrypoint(
        tmp_path / "zero",
        reference,
        sparse_query,
        batch_keys=CENSUS_BATCH_KEYS,
        parameters={"min_gene_fraction": 0.0},
    )
    with pytest.warns(UserWarning, match="less than 80%"):
        expected, expected_ids = authors_latent(dirs, CENSUS_BATCH_KEYS)
    assert_same_cells(dirs, expected, expected_ids)
