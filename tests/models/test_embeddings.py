"""Tests of the embedding sources (czb.models): baselines, bring-your-own files, shared checks."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tracemalloc
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from czb.core.errors import EmbeddingError, EmbeddingWarning, SpecError
from czb.data.dataset import Dataset
from czb.models.baselines import BASELINES, PCABaseline, RandomBaseline, RawPCABaseline
from czb.models.embedding import Embedding, EmbeddingSource, check_embedding
from czb.models.embedding_files import FileEmbeddingSource
from czb.models.sources import source_for_file, source_for_model
from czb.specs.schema import DatasetSpec, ModelSpec

# ----------------------------------------------------------------------------- helpers


def make_dataset(adata: ad.AnnData, *, expression: str = "raw_counts", name: str = "toy"):
    if "cell_type" not in adata.obs:
        adata.obs["cell_type"] = "t"
    spec = DatasetSpec(
        name=name, uri="synthetic:x", organism="human", label_key="cell_type", expression=expression
    )
    return Dataset(spec=spec, adata=adata)


def nb_counts(n_cells: int, n_genes: int, *, seed: int = 0, dtype=np.float32) -> ad.AnnData:
    """Sparse negative-binomial counts with a few cell groups, so PCA has structure."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, n_cells)
    base = rng.gamma(0.4, 2.0, size=n_genes)
    shift = rng.lognormal(0.0, 0.8, size=(4, n_genes))
    size = rng.uniform(0.5, 2.0, size=(n_cells, 1))
    mean = base[None, :] * shift[groups] * size
    counts = rng.negative_binomial(2, 2.0 / (2.0 + mean)).astype(dtype)
    adata = ad.AnnData(X=sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.obs["cell_type"] = pd.Categorical(groups.astype(str))
    return adata


def same_up_to_sign(a: np.ndarray, b: np.ndarray, *, atol: float) -> None:
    signs = np.sign(np.sum(a * b, axis=0))
    np.testing.assert_allclose(a, b * signs, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def pbmc() -> Dataset:
    p = sc.datasets.pbmc68k_reduced()
    adata = ad.AnnData(X=sp.csr_matrix(p.raw.X), obs=p.obs[["bulk_labels"]].copy())
    adata.obs["cell_type"] = adata.obs["bulk_labels"]
    adata.var_names = p.raw.var_names
    return make_dataset(adata, expression="log_normalized", name="pbmc")


@pytest.fixture
def toy() -> Dataset:
    return make_dataset(nb_counts(40, 30, seed=3))


# ----------------------------------------------------------------------------- pca


def test_pca_on_pbmc68k_matches_scanpy(pbmc):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)  # the default 3000 genes means "up to"
        emb = PCABaseline().embed(pbmc, seed=0)
    assert emb.info["parameters"]["n_top_genes"] == 3000 and "warnings" not in emb.info
    assert emb.info["effective_parameters"]["n_top_genes"] == emb.info["n_genes_used"] == 765
    assert emb.values.shape == (700, 50)
    assert emb.values.dtype == np.float32 and emb.values.flags.c_contiguous
    assert emb.cell_index is None and emb.kind == "in-process" and emb.model == "pca"
    assert emb.info["normalized"] is False and emb.info["n_dropped_cells"] == 0

    # Log-normalised input: no normalize_total / log1p.
    ref = ad.AnnData(X=pbmc.adata.X.copy())
    sc.pp.highly_variable_genes(ref, n_top_genes=765)
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.pca(ref, n_comps=50, random_state=0)
    same_up_to_sign(emb.values, ref.obsm["X_pca"], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_pca_equals_scanpy_pipeline_on_raw_counts(dtype):
    dataset = make_dataset(nb_counts(300, 1000, seed=1, dtype=dtype))
    emb = PCABaseline(n_top_genes=500, n_comps=50).embed(dataset, seed=0)

    ref = dataset.adata.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=500)
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.pca(ref, n_comps=50, random_state=0)
    assert emb.values.shape == (300, 50)
    same_up_to_sign(emb.values, ref.obsm["X_pca"], atol=1e-5)
    assert emb.info["n_genes_used"] == 500


@pytest.mark.parametrize("cls", [PCABaseline, RawPCABaseline])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_pca_leaves_input_sparse_and_unchanged(cls, dtype):
    dataset = make_dataset(nb_counts(60, 150, dtype=dtype))
    before = dataset.adata.X.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmbeddingWarning)
        cls().embed(dataset)
    after = dataset.adata.X
    assert sp.issparse(after) and after.format == "csr" and after.dtype == dtype
    assert (after != before).nnz == 0


