"""benchmarks/heldout_data.py: the atlas-size arrays equal the written held-out files."""

import sys
from pathlib import Path

import anndata as ad
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from heldout_data import embedding_arrays, write_heldout  # noqa: E402


def test_embedding_arrays_equal_the_written_embedding_and_obs(tmp_path):
    h5ad, npy = write_heldout(700, tmp_path, seed=3, chunk_size=256)
    arrays = embedding_arrays(700, seed=3, chunk_size=256)
    np.testing.assert_array_equal(arrays["X"], np.load(npy))
    obs = ad.read_h5ad(h5ad, backed="r").obs
    assert (arrays["labels"] == obs["cell_type"].astype(str).to_numpy()).all()
    assert (arrays["batches"] == obs["batch"].astype(str).to_numpy()).all()
    assert (arrays["time_points"] == obs["time"].to_numpy()).all()
    assert len(np.unique(arrays["labels"])) > 10 and len(np.unique(arrays["batches"])) == 6
