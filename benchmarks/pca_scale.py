"""Time and peak memory of loading, validating and PCA-embedding an atlas-sized .h5ad.

Usage::

    python benchmarks/pca_scale.py --cells 1000000 --genes 20000 [--path /tmp/czb_pca_scale.h5ad]
        [--reads 2000] [--keep] [--raw] [--threads 2]

Writes a sparse count matrix with planted cell types (unless the file is already there
with the same parameters), then runs, in this process:

1. ``load_dataset`` (the matrix stays on disk above ``BACKED_MIN_VALUES``; the first
   load also computes the file's sha256, which czb records by path and mtime);
2. ``validate_dataset`` (values finite, non-negative, integer on sampled rows; no
   empty cells: two streamed passes over the values);
3. the ``pca`` baseline (3,000 HVGs, 50 components; streamed above
   ``STREAMED_PCA_MIN_VALUES``: cell totals, gene moments, 8 passes of randomized PCA),
   and ``pca_raw`` with ``--raw``;
4. a sanity check: kNN (k = 15) accuracy of the planted cell types on 20,000 cells of
   the embedding (5-fold), against chance.

Prints one table row per step: wall seconds, and the peak resident memory of this
process during the step (sampled every 20 ms with psutil; the generator runs in a
child process so that its memory is not counted).

The data: ``n_types`` cell types, each with ``n_states`` sub-states whose gene
profiles are the type's profile times independent Gamma(shape 2) factors (a
gamma-Poisson mixture, i.e. negative-binomial-like counts across cells of a type);
each cell draws ``reads × LogNormal(0, 0.35)`` reads from its sub-state's profile
(multinomial sampling, so only the non-zeros are ever generated). With 20,000 genes
and 2,000 reads a cell has about 1,100 non-zeros (the file is ~9 GB at 10^6 cells,
stored uncompressed as anndata writes by default, float32 values and int32 indices).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

CHUNK_CELLS = 8192


# --------------------------------------------------------------------------- data


def profiles(n_genes: int, n_types: int, n_states: int, seed: int) -> np.ndarray:
    """``(n_types * n_states, n_genes)`` cumulative gene probabilities, one row per sub-state."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.5, size=n_genes).clip(-5.0, 3.0)
    out = np.empty((n_types * n_states, n_genes))
    for t in range(n_types):
        program = np.zeros(n_genes)
        markers = rng.choice(n_genes, size=max(3, n_genes // 20), replace=False)
        program[markers] = rng.normal(2.0, 0.5, size=markers.size)
        for s in range(n_states):
            p = np.exp(base + program) * rng.gamma(2.0, 0.5, size=n_genes)
            out[t * n_states + s] = np.cumsum(p / p.sum())
    out[:, -1] = 1.0
    return out


def write_dataset(path: Path, n_cells: int, n_genes: int, reads: int, seed: int = 0) -> None:
    """Write the planted count matrix as an .h5ad, one chunk of cells at a time."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    from czb.data.synthetic.common import ensembl_like_ids
    from czb.models.docker.request import write_csr_rows

    n_types, n_states = 12, 8
    cum = profiles(n_genes, n_types, n_states, seed)
    rng = np.random.default_rng(seed + 1)
    proportions = rng.dirichlet(np.full(n_types, 4.0))
    cell_type = rng.choice(n_types, size=n_cells, p=proportions)
    state = cell_type * n_states + rng.integers(0, n_states, size=n_cells)
    batch = rng.integers(0, 4, size=n_cells)
    library = np.round(reads * rng.lognormal(0.0, 0.35, size=n_cells))
    library = np.maximum(1, library).astype(np.int64)

    def blocks():
        for start in range(0, n_cells, CHUNK_CELLS):
            stop = min(start + CHUNK_CELLS, n_cells)
            parts, order = [], []
            for s in np.unique(state[start:stop]):
                cells = np.flatnonzero(state[start:stop] == s)
                n_reads = library[start:stop][cells]
                total = int(n_reads.sum())
                # Sorted uniforms in O(n) (normalised exponential spacings) make the
                # gene look-up cache-friendly; reads are then dealt to cells at random.
                spacings = np.cumsum(rng.exponential(size=total + 1))
                genes = np.searchsorted(cum[s], spacings[:-1] / spacings[-1], side="right")
                owner = rng.permutation(np.repeat(np.arange(cells.size), n_reads))
                counts = np.bincount(
                    owner * n_genes + np.minimum(genes, n_genes - 1), minlength=cells.size * n_genes
                )
                parts.append(sp.csr_matrix(counts.reshape(cells.size, n_genes).astype(np.float32)))
                order.append(cells)
            block = sp.vstack(parts, format="csr")
            yield block[np.argsort(np.concatenate(order))]

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type_{t}" for t in cell_type]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=pd.Index([f"cell_{i:08d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame(index=pd.Index(ensembl_like_ids(n_genes)))
    tmp = path.with_name(path.name + ".tmp")
    ad.AnnData(obs=obs, var=var).write_h5ad(tmp)
    with h5py.File(tmp, "a") as f:
        write_csr_rows(f, "X", blocks(), n_cols=n_genes, chunk_values=1 << 20)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- measuring


class Peak:
    """Peak resident memory of this process while the ``with`` block runs (sampled)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval

    def __enter__(self) -> Peak:
        self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def row(step: str, seconds: float, peak_bytes: float, note: str = "") -> None:
    print(f"| {step:<28} | {seconds:>9.1f} | {peak_bytes / 2**30:>13.2f} | {note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=2000, help="mean reads per cell")
    parser.add_argument("--path", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the file afterwards")
    parser.add_argument("--raw", action="store_true", help="also run the pca_raw baseline")
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads")
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    path = args.path or Path(f"/tmp/czb_pca_scale_{args.cells}x{args.genes}.h5ad")
    params = {"cells": args.cells, "genes": args.genes, "reads": args.reads, "version": 1}
    stamp = path.with_name(path.name + ".json")

    print(f"{args.cells:,} cells × {args.genes:,} genes, {args.reads} reads/cell: {path}")
    print(f"| {'step':<28} | {'seconds':>9} | {'peak RSS GiB':>13} | notes")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 15}|------")
    if not (path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params):
        start = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        child = ctx.Process(
            target=write_dataset, args=(path, args.cells, args.genes, args.reads)
        )
        child.start()
        child.join()
        if child.exitcode != 0:
            sys.exit(f"writing {path} failed")
        stamp.write_text(json.dumps(params))
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        row("write h5ad (child process)", time.perf_counter() - start, child_peak,
            f"{path.stat().st_size / 1e9:.1f} GB on disk")

    from czb.data.reading import load_dataset
    from czb.data.validation import validate_dataset
    from czb.models.baselines import PCABaseline, RawPCABaseline
    from czb.specs.schema import DatasetSpec

    spec = DatasetSpec(
        name="pca_scale", uri=str(path), organism="human", label_key="cell_type",
        batch_key="batch",
    )
    with Peak() as p:
        ds = load_dataset(spec, offline=True)
    row("load_dataset", p.seconds, p.peak,
        f"backed={ds.backed}, {ds.adata.X.nnz / ds.n_cells:.0f} non-zeros/cell, sha256 included")
    with Peak() as p:
        validate_dataset(ds)
    row("validate_dataset", p.seconds, p.peak)
    baselines = [PCABaseline()] + ([RawPCABaseline()] if args.raw else [])
    for baseline in baselines:
        with Peak() as p, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            emb = baseline.embed(ds, seed=0)
        info = emb.info
        note = (
            f"{info.get('solver')}, {info.get('streaming', {}).get('n_passes', '-')} passes, "
            f"{info.get('n_genes_used', ds.n_genes)} genes, "
            f"explained variance {info['explained_variance_ratio']:.3f}"
        )
        row(f"{baseline.name} embed", p.seconds, p.peak, note)
        with Peak() as p:
            accuracy, chance = knn_check(emb.values, ds.labels)
        row(f"{baseline.name} kNN check", p.seconds, p.peak,
            f"cell-type accuracy {accuracy:.3f} (majority class {chance:.3f})")
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"max RSS of this process (getrusage): {max_rss:.2f} GiB")
    if not args.keep:
        path.unlink()
        stamp.unlink()


def knn_check(values: np.ndarray, labels: np.ndarray, n: int = 20_000) -> tuple[float, float]:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    pick = rng.choice(len(labels), size=min(n, len(labels)), replace=False)
    scores = cross_val_score(KNeighborsClassifier(15), values[pick], labels[pick], cv=5)
    _, counts = np.unique(labels[pick], return_counts=True)
    return float(scores.mean()), float(counts.max() / counts.sum())


if __name__ == "__main__":
    main()
