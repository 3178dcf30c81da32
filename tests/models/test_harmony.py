"""Tests of the ``harmony`` baseline (czb.models.harmony, HarmonyBaseline)."""

from __future__ import annotations

import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from czb.core.errors import EmbeddingError, EmbeddingWarning, NotApplicableError
from czb.data.dataset import Dataset
from czb.data.synthetic.cells import planted_cells
from czb.evaluation.metrics.mixing import ilisi_normalized
from czb.models.baselines import BASELINES, HarmonyBaseline, PCABaseline
from czb.models.harmony import batch_codes, harmonize, n_clusters_for
from czb.models.sources import source_for_model
from czb.specs.catalog import Catalog
from czb.specs.schema import DatasetSpec

#: harmonypy 0.0.10's corrections, made by benchmarks/reference_harmony.py.
REFERENCE = Path(__file__).parents[1] / "fixtures" / "harmonypy_0.0.10_reference.npz"
CASES = ("three_batches", "four_batches_seed8")
#: |czb - harmonypy| allowed, on coordinates of magnitude ~10: both run the same float64
#: arithmetic in a different order (seen: < 2e-13).
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as f:
        return {key: f[key] for key in f.files}


def _case(reference, name):
    return (reference[f"{name}/z"], reference[f"{name}/batch"], int(reference[f"{name}/seed"]))


@pytest.mark.parametrize("name", CASES)
def test_equals_harmonypy_from_the_same_centroids(reference, name):
    z, batch, seed = _case(reference, name)
    result = harmonize(z, batch, seed=seed, centroids=reference[f"{name}/centroids"])
    expected = reference[f"{name}/corrected"]
    assert np.abs(expected - z).max() > 1.0  # there is a correction to match
    assert np.abs(result.corrected - expected).max() < TOLERANCE
    assert result.kmeans_rounds == reference[f"{name}/kmeans_rounds"].tolist()
    np.testing.assert_allclose(result.objective, reference[f"{name}/objective"], rtol=1e-10)
    assert result.converged and result.n_iterations == len(result.objective) - 1


@pytest.mark.parametrize("name", CASES)
def test_equals_harmonypy_with_its_seeded_kmeans(reference, name):
    """The whole path, k-means included: the same scikit-learn k-means from the same seed."""
    made_with = str(reference["versions"][2])
    if version("scikit-learn") != made_with:
        pytest.skip(f"reference k-means from scikit-learn {made_with}, here {version('scikit-learn')}")
    z, batch, seed = _case(reference, name)
    result = harmonize(z, batch, seed=seed)
    assert np.abs(result.corrected - reference[f"{name}/corrected"]).max() < TOLERANCE


def test_a_cell_at_the_origin_stays_finite(reference):
    z, batch, seed = _case(reference, CASES[0])
    z = z.copy()
    z[0] = 0.0  # no direction: its cosine distance to every centroid is 2
    result = harmonize(z, batch, seed=seed, centroids=reference[f"{CASES[0]}/centroids"])
    assert np.isfinite(result.corrected).all()


def test_batch_codes_and_cluster_count():
    codes, names = batch_codes(np.array(["b", "a", None, "b"], dtype=object))
    assert codes.tolist() == [1, 0, -1, 1] and names == ["a", "b"]
    assert [n_clusters_for(n) for n in (10, 45, 900, 10**6)] == [1, 2, 30, 100]


@pytest.mark.parametrize(("z", "codes", "match"), [
    (np.ones((1, 3)), np.zeros(1, dtype=int), "at least 2 cells"),
    (np.array([[0.0, np.nan], [1.0, 1.0]]), np.zeros(2, dtype=int), "finite"),
    (np.ones((3, 2)), np.zeros(2, dtype=int), "3 integers"),
    (np.ones((3, 2)), np.array([0.0, 1.0, 1.0]), "3 integers"),
    (np.ones((3, 2)), np.full(3, -1), "no cell has a batch"),
])
def test_harmonize_refuses_bad_input(z, codes, match):
    with pytest.raises(EmbeddingError, match=match):
        harmonize(z, codes, seed=0)


# ----------------------------------------------------------------------------- the baseline


def _dataset(*, batch_key="batch", n_cells=900, n_batches=3, name="planted") -> Dataset:
    adata = planted_cells(n_cells=n_cells, n_genes=600, n_cell_types=4, n_batches=n_batches, seed=0)
    spec = DatasetSpec(name=name, uri="synthetic:x", organism="human", label_key="cell_type",
                       batch_key=batch_key)
    return Dataset(spec=spec, adata=adata)


@pytest.fixture(scope="module")
def planted() -> Dataset:
    return _dataset()


@pytest.fixture(scope="module")
def embedded(planted):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)  # nothing to warn about here
        harmony = HarmonyBaseline().embed(planted, seed=0)
    return PCABaseline().embed(planted, seed=0), harmony


