"""Atlas scale: expression matrices left on disk, and the streamed PCA baselines.

Everything runs on small files; thresholds are lowered with monkeypatch so that the
on-disk and streamed code paths run. The memory test counts allocations
(tracemalloc), never time.
"""

from __future__ import annotations

import re
import tracemalloc
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import psutil
import pytest
import scanpy as sc
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

import czb.data.matrix as matrix_module
import czb.data.reading as reading_module
import czb.data.row_major as row_major_module
import czb.models.pca as pca_module
from czb.core.errors import DatasetError, DatasetWarning, EmbeddingWarning
from czb.data.dataset import Dataset
from czb.data.matrix import BackedMatrix, iter_row_chunks, row_sums
from czb.data.reading import load_dataset
from czb.data.synthetic.cells import planted_cells
from czb.data.validation import validate_dataset
from czb.models.baselines import PCABaseline, RawPCABaseline
from czb.models.docker.request import build_request, write_input
from czb.models.streaming_pca import (
    ColumnMoments,
    highly_variable_seurat,
    randomized_pca,
    svd_flip_rows,
)
from czb.specs.schema import DatasetSpec, ModelSpec


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("CZB_OFFLINE", "1")
    monkeypatch.delenv("CZB_CONFIG_PATH", raising=False)
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def stream_always(monkeypatch):
    monkeypatch.setattr(pca_module, "STREAMED_PCA_MIN_VALUES", 0)


def spec_for(path: Path, **kw) -> DatasetSpec:
    fields = {"name": "big", "uri": str(path), "organism": "human", "label_key": "cell_type"}
    return DatasetSpec(**{**fields, **kw})


def write(adata: ad.AnnData, path: Path, *, storage: str = "csr") -> Path:
    adata = adata.copy()
    if storage == "dense":
        adata.X = adata.X.toarray()
    elif storage == "csc":
        adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def planted() -> ad.AnnData:
    return planted_cells(n_cells=1200, n_genes=600, seed=4)


def open_h5_files(path: Path) -> list[str]:
    return [f.path for f in psutil.Process().open_files() if Path(f.path) == path]


# --------------------------------------------------------------------------- loading


def test_small_files_load_into_memory_large_ones_stay_on_disk(tmp_path, planted, monkeypatch):
    path = write(planted, tmp_path / "p.h5ad")
    ds = load_dataset(spec_for(path))
    assert not ds.backed and sp.issparse(ds.adata.X)
    monkeypatch.setattr(reading_module, "BACKED_MIN_VALUES", planted.X.nnz - 1)
    ds = load_dataset(spec_for(path))
    assert ds.backed and isinstance(ds.adata.X, BackedMatrix)
    assert ds.adata.X.nnz == planted.X.nnz and ds.adata.X.shape == planted.shape
    assert not load_dataset(spec_for(path), backed=False).backed
    # Generated data is always in memory.
    synthetic = DatasetSpec(name="s", uri="synthetic:planted_cells", organism="human",
                            label_key="cell_type", params={"n_cells": 50, "n_genes": 40})
    assert not load_dataset(synthetic, backed=True).backed
    # obs and var are in memory either way.
    assert ds.adata.obs.equals(load_dataset(spec_for(path), backed=False).adata.obs)
    assert open_h5_files(path) == []


@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_backed_matrix_reads_like_the_matrix_in_memory(tmp_path, planted, storage):
    path = write(planted, tmp_path / f"{storage}.h5ad", storage=storage)
    X = load_dataset(spec_for(path), backed=True).adata.X
    M = planted.X.tocsr()
    assert isinstance(X, BackedMatrix) and X.storage == storage and X.dtype == M.dtype

    def same(a, b):
        assert sp.issparse(a) and a.format == "csr" and a.shape == b.shape
        assert (a != b).nnz == 0

    rng = np.random.default_rng(0)
    mask = rng.random(M.shape[0]) < 0.3
    shuffled = rng.choice(M.shape[0], size=300)  # unsorted, with repeats
    for index in [5, -1, slice(10, 40), slice(None, None, 7), slice(50, 10), shuffled, mask,
                  np.array([], dtype=int), [3, 1, 2]]:
        same(X[index], M[index])
    same(X[100:200, [5, 1, 9]], M[100:200][:, [5, 1, 9]])
    same(X[shuffled, 3:8], M[shuffled][:, 3:8])
    same(X.to_memory(), M)
    starts = []
    for start, block in iter_row_chunks(X, chunk_rows=250):
        starts.append(start)
        same(block, M[start : start + 250])
    assert starts == [0, 250, 500, 750, 1000]
    np.testing.assert_array_equal(row_sums(X), row_sums(M))
    with pytest.raises(TypeError, match="on disk"):
        np.asarray(X)
    with pytest.raises(IndexError):
        X[M.shape[0]]
    assert open_h5_files(path) == []