@pytest.mark.parametrize("cls", [PCABaseline, RawPCABaseline])
def test_pca_never_densifies(cls):
    n_cells, n_genes = 4000, 5000
    rng = np.random.default_rng(0)
    x = sp.random(
        n_cells, n_genes, density=0.01, format="csr", dtype=np.float32, random_state=rng,
        data_rvs=lambda k: rng.integers(1, 20, k).astype(np.float32),
    )
    dataset = make_dataset(ad.AnnData(X=x))
    with warnings.catch_warnings():  # warm up imports and numba compilation
        warnings.simplefilter("ignore", EmbeddingWarning)
        cls().embed(make_dataset(nb_counts(60, 150)))
    tracemalloc.start()
    try:
        cls().embed(dataset)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    dense_bytes = n_cells * n_genes * 4
    assert peak < dense_bytes / 4, f"peak {peak / 1e6:.0f} MB, dense X {dense_bytes / 1e6:.0f} MB"


def test_pca_raw_is_plain_pca_of_counts():
    from sklearn.decomposition import PCA

    dataset = make_dataset(nb_counts(200, 300, seed=5))
    emb = RawPCABaseline(n_comps=10).embed(dataset)
    dense = dataset.adata.X.toarray().astype(np.float64)
    ref = PCA(n_components=10, svd_solver="full").fit_transform(dense)
    assert emb.values.shape == (200, 10) and emb.model == "pca_raw"
    same_up_to_sign(emb.values, ref, atol=1e-3 * np.abs(ref).max())


# ----------------------------------------------------------------------------- random


def test_random_is_seeded(toy):
    a = RandomBaseline().embed(toy, seed=1)
    b = RandomBaseline().embed(toy, seed=1)
    c = RandomBaseline().embed(toy, seed=2)
    assert a.values.shape == (40, 50) and a.values.dtype == np.float32
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.allclose(a.values, c.values)
    assert RandomBaseline(dim=7).embed(toy).values.shape == (40, 7)


# ----------------------------------------------------------------------------- model specs


def test_source_for_model_builds_baselines_with_parameters():
    spec = ModelSpec(
        name="pca_small", kind="baseline", implementation="pca", parameters={"n_comps": 5}
    )
    source = source_for_model(spec)
    assert isinstance(source, PCABaseline) and isinstance(source, EmbeddingSource)
    assert source.name == "pca_small" and source.kind == "in-process"
    assert source.describe() == {
        "name": "pca_small",
        "kind": "in-process",
        "image": "in-process",
        "implementation": "pca",
        "parameters": {"n_top_genes": 3000, "n_comps": 5},
    }
    assert set(BASELINES) == {"pca", "pca_raw", "random", "harmony"}


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"kind": "baseline", "implementation": "umap"}, SpecError, "unknown baseline .*'umap'"),
        (
            {"kind": "baseline", "implementation": "pca", "parameters": {"n_top_gene": 10}},
            SpecError,
            "unknown parameter.*n_top_gene; accepted: n_comps, n_top_genes",
        ),
        (
            {"kind": "baseline", "implementation": "random", "parameters": {"dim": 0}},
            SpecError,
            "dim must be a positive integer",
        ),
        (
            {"kind": "baseline", "implementation": "random", "parameters": {"dim": 2.5}},
            SpecError,
            "dim must be a positive integer",
        ),
    ],
)
def test_source_for_model_errors(fields, error, match):
    with pytest.raises(error, match=match):
        source_for_model(ModelSpec(name="m", **fields))


def test_incomplete_model_specs_are_rejected():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="a baseline model needs an implementation"):
        ModelSpec(name="m", kind="baseline")
    with pytest.raises(ValidationError, match="a docker model needs image and container"):
        ModelSpec(name="m", kind="docker")