def _ilisi(values, batches) -> float:
    dist, idx = NearestNeighbors(n_neighbors=31).fit(values).kneighbors(values)
    return ilisi_normalized(idx[:, 1:], dist[:, 1:], batches)


def _knn_accuracy(values, labels) -> float:
    return float(cross_val_score(KNeighborsClassifier(15), values, labels.astype(str), cv=5).mean())


def test_removes_the_batch_shift_and_keeps_the_cell_types(planted, embedded):
    pca, harmony = embedded
    assert harmony.values.shape == pca.values.shape == (900, 50)
    assert harmony.values.dtype == np.float32 and harmony.cell_index is None
    before, after = _ilisi(pca.values, planted.batches), _ilisi(harmony.values, planted.batches)
    assert before < 0.1 and after > 0.5  # batches apart in PCA, mixed after Harmony
    assert _knn_accuracy(harmony.values, planted.labels) > 0.95


def test_records_what_ran(embedded):
    pca, harmony = embedded
    info = harmony.info
    assert info["parameters"] == {"n_top_genes": 3000, "n_comps": 50, "max_iter_harmony": 10}
    assert info["harmony"] == {**info["harmony"], "batch_key": ["batch"], "n_batches": 3,
                               "n_cells_without_batch": 0, "n_clusters": 30, "seed": 0}
    assert info["n_genes_used"] == pca.info["n_genes_used"] and info["solver"] == "arpack"


def test_is_seeded_and_deterministic(planted, embedded):
    again = HarmonyBaseline().embed(planted, seed=0)
    assert np.array_equal(again.values, embedded[1].values)
    other = HarmonyBaseline().embed(planted, seed=1)
    assert not np.array_equal(other.values, embedded[1].values)


def test_corrects_the_pca_baselines_components(planted, embedded):
    """Harmony of exactly what the ``pca`` baseline embeds, with the same seed."""
    pca, harmony = embedded
    codes, _ = batch_codes(planted.batches)
    expected = harmonize(pca.values, codes, seed=0).corrected.astype(np.float32)
    assert np.array_equal(harmony.values, expected)
    assert np.median(np.linalg.norm(harmony.values - pca.values, axis=1)) > 1.0


def test_without_a_batch_key_is_not_applicable():
    ds = _dataset(batch_key=None, n_cells=60, name="nobatch")
    with pytest.raises(NotApplicableError, match="'nobatch' declares no batch_key"):
        HarmonyBaseline().embed(ds, seed=0)


def test_one_batch_is_not_applicable():
    ds = _dataset(n_cells=60, n_batches=1, name="onebatch")
    with pytest.raises(NotApplicableError, match="'onebatch' has 1 batch in obs batch; Harmony needs at least 2"):
        HarmonyBaseline().embed(ds, seed=0)


def test_the_pipeline_records_not_applicable():
    from czb.pipeline.scoring import embed_dataset

    embedded = embed_dataset(HarmonyBaseline(), _dataset(batch_key=None, n_cells=60, name="nobatch"), seed=0)
    assert embedded.status == "not_applicable" and "declares no batch_key" in embedded.error


def test_cells_without_a_batch_are_kept_uncorrected():
    ds = _dataset(n_cells=300, name="gaps")
    ds.adata.obs["batch"] = ds.adata.obs["batch"].astype(object)
    ds.adata.obs.loc[ds.adata.obs_names[:20], "batch"] = np.nan
    with pytest.warns(EmbeddingWarning, match="20 cells of gaps have no batch"):
        harmony = HarmonyBaseline().embed(ds, seed=0)
    pca = PCABaseline().embed(ds, seed=0)
    assert np.array_equal(harmony.values[:20], pca.values[:20])
    assert not np.allclose(harmony.values[20:], pca.values[20:])
    assert harmony.info["harmony"]["n_cells_without_batch"] == 20


def test_bundled_spec_lists_and_builds_it():
    catalog = Catalog.load()
    spec = catalog.models["harmony"]
    assert spec.kind == "baseline" and "harmony" in BASELINES
    source = source_for_model(spec)
    assert isinstance(source, HarmonyBaseline)
    assert source.parameters == {"n_top_genes": 3000, "n_comps": 50, "max_iter_harmony": 10}


def test_in_every_bundled_suite_that_scores_batch_integration():
    catalog = Catalog.load()
    suites = {name: s for name, s in catalog.suites.items() if s.models}
    scored = [name for name, s in suites.items() if "batch_integration" in s.tasks]
    assert scored and all("harmony" in suites[name].models for name in scored), scored
    # Not where species are the batches: each species is embedded on its own.
    assert not any("harmony" in s.models for s in suites.values() if "cross_species_integration" in s.tasks)


def test_czb_list_models_shows_it():
    from typer.testing import CliRunner

    from czb.cli import app

    result = CliRunner().invoke(app, ["list", "models"])
    assert result.exit_code == 0, result.output
    assert any(line.split()[:2] == ["harmony", "baseline"] for line in result.output.splitlines())