def validation_outcome(ds: Dataset) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            validate_dataset(ds, require=["batch"])
        except DatasetError as e:
            return f"error: {e}"
    return "ok; warnings: " + "; ".join(sorted(str(w.message) for w in caught))


def defect(kind: str) -> ad.AnnData:
    adata = planted_cells(n_cells=300, n_genes=80, seed=2)
    X = adata.X.toarray()
    if kind == "nan":
        X[17, 3] = np.nan
    elif kind == "negative":
        X[250, 7] = -2.0
    elif kind == "fraction":
        X[120, X[120] > 0] += 0.5
    elif kind == "empty":
        X[42] = 0.0
    elif kind == "log_integers":
        X = X * 20
    adata.X = sp.csr_matrix(X)
    return adata


@pytest.mark.parametrize("storage", ["csr", "dense"])
@pytest.mark.parametrize("kind", ["valid", "nan", "negative", "fraction", "empty", "log_integers"])
def test_backed_and_in_memory_validate_alike(tmp_path, kind, storage):
    path = write(defect(kind), tmp_path / "d.h5ad", storage=storage)
    expression = "log_normalized" if kind == "log_integers" else "raw_counts"
    spec = spec_for(path, batch_key="batch", expression=expression)
    in_memory = validation_outcome(load_dataset(spec, backed=False))
    on_disk = validation_outcome(load_dataset(spec, backed=True))
    assert on_disk == in_memory
    expected = {
        "valid": "ok", "nan": "non-finite", "negative": "negative values",
        "fraction": "non-integer values", "empty": "have no counts",
        "log_integers": "look like raw counts",
    }[kind]
    assert expected in in_memory


def test_csc_files_are_rewritten_row_major_once(tmp_path, planted, monkeypatch):
    # Tiny bands and column blocks: the conversion takes many passes.
    monkeypatch.setattr(row_major_module, "CSC_BAND_VALUES", 40_000)
    monkeypatch.setattr(row_major_module, "CHUNK_VALUES", 25_000)
    path = write(planted, tmp_path / "csc.h5ad", storage="csc")
    rewriting = r"stored column-major \(CSC\).*rewriting it row-major once"
    with pytest.warns(DatasetWarning, match=rewriting):
        ds = load_dataset(spec_for(path), backed=True)
    X = ds.adata.X
    assert X.storage == "csr" and X.path.parent == tmp_path / "cache" / "row_major"
    assert (X.to_memory() != planted.X).nnz == 0
    assert X.to_memory().has_sorted_indices
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copy is reused: no second warning
        again = load_dataset(spec_for(path), backed=True)
    assert again.adata.X.path == X.path
    validate_dataset(again)
    # Small CSC files are read into memory as CSR, as before.
    assert load_dataset(spec_for(path)).adata.X.format == "csr"