def test_docker_specs_run_in_their_image():
    from czb.models.docker.request import RunOptions
    from czb.models.docker.source import DockerModelSource

    spec = ModelSpec(name="m", kind="docker", image="x/y:1", container="m")
    source = source_for_model(spec, RunOptions(gpus="none"))
    assert isinstance(source, DockerModelSource)
    assert source.describe()["image"] == "x/y:1" and source.gpus == "none"


# ----------------------------------------------------------------------------- check_embedding


def test_check_embedding_converts_to_float32_c_contiguous():
    values = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(4, 3))
    out = check_embedding(values, name="m")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, values)
    same = np.arange(6, dtype=np.float32).reshape(3, 2)
    assert check_embedding(same, name="m") is same
    assert check_embedding(np.arange(4, dtype=np.int64).reshape(2, 2), name="m").dtype == np.float32


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.zeros(5), r"m: embedding must be 2-D .*shape \(5,\)"),
        (np.zeros((2, 3, 4)), "must be 2-D"),
        (np.array([["a", "b"]]), "non-numeric dtype <U1"),
        (np.zeros((2, 2), dtype=bool), "non-numeric dtype bool"),
        (np.zeros((5, 0)), "zero columns"),
        (np.zeros((0, 5)), "zero rows"),
        (sp.csr_matrix(np.eye(3)), "sparse"),
        (
            np.array([[1.0, np.nan], [0, 0], [np.inf, 1]]),
            r"2 of 3 rows have NaN or infinite values \(row indices 0, 2\)",
        ),
        (np.array([[1e300, 0.0]]), "too large for float32"),
    ],
)
def test_check_embedding_rejects(values, match):
    with pytest.raises(EmbeddingError, match=match):
        check_embedding(values, name="m")


def test_check_embedding_names_cells_and_truncates():
    values = np.zeros((10, 2))
    values[1:9, 0] = np.nan
    match = r"8 of 10 rows .*cell IDs 'c1', 'c2', 'c3', 'c4', 'c5', \.\.\.\)"
    with pytest.raises(EmbeddingError, match=match):
        check_embedding(values, name="m", row_names=[f"c{i}" for i in range(10)])


def test_embedding_checks_cell_index():
    values = np.zeros((2, 3), dtype=np.float32)
    assert Embedding(values, "m", "file", np.array([0, 4])).take(np.arange(10)).tolist() == [0, 4]
    with pytest.raises(EmbeddingError, match="strictly increasing"):
        Embedding(values, "m", "file", np.array([4, 0]))
    with pytest.raises(EmbeddingError, match="one entry per row"):
        Embedding(values, "m", "file", np.array([0, 1, 2]))


# ----------------------------------------------------------------------------- files: round trips


@pytest.fixture
def emb_values(toy) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(toy.n_cells, 6)).astype(np.float64)


def load(path, dataset, **kw) -> Embedding:
    return source_for_file(path, **kw).embed(dataset)


def ids_of(dataset) -> np.ndarray:
    return np.asarray(dataset.adata.obs_names, dtype=str)


def test_npy_round_trip_and_provenance(tmp_path, toy, emb_values):
    path = tmp_path / "emb.npy"
    np.save(path, emb_values)
    source = source_for_file(path)
    emb = source.embed(toy)
    np.testing.assert_array_equal(emb.values, emb_values.astype(np.float32))
    assert emb.values.dtype == np.float32 and emb.cell_index is None
    assert emb.model == "file:emb.npy" and emb.kind == "file"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert emb.info["sha256"] == digest and emb.info["path"] == str(path.resolve())
    assert emb.info["n_dropped_cells"] == 0
    described = source.describe()
    assert described["sha256"] == digest and described["kind"] == "file"


