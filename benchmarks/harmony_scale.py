"""Time and peak memory of czb's Harmony on many cells × 50 principal components.

Usage::

    python benchmarks/harmony_scale.py --cells 50000 200000 [--batches 8] [--threads 2]

For each size: seeded blobs (30 cell types, ``--batches`` batches each with its own
offset and type shares) in 50 dimensions, then :func:`czb.models.harmony.harmonize` with
the defaults of the ``harmony`` baseline. Prints one JSON line per size: wall seconds of
the k-means that seeds the clusters and of the whole run, rounds, the peak resident
memory of this process above what it held before (sampled every 20 ms with psutil), and
the median share of other-batch cells among each cell's 30 nearest neighbours (on 20,000
cells) before and after, as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np


def blobs(n_cells: int, n_batches: int, *, dim: int = 50, n_types: int = 30, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(n_types, dim))
    batch = rng.integers(0, n_batches, n_cells)
    shares = rng.dirichlet(np.full(n_types, 2.0), size=n_batches)
    cell_type = np.empty(n_cells, dtype=np.int64)
    for b in range(n_batches):
        idx = np.flatnonzero(batch == b)
        cell_type[idx] = rng.choice(n_types, size=len(idx), p=shares[b])
    offsets = rng.normal(scale=1.5, size=(n_batches, dim))
    z = centers[cell_type] + offsets[batch] + rng.normal(size=(n_cells, dim))
    return z.astype(np.float32), batch


class PeakRSS:
    """Peak resident memory above the start, sampled in a thread."""

    def __enter__(self):
        import psutil

        self.proc, self.start = psutil.Process(), psutil.Process().memory_info().rss
        self.peak, self.done = self.start, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def other_batch_share(z: np.ndarray, batch: np.ndarray, *, n: int = 20_000, k: int = 30) -> float:
    from sklearn.neighbors import NearestNeighbors

    rows = np.random.default_rng(1).choice(len(z), size=min(n, len(z)), replace=False)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z[rows]).kneighbors(z[rows])
    return float(np.median((batch[rows][idx[:, 1:]] != batch[rows][:, None]).mean(axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: all)")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    from czb.models import harmony as H

    with threadpool_limits(limits=args.threads, user_api="blas"):
        for n in args.cells:
            z, batch = blobs(n, args.batches)
            unit = z.astype(np.float64)
            unit /= np.linalg.norm(unit, axis=1, keepdims=True)
            t0 = time.perf_counter()
            H.kmeans_centroids(unit, H.n_clusters_for(n), seed=0)
            kmeans_s = time.perf_counter() - t0
            del unit
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                result = H.harmonize(z, batch, seed=0)
                total_s = time.perf_counter() - t0
            print(json.dumps({
                "cells": n, "dim": z.shape[1], "batches": args.batches, "clusters": result.n_clusters,
                "kmeans_s": round(kmeans_s, 1), "harmonize_s": round(total_s, 1),
                "rounds": result.n_iterations, "converged": result.converged,
                "kmeans_rounds": result.kmeans_rounds, "peak_rss_mb": round(mem.mb),
                "other_batch_share_before": round(other_batch_share(z, batch), 3),
                "other_batch_share_after": round(other_batch_share(result.corrected, batch), 3),
            }), flush=True)


if __name__ == "__main__":
    main()
