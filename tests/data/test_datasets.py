"""Dataset specs, loading and validation (all offline, the whole file runs in seconds)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from czb.core.errors import DatasetError, DatasetWarning, FetchError, SpecError
from czb.data.dataset import Dataset
from czb.data.gene_ids import ensembl_share
from czb.data.matrix import row_sums
from czb.data.reading import load_dataset
from czb.data.synthetic.cells import planted_cells
from czb.data.synthetic.common import ensembl_like_ids
from czb.data.synthetic.generators import GENERATORS
from czb.data.validation import validate_dataset
from czb.specs.catalog import Catalog
from czb.specs.schema import DatasetSpec

TSV2_TISSUES = [
    "bladder", "blood", "bone_marrow", "ear", "eye", "fat", "heart", "large_intestine", "liver",
    "lung", "lymph_node", "mammary", "muscle", "ovary", "prostate", "salivary_gland", "skin",
    "small_intestine", "spleen", "stomach", "testis", "thymus", "tongue", "trachea", "uterus",
    "vasculature",
]  # fmt: skip
SPERMATOGENESIS = [
    "human", "mouse", "rhesus_macaque", "gorilla", "chimpanzee", "marmoset", "chicken", "opossum",
    "platypus",
]  # fmt: skip
CZ_BENCHMARKS = (
    [f"tsv2_{t}" for t in TSV2_TISSUES]
    + [f"{s}_spermatogenesis" for s in SPERMATOGENESIS]
    + [
        "replogle_k562_essential_perturbpredict",
        "allen_soundlife_immune_variation",
        "allen_soundlife_flu_vax_response",
    ]
)
FIXTURES = [
    "pbmc68k_reduced",
    "synthetic_cells",
    "synthetic_cells_tiny",
    "synthetic_cells_no_batch_effect",
    "synthetic_cells_strong_batch",
]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    # Never the network; no user spec folders and a private cache even without conftest.py.
    monkeypatch.setenv("CZB_OFFLINE", "1")
    monkeypatch.delenv("CZB_CONFIG_PATH", raising=False)
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.load()


# --------------------------------------------------------------------------- helpers


def small_adata(n_cells: int = 40, n_genes: int = 30, *, seed: int = 0) -> ad.AnnData:
    """Valid raw counts: human Ensembl IDs, labels and batches, no empty cells."""
    rng = np.random.default_rng(seed)
    counts = rng.poisson(1.5, size=(n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(rng.choice(["T cell", "B cell", "NK cell"], size=n_cells)),
            "batch": pd.Categorical(rng.choice(["b0", "b1"], size=n_cells)),
            "day": rng.integers(0, 3, size=n_cells),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=ensembl_like_ids(n_genes))
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


def write(adata: ad.AnnData, tmp_path: Path, name: str = "data.h5ad") -> Path:
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. anndata on non-unique obs names
        adata.write_h5ad(path)
    return path


def spec_for(path: Path | str, **fields) -> DatasetSpec:
    base = {
        "name": "bad",
        "uri": str(path),
        "organism": "human",
        "label_key": "cell_type",
        "batch_key": "batch",
    }
    return DatasetSpec(**{**base, **fields})


def load_and_validate(adata: ad.AnnData, tmp_path: Path, **fields) -> Dataset:
    ds = load_dataset(spec_for(write(adata, tmp_path), **fields))
    validate_dataset(ds)
    return ds


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    assert text.startswith("dataset 'bad': ") or "'bad'" in text, text
    return text


# --------------------------------------------------------------------------- catalog


def test_bundled_catalog_has_cz_benchmarks_and_fixtures(catalog):
    assert set(CZ_BENCHMARKS) <= set(catalog.datasets)
    assert len(CZ_BENCHMARKS) == 38
    assert set(FIXTURES) <= set(catalog.datasets)
    for name in CZ_BENCHMARKS:
        spec = catalog.dataset(name)
        assert spec.uri.startswith("s3://cz-benchmarks-data/datasets/") and spec.uri.endswith(
            ".h5ad"
        )
        assert spec.description and "doi:" in spec.citation
        assert spec.sha256 is None
        assert spec.source is not None and spec.source.name == "cz_benchmarks.yaml"
    for tissue in TSV2_TISSUES:
        spec = catalog.dataset(f"tsv2_{tissue}")
        assert (
            spec.organism == "human"
            and spec.label_key == "cell_type"
            and spec.gene_id_type == "ensembl"
        )
        assert spec.batch_keys == ["dataset_id", "assay", "suspension_type", "donor_id"]
        assert "tabula_sapiens_v2" in spec.tags
    for species in SPERMATOGENESIS:
        spec = catalog.dataset(f"{species}_spermatogenesis")
        assert (
            spec.organism == species
            and spec.label_key == "cell_type"
            and "cross_species" in spec.tags
        )
    perturb = catalog.dataset("replogle_k562_essential_perturbpredict")
    assert perturb.label_key == "condition" and perturb.extra_keys == {"condition": "condition"}
    assert "non-targeting" in perturb.description and perturb.tags == ["perturbation"]
    assert (
        catalog.dataset("allen_soundlife_immune_variation").label_key == "subject__ageAtFirstDraw"
    )
    assert catalog.dataset("allen_soundlife_flu_vax_response").label_key == "sample__visitName"


def test_spec_error_names_file_and_key(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "datasets:\n"
        "  my_atlas:\n"
        "    uri: /data/atlas.h5ad\n"
        "    organism: martian\n"
        "    label_key: cell_type\n"
    )
    with pytest.raises(
        SpecError, match=r"mine\.yaml: datasets\.my_atlas\.organism: .*unknown organism 'martian'"
    ):
        Catalog.load(extra_dirs=[tmp_path])


def test_user_spec_folder_overrides_bundled_entry(tmp_path, catalog):
    (tmp_path / "override.yaml").write_text(
        "datasets:\n"
        "  synthetic_cells_tiny:\n"
        "    uri: synthetic:planted_cells\n"
        "    params: {n_cells: 120, n_genes: 200, seed: 3}\n"
        "    organism: human\n"
        "    label_key: cell_type\n"
        "    description: my override\n"
    )
    mine = Catalog.load(extra_dirs=[tmp_path])
    spec = mine.dataset("synthetic_cells_tiny")
    assert spec.description == "my override" and spec.source == tmp_path / "override.yaml"
    assert set(mine.datasets) == set(catalog.datasets)  # everything else is still there
    assert load_dataset(spec).n_cells == 120


# --------------------------------------------------------------------------- fixtures


def test_pbmc68k_reduced_loads_offline_and_validates(catalog):
    ds = load_dataset(catalog.dataset("pbmc68k_reduced"), offline=True)
    assert (ds.n_cells, ds.n_genes) == (700, 765)
    assert sp.issparse(ds.adata.X) and ds.adata.X.format == "csr"
    assert len(np.unique(ds.labels)) == 10
    assert ds.batches is None
    assert ds.path is not None and ds.path.name == "10x_pbmc68k_reduced.h5ad"
    assert re.fullmatch(r"[0-9a-f]{64}", ds.sha256)
    assert "CD3E" in ds.adata.var_names  # symbols from .raw, not the 765 scaled .X columns' twin
    validate_dataset(ds)
    with pytest.raises(
        DatasetError,
        match=r"dataset 'pbmc68k_reduced': the task needs batches, but the spec has no batch_key",
    ):
        validate_dataset(ds, require=["batch"])
    with pytest.raises(
        DatasetError, match=r"needs role 'time_point', but the spec has no extra_keys\.time_point"
    ):
        validate_dataset(ds, require=["time_point"])
    validate_dataset(ds, require=["label", "species"])
    assert set(ds.role("species")) == {"human"}


@pytest.mark.parametrize("name", FIXTURES[1:])
def test_synthetic_fixtures_load_and_validate(catalog, name):
    ds = load_dataset(catalog.dataset(name))
    validate_dataset(ds, require=["batch", "time_point", "donor"])
    assert sp.issparse(ds.adata.X) and ds.adata.X.format == "csr"
    assert ds.path is None and re.fullmatch(r"[0-9a-f]{64}", ds.sha256)
    assert len(np.unique(ds.labels)) == 6 and len(np.unique(ds.batches)) == 3
    assert ensembl_share(ds.adata.var_names, "human") == 1.0


def test_planted_cells_is_deterministic():
    a, b, c = (
        planted_cells(n_cells=200, n_genes=300, seed=7),
        planted_cells(n_cells=200, n_genes=300, seed=7),
        planted_cells(n_cells=200, n_genes=300, seed=8),
    )
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and list(a.var_names) == list(b.var_names)
    assert (a.X != c.X).nnz > 0
    assert not np.array_equal(a.obs["cell_type"].to_numpy(), c.obs["cell_type"].to_numpy())
    # Integer counts, every cell non-empty, the documented obs columns.
    assert np.array_equal(a.X.data, np.round(a.X.data)) and (row_sums(a.X) > 0).all()
    assert list(a.obs.columns) == ["cell_type", "batch", "donor", "time_point"]
    assert sorted(a.obs["time_point"].unique()) == [0, 1, 2, 3, 4]
    assert a.obs_names.is_unique and all(re.fullmatch(r"ENSG\d{11}", g) for g in a.var_names)


def test_synthetic_sha256_tracks_generator_arguments():
    def digest(params):
        spec = DatasetSpec(
            name="s",
            uri="synthetic:planted_cells",
            organism="human",
            label_key="cell_type",
            params=params,
        )
        return load_dataset(spec).sha256

    small = {"n_cells": 100, "n_genes": 150}
    assert digest(small) == digest(small)
    assert digest(small) == digest({**small, "seed": 0})  # a default spelled out is the same data
    assert digest(small) != digest({**small, "seed": 1})
    assert "planted_cells" in GENERATORS


def test_synthetic_generator_errors():
    base = {"name": "bad", "organism": "human", "label_key": "cell_type"}
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': unknown synthetic generator 'nope'; known: .*planted_cells",
    ):
        load_dataset(DatasetSpec(uri="synthetic:nope", **base))
    with pytest.raises(
        DatasetError, match=r"dataset 'bad': bad params for synthetic:planted_cells: .*n_cels"
    ):
        load_dataset(DatasetSpec(uri="synthetic:planted_cells", params={"n_cels": 10}, **base))


def test_planted_structure_separates_types_and_random_is_chance(catalog):
    from sklearn.decomposition import PCA
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    ds = load_dataset(catalog.dataset("synthetic_cells"))
    X = ds.adata.X
    # Log-normalise: counts per 10k, log1p (sparse, as scanpy does).
    scaled = sp.diags(1e4 / row_sums(X)) @ X
    scaled.data = np.log1p(scaled.data)
    pcs = PCA(n_components=50, svd_solver="randomized", random_state=0).fit_transform(
        scaled.toarray()
    )
    knn = KNeighborsClassifier(n_neighbors=15)
    labels = ds.labels
    rng = np.random.default_rng(0)
    majority = pd.Series(labels).value_counts(normalize=True).iloc[0]

    assert cross_val_score(knn, pcs, labels, cv=5).mean() > 0.9
    chance_shuffled = cross_val_score(knn, pcs, rng.permutation(labels), cv=5).mean()
    chance_random = cross_val_score(knn, rng.normal(size=pcs.shape), labels, cv=5).mean()
    assert chance_shuffled < majority + 0.1 and chance_random < majority + 0.1


# --------------------------------------------------------------------------- loading


def test_local_path_and_file_uri_load_the_same(tmp_path):
    path = write(small_adata(), tmp_path)
    by_path = load_dataset(spec_for(path))
    by_uri = load_dataset(spec_for(path.as_uri()))
    validate_dataset(by_path, require=["batch"])
    assert by_path.sha256 == by_uri.sha256 and by_path.path == by_uri.path == path
    assert (by_path.adata.X != by_uri.adata.X).nnz == 0


def test_sha256_mismatch_is_a_fetch_error(tmp_path):
    path = write(small_adata(), tmp_path)
    with pytest.raises(FetchError, match="sha256 mismatch"):
        load_dataset(spec_for(path, sha256="0" * 64))


def test_layer_and_gene_key_selection(tmp_path):
    adata = small_adata()
    dense_counts = adata.X.toarray()
    adata.layers["counts"] = dense_counts
    adata.X = sp.csr_matrix(np.log1p(dense_counts))
    adata.var["symbol"] = [f"GENE{i}" for i in range(adata.n_vars)]
    adata.raw = adata.copy()
    path = write(adata, tmp_path)

    ds = load_dataset(spec_for(path, layer="counts"))
    assert isinstance(ds.adata.X, np.ndarray) and np.array_equal(
        ds.adata.X, dense_counts
    )  # dense stays dense
    validate_dataset(ds)
    ds = load_dataset(spec_for(path, layer="raw", expression="log_normalized"))
    assert sp.issparse(ds.adata.X) and ds.adata.n_vars == adata.n_vars
    ds = load_dataset(spec_for(path, layer="counts", gene_key="symbol", gene_id_type="symbol"))
    assert ds.adata.var_names[0] == "GENE0" and ds.extras["gene_source"] == "var['symbol']"
    validate_dataset(ds)
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': layer 'spliced' not in the file; "
        r"available layers: 'X', 'raw', 'counts'",
    ):
        load_dataset(spec_for(path, layer="spliced"))
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': gene_key 'symbols' is not a var column; available: 'symbol'",
    ):
        load_dataset(spec_for(path, gene_key="symbols"))


def test_ensembl_id_column_is_used_like_cz_benchmarks(tmp_path):
    adata = small_adata()
    adata.var["ensembl_id"] = list(adata.var_names)
    adata.var_names = [f"GENE{i}" for i in range(adata.n_vars)]
    ds = load_dataset(spec_for(write(adata, tmp_path)))
    assert (
        ds.adata.var_names[0].startswith("ENSG") and ds.extras["gene_source"] == "var['ensembl_id']"
    )
    validate_dataset(ds)


def test_corrupt_h5ad_is_one_line_dataset_error(tmp_path):
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': cannot read .*garbage\.h5ad as \.h5ad .*corrupt or truncated",
    ) as e:
        load_dataset(spec_for(garbage))
    one_line(e)

    good = write(small_adata(), tmp_path, "truncated.h5ad")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        DatasetError, match=r"dataset 'bad': cannot read .*truncated\.h5ad as \.h5ad"
    ) as e:
        load_dataset(spec_for(good))
    one_line(e)


def test_duplicated_cell_ids(tmp_path):
    adata = small_adata()
    adata.obs_names = ["cell_0", "cell_1", "cell_0"] + [f"c{i}" for i in range(3, adata.n_obs)]
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': 1 cell IDs occur more than once in obs_names \(e\.g\. 'cell_0'\)",
    ) as e:
        load_dataset(spec_for(write(adata, tmp_path)))
    one_line(e)


def test_duplicated_gene_ids_are_made_unique_with_a_warning(tmp_path):
    adata = small_adata()
    names = list(adata.var_names)
    names[1] = names[0]
    adata.var_names = names
    with pytest.warns(DatasetWarning, match=r"1 duplicated gene IDs in var_names"):
        ds = load_dataset(spec_for(write(adata, tmp_path)))
    assert ds.adata.var_names.is_unique


# --------------------------------------------------------------------------- validation


def test_missing_label_key_lists_closest_columns_first(tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"^dataset 'bad': label_key 'celltype' is not an obs column; "
        r"available: 'cell_type', ",
    ) as e:
        load_and_validate(small_adata(), tmp_path, label_key="celltype")
    one_line(e)


def test_missing_batch_key(tmp_path):
    with pytest.raises(
        DatasetError, match=r"dataset 'bad': batch_key 'donor_id' is not an obs column; available: "
    ) as e:
        load_and_validate(small_adata(), tmp_path, batch_key=["batch", "donor_id"])
    one_line(e)


def test_missing_extra_key(tmp_path):
    with pytest.raises(
        DatasetError, match=r"dataset 'bad': extra_keys\.time_point 'time' is not an obs column"
    ):
        load_and_validate(small_adata(), tmp_path, extra_keys={"time_point": "time"})


def test_symbols_declared_ensembl(tmp_path):
    adata = small_adata()
    adata.var_names = ["CD3E", "MS4A1"] + [f"GENE{i}" for i in range(2, adata.n_vars)]
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': var_names look like gene symbols \(e\.g\. 'CD3E', 'MS4A1'\), "
        r"but the spec declares gene_id_type 'ensembl'",
    ) as e:
        load_and_validate(adata, tmp_path)
    one_line(e)


def test_mouse_ids_declared_human(tmp_path):
    adata = small_adata()
    adata.var_names = ensembl_like_ids(adata.n_vars, prefix="ENSMUSG")
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': var_names look like mouse Ensembl IDs "
        r"\(ENSMUSG\.\.\., e\.g\. 'ENSMUSG\d{11}'.*organism 'human'",
    ) as e:
        load_and_validate(adata, tmp_path)
    one_line(e)


def test_gorilla_ids_are_not_human_although_both_start_with_ensg(tmp_path):
    adata = small_adata()
    adata.var_names = ensembl_like_ids(adata.n_vars, prefix="ENSGGOG")
    with pytest.raises(DatasetError, match=r"look like gorilla Ensembl IDs"):
        load_and_validate(adata, tmp_path)
    load_and_validate(adata, tmp_path, organism="gorilla")


def test_ensembl_ids_declared_symbol(tmp_path):
    with pytest.raises(
        DatasetError,
        match=r"var_names look like human Ensembl IDs .*declares gene_id_type 'symbol'",
    ):
        load_and_validate(small_adata(), tmp_path, gene_id_type="symbol")


@pytest.mark.parametrize("dense", [False, True])
def test_nan_in_counts(tmp_path, dense):
    adata = small_adata()
    X = adata.X.toarray()
    X[5, 3] = np.nan
    adata.X = X if dense else sp.csr_matrix(X)
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': expression matrix \(layer 'X'\) has 1 non-finite values "
        r"\(NaN or inf\), e\.g\. in cell 'cell_5'",
    ) as e:
        load_and_validate(adata, tmp_path)
    one_line(e)


@pytest.mark.parametrize("dense", [False, True])
def test_negative_counts(tmp_path, dense):
    adata = small_adata()
    X = adata.X.toarray()
    X[7, 2] = -3
    adata.X = X if dense else sp.csr_matrix(X)
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': expression matrix \(layer 'X'\) has 1 negative values "
        r"\(min -3, e\.g\. in cell 'cell_7'\)",
    ) as e:
        load_and_validate(adata, tmp_path)
    one_line(e)


def test_non_integer_counts_declared_raw(tmp_path):
    adata = small_adata()
    adata.X = adata.X.copy()
    adata.X.data = np.log1p(adata.X.data)
    with pytest.raises(
        DatasetError,
        match=r"declares expression 'raw_counts' but .* non-integer values "
        r".*the data look log-normalised",
    ) as e:
        load_and_validate(adata, tmp_path)
    one_line(e)
    load_and_validate(adata, tmp_path, expression="log_normalized")


def test_counts_declared_log_normalized_warn(tmp_path):
    adata = small_adata()
    adata.X = adata.X * 20
    with pytest.warns(DatasetWarning, match="look like raw counts"):
        load_and_validate(adata, tmp_path, expression="log_normalized")


def test_empty_cells(tmp_path):
    adata = small_adata()
    X = adata.X.toarray()
    X[[3, 9]] = 0
    adata.X = sp.csr_matrix(X)
    with pytest.raises(
        DatasetError,
        match=r"dataset 'bad': 2 of 40 cells have no counts \(zero total\), "
        r"e\.g\. 'cell_3', 'cell_9'",
    ) as e:
        load_and_validate(adata, tmp_path)
    one_line(e)


def test_row_sums_sparse_and_dense_agree():
    X = planted_cells(n_cells=50, n_genes=40, seed=1).X
    expected = np.asarray(X.sum(axis=1)).ravel()
    assert np.allclose(row_sums(X), expected)
    assert np.allclose(row_sums(X.toarray(), chunk_rows=7), expected)
    assert np.allclose(row_sums(X.tocsc()), expected)
