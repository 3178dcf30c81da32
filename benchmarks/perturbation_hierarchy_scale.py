"""Time and peak memory of the perturbation hierarchy's scalable steps on large screens.

Usage::

    python benchmarks/perturbation_hierarchy_scale.py [--sizes 100000x1000 1000000x10000] [--dims 64]

For each size (cells x perturbed genes) a random embedding is drawn with a planted
per-perturbation offset, and these steps are timed: post-processing (center_scale,
TVN), consistency (mean pairwise cosine of every perturbation's cells), and
known-relationship recall (perturbation means, all-pairs cosine, sorted null, tail
recall and mAP against 50,000 random known pairs). The reference code's versions
densify the genes x cells matrix (consistency) and build a P x P DataFrame with a
per-pair Python loop (recall). Prints one table row per step and size.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import scipy.sparse as sp

from czb.evaluation.metrics import perturbation_analysis as pa
from czb.evaluation.perturbation_analysis import ScreenDesign, postprocess


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def screen(n_cells: int, n_perts: int, dims: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # 5% controls (code n_perts), the rest spread over the perturbations.
    perts = np.where(rng.random(n_cells) < 0.05, n_perts, rng.integers(0, n_perts, size=n_cells))
    offsets = rng.normal(size=(n_perts + 1, dims)).astype(np.float32)
    offsets[n_perts] = 0
    X = rng.normal(size=(n_cells, dims)).astype(np.float32) + offsets[perts]
    batches = rng.integers(0, 100, size=n_cells).astype(str)
    labels = np.where(perts == n_perts, "ctrl", np.char.add("G", perts.astype(str)))
    return X, ScreenDesign.from_roles(labels, perts == n_perts, batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["100000x1000", "1000000x10000"])
    parser.add_argument("--dims", type=int, default=64)
    args = parser.parse_args()
    print(f"{'cells':>9} {'perts':>6} {'step':<28} {'seconds':>8} {'peak RSS GB':>12}")
    for size in args.sizes:
        n_cells, n_perts = map(int, size.split("x"))
        X, design = screen(n_cells, n_perts, args.dims)

        def timed(step, fn):
            t = time.perf_counter()
            out = fn()
            print(f"{n_cells:>9} {n_perts:>6} {step:<28} {time.perf_counter() - t:>8.1f} {peak_rss_gb():>12.2f}",
                  flush=True)
            return out

        timed("postprocess center_scale", lambda: postprocess(X, design, "center_scale"))
        Xt = timed("postprocess tvn", lambda: postprocess(X, design, "tvn"))
        perturbed = np.flatnonzero(~design.controls)
        genes, codes = np.unique(design.perturbations[perturbed], return_inverse=True)
        timed("consistency (all perts)", lambda: pa.mean_pairwise_cosine(Xt[perturbed], codes, len(genes)))

        def recall():
            sums = np.zeros((len(genes), Xt.shape[1]))
            np.add.at(sums, codes, Xt[perturbed])
            S = pa.cosine_matrix(sums / np.bincount(codes)[:, None])
            null = np.sort(pa.upper_triangle(S))
            rng = np.random.default_rng(1)
            i, j = rng.integers(0, len(genes), size=(2, 50_000))
            keep = i != j
            i, j = i[keep], j[keep]
            value = pa.tail_recall(null, S[i, j].astype(np.float64))
            adjacency = sp.coo_matrix((np.ones(2 * len(i), bool), (np.r_[i, j], np.r_[j, i])),
                                      shape=S.shape).tocsr()
            return value, pa.mean_average_precision(S, adjacency)

        timed("recall + mAP (50k pairs)", recall)
        del X, Xt, design


if __name__ == "__main__":
    main()
