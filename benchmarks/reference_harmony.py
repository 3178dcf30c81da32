"""Reference Harmony corrections from harmonypy 0.0.10, for tests/fixtures.

harmonypy is GPL-3.0 and not a czb dependency: run this in a separate virtual
environment with the versions of constraints.txt::

    python -m venv /tmp/harmony-venv
    /tmp/harmony-venv/bin/pip install -c constraints.txt harmonypy==0.0.10 numpy pandas scikit-learn scipy
    /tmp/harmony-venv/bin/python benchmarks/reference_harmony.py tests/fixtures/harmonypy_0.0.10_reference.npz

Each case is seeded blobs (cell types in ``dim`` dimensions, unequal type shares per
batch) with a random shift per batch. harmonypy runs with the parameters czb uses
(theta=2, lamb=1; its other defaults: sigma=0.1, nclust=min(100, round(n/30)),
block_size=0.05, 10 rounds, 20 clustering iterations, epsilon 1e-4 / 1e-5) and its own
seeded k-means (``random_state=seed``). Saved per case ``NAME``: ``NAME/z`` (input,
cells x dim), ``NAME/batch`` (codes of the sorted batch names), ``NAME/seed``,
``NAME/centroids`` (harmonypy's initial k-means centroids), ``NAME/corrected``
(``Z_corr``, cells x dim), ``NAME/objective`` (``objective_harmony``) and
``NAME/kmeans_rounds``; plus ``versions`` (harmonypy, numpy, scikit-learn).
"""

import sys
from importlib.metadata import version

import numpy as np
import pandas as pd
from harmonypy import run_harmony
from harmonypy.harmony import Harmony
from threadpoolctl import threadpool_limits

CASES = {
    # name: (cells per batch, types, dim, batch shift, seed)
    "three_batches": ((150, 120, 180), 4, 10, 3.0, 0),
    "four_batches_seed8": ((90, 210, 60, 150), 5, 10, 2.0, 8),
}


def blobs(sizes, n_types, dim, shift, seed):
    """Cell types as Gaussian blobs, each batch with its own type shares and offset."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(n_types, dim))
    z, batch = [], []
    for b, n in enumerate(sizes):
        shares = rng.dirichlet(np.full(n_types, 2.0))
        types = rng.choice(n_types, size=n, p=shares)
        offset = rng.normal(scale=shift, size=dim)
        z.append(centers[types] + offset + rng.normal(size=(n, dim)))
        batch.append(np.full(n, b))
    return np.vstack(z), np.concatenate(batch)


def main(path):
    out = {"versions": np.array([version("harmonypy"), np.__version__, version("scikit-learn")])}
    for name, (sizes, n_types, dim, shift, seed) in CASES.items():
        z, batch = blobs(sizes, n_types, dim, shift, seed)
        # harmonypy scales each cell by its largest coordinate before the cosine
        # normalisation; czb does not: the same only when that is positive.
        assert (z.max(axis=1) > 0).all()
        meta = pd.DataFrame({"batch": [f"b{b}" for b in batch]})
        z_cos = z / z.max(axis=1, keepdims=True)  # as harmonypy computes what it clusters
        z_cos /= np.linalg.norm(z_cos, axis=1, keepdims=True)
        k = int(min(round(len(z) / 30), 100))
        # One OpenMP thread: scikit-learn's k-means is then bit-for-bit reproducible.
        with threadpool_limits(limits=1, user_api="openmp"):
            centroids = Harmony._cluster_kmeans(z_cos, k, random_state=seed)
            ho = run_harmony(z, meta, "batch", theta=2, lamb=1, random_state=seed, verbose=False)
        out.update({
            f"{name}/z": z, f"{name}/batch": batch, f"{name}/seed": np.array(seed),
            f"{name}/centroids": centroids, f"{name}/corrected": ho.Z_corr.T,
            f"{name}/objective": np.array(ho.objective_harmony),
            f"{name}/kmeans_rounds": np.array(ho.kmeans_rounds),
        })
    np.savez_compressed(path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