def test_corrupt_or_truncated_backed_files_raise_dataset_errors(tmp_path, planted):
    path = write(planted, tmp_path / "t.h5ad")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.h5ad"
    truncated.write_bytes(data[: len(data) // 2])
    cannot_read = r"dataset 'big': cannot read .*truncated\.h5ad as \.h5ad"
    with pytest.raises(DatasetError, match=cannot_read):
        load_dataset(spec_for(truncated), backed=True)

    broken = write(planted, tmp_path / "broken.h5ad")
    with h5py.File(broken, "a") as f:
        f["X/indptr"][-1] = f["X/indptr"][-1] + 5
    malformed = r"malformed sparse matrix at 'X' \(indptr runs from 0 to"
    with pytest.raises(DatasetError, match=malformed):
        load_dataset(spec_for(broken), backed=True)

    # The file goes bad after loading: the next read says so, in one line.
    ds = load_dataset(spec_for(path), backed=True)
    path.write_bytes(b"not HDF5 any more" * 100)
    corrupt = r"cannot read .*t\.h5ad as \.h5ad .*corrupt or truncated"
    with pytest.raises(DatasetError, match=corrupt) as e:
        validate_dataset(ds)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- streaming math


def scanpy_hvg(X: sp.csr_matrix, n_top: int) -> pd.DataFrame:
    ref = ad.AnnData(X=X.astype(np.float32))
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sc.pp.highly_variable_genes(ref, n_top_genes=n_top)
    return ref.var


def streamed_hvg(X: sp.csr_matrix, n_top: int, chunk: int = 97):
    totals = row_sums(X)
    scale = np.median(totals) / totals
    moments = ColumnMoments(X.shape[1])
    for start in range(0, X.shape[0], chunk):
        block = sp.diags(scale[start : start + chunk]) @ X[start : start + chunk].astype(np.float64)
        moments.add(block.tocsr())
    return highly_variable_seurat(moments.mean, moments.var, n_top)


@pytest.mark.parametrize("n_top", [100, 250])
def test_streamed_hvg_equal_scanpy_seurat(planted, n_top):
    hvg, norm = streamed_hvg(planted.X, n_top)
    ref = scanpy_hvg(planted.X, n_top)
    np.testing.assert_array_equal(hvg, ref["highly_variable"].to_numpy())
    np.testing.assert_allclose(norm, ref["dispersions_norm"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_streamed_hvg_edge_cases_match_scanpy():
    # Undetected genes (no dispersion), a gene of constant counts, and one gene so highly expressed
    # that it sits alone in its mean bin (normalised dispersion set to 1 by scanpy).
    X = planted_cells(n_cells=400, n_genes=300, seed=9).X.toarray()
    X[:, :5] = 0.0
    X[:, 5] = 3.0
    X[:, 6] = X[:, 6] * 50 + 400
    X = sp.csr_matrix(X)
    for n_top in (50, 299):
        hvg, norm = streamed_hvg(X, n_top)
        ref = scanpy_hvg(X, n_top)
        np.testing.assert_array_equal(hvg, ref["highly_variable"].to_numpy())
        expected = ref["dispersions_norm"].to_numpy()
        np.testing.assert_array_equal(np.isnan(norm), np.isnan(expected))
        np.testing.assert_allclose(norm, expected, rtol=1e-5, atol=1e-6)
    assert norm[6] == 1.0 and not hvg[:5].any() and np.isnan(norm[:5]).all()


def test_column_moments_do_not_depend_on_the_chunks(planted):
    X = planted.X.astype(np.float64)
    dense = X.toarray()
    for chunk in (1, 13, 1200):
        moments = ColumnMoments(X.shape[1])
        for start in range(0, X.shape[0], chunk):
            block = X[start : start + chunk]
            moments.add(block if chunk != 13 else block.toarray())
        np.testing.assert_allclose(moments.mean, dense.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments.var, dense.var(axis=0, ddof=1), rtol=1e-10, atol=1e-12)


def test_randomized_pca_recovers_a_low_rank_matrix_with_sklearn_signs():
    rng = np.random.default_rng(1)
    n, p, k = 500, 80, 6
    A = (rng.normal(size=(n, k)) * [50, 30, 20, 10, 5, 2]) @ rng.normal(size=(k, p)) + 3.0
    A += 0.01 * rng.normal(size=(n, p))
    mean = A.mean(axis=0)

    def blocks():
        for start in range(0, n, 64):
            yield start, sp.csr_matrix(A[start : start + 64])

    res = randomized_pca(blocks, n_rows=n, n_cols=p, mean=mean, n_comps=k, seed=3,
                         total_variance=A.var(axis=0, ddof=1).sum())
    u, s, vt = np.linalg.svd(A - mean, full_matrices=False)
    signs = svd_flip_rows(vt[:k])
    np.testing.assert_allclose(res.singular_values, s[:k], rtol=1e-8)
    np.testing.assert_allclose(res.components, vt[:k] * signs[:, None], atol=1e-8)
    np.testing.assert_allclose(res.scores, (u[:, :k] * s[:k]) * signs, atol=1e-3)
    assert np.all(res.components[np.arange(k), np.abs(res.components).argmax(axis=1)] > 0)
    assert res.n_passes == 2 * 3 + 2 and 0.999 < res.explained_variance_ratio.sum() <= 1.0
    again = randomized_pca(blocks, n_rows=n, n_cols=p, mean=mean, n_comps=k, seed=3)
    np.testing.assert_array_equal(again.scores, res.scores)


# --------------------------------------------------------------------------- baselines


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.sum(a * b, axis=0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


@pytest.mark.parametrize("expression", ["raw_counts", "log_normalized"])
def test_streamed_pca_baseline_matches_scanpy(planted, stream_always, expression):
    ref = planted.copy()
    if expression == "log_normalized":
        sc.pp.normalize_total(ref, target_sum=1e4)
        sc.pp.log1p(ref)
    adata = ref.copy()
    ds = Dataset(spec=spec_for(Path("x.h5ad"), expression=expression), adata=adata)
    emb = PCABaseline(n_top_genes=200, n_comps=30).embed(ds, seed=0)
    assert emb.info["solver"] == "streamed_randomized"
    assert emb.info["streaming"]["n_passes"] == (10 if expression == "raw_counts" else 9)

    if expression == "raw_counts":
        sc.pp.normalize_total(ref)
        sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, n_top_genes=200)
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.pca(ref, n_comps=30, random_state=0)
    assert emb.info["n_genes_used"] == 200
    variance = ref.uns["pca"]["variance"]
    # Components well above the tail of the spectrum (the planted structure) agree;
    # trailing ones among near-equal eigenvalues (noise) need not.
    separated = np.flatnonzero(variance > 2 * variance[-1])
    assert separated.size >= 10
    assert cosines(emb.values, ref.obsm["X_pca"])[separated].min() > 0.999
    scale = np.abs(ref.obsm["X_pca"]).max()
    signs = np.sign(np.sum(emb.values * ref.obsm["X_pca"], axis=0))
    diff = np.abs(emb.values * signs - ref.obsm["X_pca"])[:, separated].max()
    assert diff < 0.01 * scale
    # The subspace as a whole: nearly all the variance ARPACK's 30 components explain.
    exact = ref.uns["pca"]["variance_ratio"].sum()
    assert exact * 0.98 < emb.info["explained_variance_ratio"] <= exact * 1.0001


def test_streamed_raw_pca_matches_exact_pca(planted, stream_always):
    from sklearn.decomposition import PCA

    ds = Dataset(spec=spec_for(Path("x.h5ad")), adata=planted.copy())
    emb = RawPCABaseline(n_comps=10).embed(ds)
    dense = planted.X.toarray().astype(np.float64)
    with threadpool_limits(limits=1, user_api="blas"):  # small: threads only get in the way
        ref = PCA(n_components=10, svd_solver="full").fit(dense)
        expected = ref.transform(dense)
    separated = np.flatnonzero(ref.explained_variance_ > 2 * ref.explained_variance_[-1])
    assert separated.size >= 5
    assert cosines(emb.values, expected)[separated].min() > 0.999
    assert emb.info["explained_variance_ratio"] == pytest.approx(
        ref.explained_variance_ratio_.sum(), rel=1e-3
    )


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("cls", [PCABaseline, RawPCABaseline])
def test_backed_and_in_memory_pca_are_identical(tmp_path, planted, monkeypatch, cls, streamed):
    if streamed:
        monkeypatch.setattr(pca_module, "STREAMED_PCA_MIN_VALUES", 0)
    path = write(planted, tmp_path / "p.h5ad")
    params = {"n_top_genes": 300, "n_comps": 20} if cls is PCABaseline else {"n_comps": 20}
    a = cls(**params).embed(load_dataset(spec_for(path), backed=False), seed=1)
    b = cls(**params).embed(load_dataset(spec_for(path), backed=True), seed=1)
    assert a.info["solver"] == b.info["solver"] == ("streamed_randomized" if streamed else "arpack")
    np.testing.assert_array_equal(a.values, b.values)
    assert open_h5_files(path) == []


def test_streamed_pca_memory_does_not_grow_with_the_matrix(tmp_path, monkeypatch, stream_always):
    """Peak allocations are O(chunk + cells x components): 3x the non-zeros, same peak."""
    monkeypatch.setattr(matrix_module, "CHUNK_VALUES", 1 << 15)
    n_cells, n_genes = 2000, 4000
    rng = np.random.default_rng(0)
    warm = Dataset(spec=spec_for(Path("w.h5ad")), adata=planted_cells(n_cells=100, n_genes=200))
    with warnings.catch_warnings():  # imports and first-call set-up are not the matrix's
        warnings.simplefilter("ignore", EmbeddingWarning)
        PCABaseline(n_top_genes=50, n_comps=5).embed(warm)
        RawPCABaseline(n_comps=5).embed(warm)
    peaks = {}
    for density in (0.1, 0.3):
        X = sp.random(n_cells, n_genes, density=density, format="csr", dtype=np.float32,
                      random_state=rng,
                      data_rvs=lambda k: rng.integers(1, 20, k).astype(np.float32))
        adata = ad.AnnData(X=X)
        adata.obs["cell_type"] = "t"
        path = write(adata, tmp_path / f"m{density}.h5ad")
        ds = load_dataset(spec_for(path, gene_id_type="symbol"), backed=True)
        for baseline in (PCABaseline(n_top_genes=1000, n_comps=10), RawPCABaseline(n_comps=10)):
            tracemalloc.start()
            try:
                baseline.embed(ds)
                peaks[baseline.name, density] = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        matrix_bytes = X.nnz * 8  # float32 values + int32 indices
    for name in ("pca", "pca_raw"):
        small, large = peaks[name, 0.1], peaks[name, 0.3]
        assert large < 1.25 * small, f"{name}: peak {small / 1e6:.1f} MB -> {large / 1e6:.1f} MB"
        assert large < matrix_bytes / 3, f"{name}: peak {large / 1e6:.1f} MB, matrix {matrix_bytes}"


# --------------------------------------------------------------------------- consumers


def test_model_input_from_a_backed_matrix_is_the_same_file(tmp_path, planted):
    path = write(planted, tmp_path / "p.h5ad")
    spec = ModelSpec(name="tiny", kind="docker", image="x:1", container="tiny", input="raw_counts")
    written = {}
    for backed in (False, True):
        ds = load_dataset(spec_for(path, gene_id_type="ensembl", batch_key="batch"), backed=backed)
        request = build_request(spec, ds, seed=0, device="cpu", variant="default",
                                gene_id_type="ensembl")
        write_input(ds, tmp_path / f"in{backed}", request)
        written[backed] = ad.read_h5ad(tmp_path / f"in{backed}" / "dataset.h5ad")
    a, b = written[False], written[True]
    assert b.X.format == "csr" and b.X.dtype == np.float32 and (a.X != b.X).nnz == 0
    assert (b.X != planted.X).nnz == 0
    assert a.obs.equals(b.obs) and a.var.equals(b.var)
    assert open_h5_files(path) == []


def test_task_expression_and_perturbation_counts_from_a_backed_matrix(tmp_path):
    from czb.models.predictors import perturbation_data
    from czb.pipeline.dataset_views import dataset_expression
    from czb.specs.catalog import Catalog

    spec = Catalog.load().dataset("synthetic_perturbations")
    generated = load_dataset(spec)
    path = write(generated.adata, tmp_path / "screen.h5ad")
    on_disk = load_dataset(spec.model_copy(update={"uri": str(path)}), backed=True)
    assert on_disk.backed
    a, b = perturbation_data(generated), perturbation_data(on_disk)
    assert sp.issparse(b.counts) and (a.counts != b.counts).nnz == 0
    np.testing.assert_array_equal(a.genes, b.genes)

    cells = np.sort(np.random.default_rng(0).choice(generated.n_cells, size=500, replace=False))
    ea, eb = dataset_expression(generated, cells), dataset_expression(on_disk, cells)
    assert eb.X.shape == ea.X.shape and not isinstance(eb.X, np.ndarray)
    rows = np.array([4, 0, 499, 17])
    assert (ea.rows(rows) != eb.rows(rows)).nnz == 0
    np.testing.assert_allclose(ea.gene_means(), eb.gene_means(), rtol=1e-12)
    assert dataset_expression(on_disk).X is on_disk.adata.X
    assert re.search(r"BackedMatrix\(.*screen\.h5ad", repr(on_disk.adata.X))