def test_npz_round_trips(tmp_path, toy, emb_values):
    single = tmp_path / "single.npz"
    np.savez(single, emb=emb_values)
    np.testing.assert_allclose(load(single, toy).values, emb_values, rtol=1e-6)

    several = tmp_path / "several.npz"
    np.savez(several, a=emb_values, b=emb_values[:, :2], cell_ids=ids_of(toy))
    emb = load(several, toy, key="b")
    np.testing.assert_allclose(emb.values, emb_values[:, :2], rtol=1e-6)
    assert emb.info["cell_ids"] == "cell_ids" and emb.info["key"] == "b"


def test_parquet_round_trips(tmp_path, toy, emb_values):
    columns = pd.DataFrame(emb_values, columns=[f"d{i}" for i in range(6)])
    plain = tmp_path / "plain.parquet"
    columns.to_parquet(plain)
    np.testing.assert_allclose(load(plain, toy).values, emb_values, rtol=1e-6)

    indexed = tmp_path / "indexed.parquet"
    columns.set_index(pd.Index(ids_of(toy))).to_parquet(indexed)
    emb = load(indexed, toy)
    np.testing.assert_allclose(emb.values, emb_values, rtol=1e-6)
    assert emb.info["cell_ids"] == "index"

    with_column = tmp_path / "column.parquet"
    columns.assign(cell_id=ids_of(toy)).to_parquet(with_column)
    emb = load(with_column, toy)
    np.testing.assert_allclose(emb.values, emb_values, rtol=1e-6)
    assert emb.info["cell_ids"] == "cell_id"

    lists = tmp_path / "lists.parquet"
    vectors = {"vec": list(emb_values), "other": list(emb_values[:, :2])}
    pd.DataFrame({"obs_names": ids_of(toy), **vectors}).to_parquet(lists)
    np.testing.assert_allclose(load(lists, toy, key="vec").values, emb_values, rtol=1e-6)
    one_list = tmp_path / "one_list.parquet"
    pd.DataFrame({"vec": list(emb_values)}).to_parquet(one_list)
    np.testing.assert_allclose(load(one_list, toy).values, emb_values, rtol=1e-6)


def test_h5ad_round_trips(tmp_path, toy, emb_values):
    adata = ad.AnnData(obs=pd.DataFrame(index=ids_of(toy)))
    adata.obsm["X_model"] = emb_values
    single = tmp_path / "single.h5ad"
    adata.write_h5ad(single)
    emb = load(single, toy)
    np.testing.assert_allclose(emb.values, emb_values, rtol=1e-6)
    assert emb.info["key"] == "X_model" and emb.info["cell_ids"] == "obs_names"

    adata.obsm["X_other"] = emb_values[:, :3]
    several = tmp_path / "several.h5ad"
    adata.write_h5ad(several)
    emb = load(several, toy, key="X_other")
    np.testing.assert_allclose(emb.values, emb_values[:, :3], rtol=1e-6)


# ----------------------------------------------------------------------------- files: alignment


def write_shuffled(fmt: str, path, values, ids) -> None:
    if fmt == "npz":
        np.savez(path, emb=values, cell_ids=ids)
    elif fmt == "parquet":
        pd.DataFrame(values, index=pd.Index(ids)).rename(columns=str).to_parquet(path)
    else:
        adata = ad.AnnData(obs=pd.DataFrame(index=ids))
        adata.obsm["X_emb"] = values
        adata.write_h5ad(path)


@pytest.mark.parametrize("fmt", ["npz", "parquet", "h5ad"])
def test_alignment_restores_dataset_order(tmp_path, toy, emb_values, fmt):
    order = np.random.default_rng(0).permutation(toy.n_cells)
    path = tmp_path / f"shuffled.{fmt}"
    write_shuffled(fmt, path, emb_values[order], ids_of(toy)[order])
    emb = load(path, toy)
    assert emb.cell_index is None
    np.testing.assert_allclose(emb.values, emb_values, rtol=1e-6)
    assert emb.values.flags.c_contiguous


