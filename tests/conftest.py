import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch):
    """Every test gets its own cache and output folders and no user spec folders."""
    base = tmp_path_factory.mktemp("czb-home")
    monkeypatch.setenv("CZB_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("CZB_OUTPUT_DIR", str(base / "results"))
    monkeypatch.delenv("CZB_CONFIG_PATH", raising=False)
    monkeypatch.setenv("CZB_N_JOBS", "2")


def planted_embedding(n_cells=900, n_types=5, n_batches=3, dim=20, *, separation=4.0, batch_shift=0.8, seed=0):
    """Gaussian clusters per cell type plus a batch offset: (X, labels, batches)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    centers = rng.normal(size=(n_types, dim)) * separation
    shifts = rng.normal(size=(n_batches, dim)) * batch_shift
    X = centers[labels] + shifts[batches] + rng.normal(size=(n_cells, dim))
    return X, np.array([f"type{i}" for i in labels]), np.array([f"batch{b}" for b in batches])


@pytest.fixture
def planted():
    return planted_embedding()
