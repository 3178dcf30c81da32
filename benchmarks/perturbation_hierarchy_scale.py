"""Time and peak memory of every task of the perturbation-analysis hierarchy on large screens.

Usage::

    python benchmarks/perturbation_hierarchy_scale.py [--sizes 1000000x10000] [--dims 64]
        [--genes 2000] [--density 1.0] [--postprocessing tvn] [--tasks ...]

For each size (cells x perturbed genes) a synthetic screen is drawn: 100 batches, 5%
controls, an embedding with a planted per-perturbation offset and a per-batch shift,
sparse raw counts (cells x ``--genes``, about 13% non-zero, never densified, independent
of the embedding) whose first 200 genes are nearly unexpressed (their perturbations have
no effect: the consistency null), and ``--pairs`` random known
gene pairs (the recall source, a CSV). Then:

- the design and the seeded split, and the post-processings ``center_scale`` and
  ``tvn`` on their own;
- every hierarchy task end to end through :class:`~czb.evaluation.context.EvaluationContext`
  and :func:`~czb.evaluation.runner.run_task` (seed 0) on the ``--postprocessing`` variants
  (default ``tvn`` only; each further variant repeats a task's scoring), in one context
  as a run shares it (the design, split, post-processed copies and gene means are
  memoised by the first task that needs them).

Prints one row per step: wall seconds and the peak RSS sampled during the step
(:func:`czb.evaluation.resources.measure`, whole process), then each task's metrics.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from czb.data.relationship_sources import load_sources
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.expression import Expression
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign, split_screen
from czb.evaluation.perturbation.hierarchy.postprocessing import postprocess
from czb.evaluation.registry import get_task, load_all
from czb.evaluation.resources import measure
from czb.evaluation.runner import run_task

TASKS = ("perturbation_ilisi", "perturbation_linear_probe", "perturbation_consistency", "perturbation_knn",
         "perturbation_recall", "perturbation_reconstruction")
N_BATCHES = 100
N_UNEXPRESSED = 200


def screen(n_cells: int, n_perts: int, dims: int, signal: float, seed: int = 0):
    """Labels, control flags, batches and a planted float32 embedding."""
    rng = np.random.default_rng(seed)
    # 5% controls (code n_perts), the rest spread over the perturbations.
    perts = np.where(rng.random(n_cells) < 0.05, n_perts, rng.integers(0, n_perts, size=n_cells))
    batches = rng.integers(0, N_BATCHES, size=n_cells)
    offsets = (signal * rng.normal(size=(n_perts + 1, dims))).astype(np.float32)
    offsets[n_perts] = 0
    offsets[:N_UNEXPRESSED] = 0  # knocking down an unexpressed gene does nothing (the consistency null)
    shifts = (0.3 * rng.normal(size=(N_BATCHES, dims))).astype(np.float32)
    X = rng.normal(size=(n_cells, dims)).astype(np.float32)
    X += offsets[perts]
    X += shifts[batches]
    labels = np.where(perts == n_perts, "non-targeting", np.char.add("G", perts.astype(str)))
    return X, labels, perts == n_perts, batches.astype(str)


def counts(n_cells: int, n_genes: int, seed: int = 1, chunk: int = 8192, density: float = 1.0) -> sp.csr_matrix:
    """Sparse raw counts: gene g non-zero with probability p_g (0.002 for the first
    N_UNEXPRESSED genes, log-uniform in [0.05, 0.3] times ``density`` otherwise), counts
    1 + Poisson(1)."""
    rng = np.random.default_rng(seed)
    p = (density * np.exp(rng.uniform(np.log(0.05), np.log(0.3), n_genes))).astype(np.float32)
    p[:N_UNEXPRESSED] = 0.002
    indices, data, indptr = [], [], [np.zeros(1, np.int64)]
    nnz = 0
    for start in range(0, n_cells, chunk):
        m = min(chunk, n_cells - start)
        flat = np.flatnonzero(rng.random((m, n_genes), dtype=np.float32) < p)
        rows, cols = np.divmod(flat, n_genes)
        indices.append(cols.astype(np.int32))
        data.append((1 + rng.poisson(1.0, size=len(flat))).astype(np.float32))
        indptr.append(nnz + np.cumsum(np.bincount(rows, minlength=m)))
        nnz += len(flat)
    return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)),
                         shape=(n_cells, n_genes))


def relationship_file(n_perts: int, n_pairs: int, folder: Path) -> str:
    rng = np.random.default_rng(2)
    i, j = rng.integers(0, n_perts, size=(2, n_pairs))
    keep = i != j
    path = folder / "random_pairs.csv"
    lines = ["entity1,entity2", *(f"G{a},G{b}" for a, b in zip(i[keep], j[keep]))]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1000000x10000"])
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--density", type=float, default=1.0,
                        help="scales the genes' non-zero probabilities (1: about 13%% non-zeros)")
    parser.add_argument("--signal", type=float, default=0.5, help="scale of the planted perturbation offsets")
    parser.add_argument("--pairs", type=int, default=50_000, help="random known pairs (recall)")
    parser.add_argument("--postprocessing", nargs="+", default=["tvn"],
                        choices=["none", "center", "center_scale", "tvn"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args()
    load_all()
    print(f"{'cells':>9} {'perts':>6} {'step':<34} {'seconds':>8} {'peak RSS GB':>12}", flush=True)
    results = []
    for size in args.sizes:
        n_cells, n_perts = map(int, size.split("x"))

        def row(step: str, seconds: float, peak_gb: float) -> None:
            print(f"{n_cells:>9} {n_perts:>6} {step:<34} {seconds:>8.1f} {peak_gb:>12.2f}", flush=True)

        def timed(step, fn):
            with measure() as usage:
                out = fn()
            row(step, usage.runtime_s, usage.peak_memory_mb / 1024)
            return out

        X, labels, controls, batches = timed(
            f"synthetic embedding ({args.dims} dims)", lambda: screen(n_cells, n_perts, args.dims, args.signal))
        Y = timed(f"synthetic counts ({args.genes} genes)", lambda: counts(n_cells, args.genes, density=args.density))
        print(f"# counts: {Y.nnz / 1e6:.0f}M non-zeros ({Y.nnz / (n_cells * args.genes):.1%}), "
              f"{(Y.data.nbytes + Y.indices.nbytes + Y.indptr.nbytes) / 2**30:.2f} GB", flush=True)
        design = timed("design + split", lambda: (ScreenDesign.from_roles(labels, controls, batches),))[0]
        split = split_screen(design, 0.7, seed=0)
        print(f"# split: train {len(split.train)}, test1 {len(split.test1)}, test2 {len(split.test2)} cells",
              flush=True)
        for kind in ("center_scale", "tvn"):  # arguments bound now: X and design are deleted below
            timed(f"postprocess {kind}", lambda X=X, design=design, kind=kind: postprocess(X, design, kind).shape)
        with tempfile.TemporaryDirectory() as tmp:
            pairs = relationship_file(n_perts, args.pairs, Path(tmp))
            context = EvaluationContext(
                X, labels=labels, batches=batches, roles={"control": controls},
                expression=Expression(Y, np.char.add("G", np.arange(args.genes).astype(str))),
                relationship_sources=[pairs], relationships=load_sources([pairs]),
            )
            for name in args.tasks:
                task = get_task(name)(postprocessing=tuple(args.postprocessing))
                start = time.perf_counter()
                result = run_task(task, context, (0,), raise_errors=True)
                label = f"{name.removeprefix('perturbation_')} ({'+'.join(args.postprocessing)})"
                row(label, time.perf_counter() - start, result.peak_memory_mb / 1024)
                results.append((size, result))
        del context, X, Y, design
    print(f"# process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    for size, result in results:
        for m in result.metrics:
            extra = {k: v for k, v in m.params.items() if k != "postprocessing"}
            print(f"# {size} {result.task} {m.params.get('postprocessing')} {m.name} = {m.value:.4f} {extra or ''}")


if __name__ == "__main__":
    main()