@pytest.mark.parametrize("fmt", ["npz", "parquet", "h5ad"])
def test_missing_cells_are_dropped_with_a_warning(tmp_path, toy, emb_values, fmt):
    keep = np.random.default_rng(1).permutation(toy.n_cells)[:30]  # shuffled subset
    path = tmp_path / f"subset.{fmt}"
    write_shuffled(fmt, path, emb_values[keep], ids_of(toy)[keep])
    with pytest.warns(EmbeddingWarning, match="10 of 40 cells of toy have no embedding"):
        emb = load(path, toy)
    np.testing.assert_array_equal(emb.cell_index, np.sort(keep))
    np.testing.assert_allclose(emb.values, emb_values[np.sort(keep)], rtol=1e-6)
    assert emb.info["n_dropped_cells"] == 10
    np.testing.assert_array_equal(emb.take(toy.labels), toy.labels[np.sort(keep)])


# ----------------------------------------------------------------------------- files: errors


def test_unknown_extension_and_missing_file(tmp_path):
    bad = tmp_path / "emb.csv"
    bad.write_text("1,2\n")
    with pytest.raises(EmbeddingError, match=r"emb\.csv: unknown embedding file extension '\.csv'"):
        source_for_file(bad)
    with pytest.raises(EmbeddingError, match="nothere.npy: embedding file not found"):
        source_for_file(tmp_path / "nothere.npy")


def test_missing_and_ambiguous_keys(tmp_path, toy, emb_values):
    npz = tmp_path / "e.npz"
    np.savez(npz, a=emb_values, b=emb_values)
    with pytest.raises(EmbeddingError, match=r"e\.npz: several arrays \('a', 'b'\); pass key="):
        load(npz, toy)
    with pytest.raises(EmbeddingError, match=r"e\.npz: no array 'c'; available: 'a', 'b'"):
        load(npz, toy, key="c")

    parquet = tmp_path / "e.parquet"
    pd.DataFrame({"x": [1.0] * 40, "y": [2.0] * 40}).to_parquet(parquet)
    with pytest.raises(EmbeddingError, match=r"e\.parquet: no column 'vec'; columns: 'x', 'y'"):
        load(parquet, toy, key="vec")

    adata = ad.AnnData(obs=pd.DataFrame(index=ids_of(toy)))
    adata.obsm["X_a"] = emb_values
    adata.obsm["X_b"] = emb_values
    h5ad = tmp_path / "e.h5ad"
    adata.write_h5ad(h5ad)
    with pytest.raises(EmbeddingError, match=r"e\.h5ad: several obsm entries \('X_a', 'X_b'\)"):
        load(h5ad, toy)
    with pytest.raises(EmbeddingError, match=r"no obsm entry 'X_c'; available: 'X_a', 'X_b'"):
        load(h5ad, toy, key="X_c")


def test_bad_values_in_files(tmp_path, toy, emb_values):
    cases = {
        "flat.npy": (np.zeros(40), "must be 2-D"),
        "cube.npy": (np.zeros((40, 2, 2)), "must be 2-D"),
        "text.npy": (np.full((40, 2), "x"), "non-numeric dtype"),
        "empty.npy": (np.zeros((40, 0)), "zero columns"),
        "short.npy": (emb_values[:39], "39 rows but dataset toy has 40 cells"),
    }
    for name, (values, match) in cases.items():
        np.save(tmp_path / name, values)
        with pytest.raises(EmbeddingError, match=rf"{name.replace('.', '[.]')}: .*{match}"):
            load(tmp_path / name, toy)

    nan_rows = emb_values.copy()
    nan_rows[[3, 17]] = np.nan
    np.save(tmp_path / "nan.npy", nan_rows)
    match = r"nan\.npy: 2 of 40 rows have NaN or infinite values \(row indices 3, 17\)"
    with pytest.raises(EmbeddingError, match=match):
        load(tmp_path / "nan.npy", toy)
    np.savez(tmp_path / "nan.npz", emb=nan_rows, cell_ids=ids_of(toy))
    with pytest.raises(EmbeddingError, match=r"\(cell IDs 'cell3', 'cell17'\)"):
        load(tmp_path / "nan.npz", toy)

    text = pd.DataFrame(emb_values[:, :2], columns=["a", "b"]).assign(label="x")
    text.to_parquet(tmp_path / "text.parquet")
    with pytest.raises(EmbeddingError, match=r"text\.parquet: non-numeric column\(s\) label"):
        load(tmp_path / "text.parquet", toy)
    pd.DataFrame(index=pd.Index(ids_of(toy))).to_parquet(tmp_path / "nocols.parquet")
    with pytest.raises(EmbeddingError, match="zero columns"):
        load(tmp_path / "nocols.parquet", toy)
    ragged = pd.DataFrame({"vec": [np.zeros(3)] * 39 + [np.zeros(2)]})
    ragged.to_parquet(tmp_path / "ragged.parquet")
    with pytest.raises(EmbeddingError, match="vectors of different lengths"):
        load(tmp_path / "ragged.parquet", toy)


def test_bad_cell_ids(tmp_path, toy, emb_values):
    ids = ids_of(toy).copy()
    dup = ids.copy()
    dup[5] = dup[4]
    np.savez(tmp_path / "dup.npz", emb=emb_values, cell_ids=dup)
    with pytest.raises(EmbeddingError, match=r"dup\.npz: 1 duplicated cell IDs \(e\.g\. 'cell4'\)"):
        load(tmp_path / "dup.npz", toy)

    extra = ids.copy()
    extra[:3] = ["x1", "x2", "x3"]
    np.savez(tmp_path / "extra.npz", emb=emb_values, cell_ids=extra)
    match = r"3 of 40 cell IDs are not in dataset toy \(e\.g\. 'x1', 'x2', 'x3'\)"
    with pytest.raises(EmbeddingError, match=match):
        load(tmp_path / "extra.npz", toy)

    np.savez(tmp_path / "other.npz", emb=emb_values, cell_ids=np.char.add("AAAC-", ids))
    with pytest.raises(EmbeddingError, match="0 of 40 cell IDs match dataset toy .*same cells"):
        load(tmp_path / "other.npz", toy)

    np.savez(tmp_path / "count.npz", emb=emb_values, cell_ids=ids[:20])
    with pytest.raises(EmbeddingError, match=r"20 cell IDs \(cell_ids\) for 40 rows"):
        load(tmp_path / "count.npz", toy)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".parquet", ".h5ad"])
def test_corrupt_file_is_an_embedding_error(tmp_path, toy, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(EmbeddingError, match=rf"garbage\{suffix}: not a readable \{suffix} file"):
        load(path, toy)


def test_object_arrays_are_not_unpickled(tmp_path, toy, emb_values):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([[object()]] * 40, dtype=object), allow_pickle=True)
    with pytest.raises(EmbeddingError, match=r"obj\.npy: array holds Python objects"):
        load(path, toy)
    # The usual slip: obs_names.to_numpy() is an object array.
    path = tmp_path / "obj.npz"
    np.savez(path, emb=emb_values, cell_ids=toy.adata.obs_names.to_numpy())
    with pytest.raises(EmbeddingError, match=r"array 'cell_ids' holds Python objects .*dtype=str"):
        load(path, toy)


def test_file_source_is_an_embedding_source(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, np.zeros((2, 2)))
    source = source_for_file(path, key=None)
    assert isinstance(source, FileEmbeddingSource) and isinstance(source, EmbeddingSource)


def test_import_stays_light():
    heavy = ("scanpy", "anndata", "pyarrow", "h5py", "sklearn")
    code = f"import sys, czb.models.sources; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parquet_integer_index_is_not_cell_ids(tmp_path, toy, emb_values):
    order = np.random.default_rng(0).permutation(toy.n_cells)
    path = tmp_path / "shuffled_ints.parquet"
    pd.DataFrame(emb_values).rename(columns=str).iloc[order].to_parquet(path)
    with pytest.warns(EmbeddingWarning, match="the index is not cell IDs .* file order"):
        emb = load(path, toy)
    np.testing.assert_allclose(emb.values, emb_values[order], rtol=1e-6)


def test_parquet_null_cell_ids(tmp_path, toy, emb_values):
    ids = ids_of(toy).astype(object)
    ids[2] = None
    frame = pd.DataFrame(emb_values).rename(columns=str).assign(cell_id=ids)
    frame.to_parquet(tmp_path / "n.parquet")
    with pytest.raises(EmbeddingError, match=r"some cell IDs \(cell_id\) are missing"):
        load(tmp_path / "n.parquet", toy)
