"""Held-out single-cell data for benchmarking czb against other tools (not czb's generator).

Usage::

    python benchmarks/heldout_data.py --cells 200000 --out heldout-data [--seed 0] [--genes 2000]

writes ``heldout-data/heldout_200000_s0.h5ad`` (sparse raw counts, cell annotations) and
``heldout-data/heldout_200000_s0.npy`` (the 50-d embedding, float32, rows in obs order).

The structure is chosen to be unlike czb's own generators
(:func:`czb.data.synthetic.cells.planted_cells`: a handful of Dirichlet-sized types with
independent marker programs, Gaussian noise, one multiplicative batch factor per gene;
``tests/conftest.py``: isotropic Gaussian blobs plus a batch offset) and unlike
``benchmarks/atlas_scale.py``'s planted atlas (Gaussian spread, one shift per batch):

- **Hierarchy.** 30 cell types in 8 lineages: lineage centres far apart in a 20-d
  latent space, the types of a lineage close to their lineage's centre, so neighbouring
  types overlap and clusters merge within lineages.
- **Imbalance.** Type sizes follow Zipf's law (share of the type of rank ``r`` is
  proportional to ``1 / r``), so the largest type has 30 times as many cells as the
  smallest; lineages hold unequal numbers of types.
- **Heavy tails and anisotropy.** Within-type spread is multivariate Student-t (3 degrees
  of freedom) with a random full covariance per type; the 50-d embedding is a random
  linear read-out of the latent with decaying per-dimension scales, plus Student-t noise
  with per-dimension scales, and a batch offset the "model" failed to remove.
- **Batches that act differently on lineages.** 6 batches of unequal size whose
  composition depends on the lineage; each batch shifts every cell (additive), shifts
  each lineage by its own extra amount, and stretches the spread of each lineage by its
  own factor (scaling); in counts, each batch also has its own sequencing depth and
  per-gene efficiency.
- **A developmental trajectory.** One lineage of 5 types is a differentiation path: its
  cells sit on a curved path in the latent space, its types are consecutive stages, and
  each cell's time point (0..7) follows its position on the path with asynchrony
  (cells of one stage are collected at neighbouring time points). Cells of the other
  lineages were collected at every time point and drift only slightly with time.
- **Raw counts.** Expected expression is log-linear in the latent (each gene loads on a
  few latent factors), normalised per cell to a log-normal library size; counts are
  negative binomial with a per-gene dispersion (gamma-Poisson).

Everything is drawn from ``seed``; cells are made in chunks (each chunk from its own
seeded stream), the counts are appended chunk by chunk to the .h5ad file and the
embedding written into a memory-mapped .npy, so 1M cells need well under 2 GiB of memory
beyond the output itself.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_TYPES = 30
N_LINEAGES = 8
N_BATCHES = 6
N_TIMES = 8
LATENT = 20
DIMS = 50
#: Stages of the developmental lineage.
N_STAGES = 5
#: Zipf exponent of the type sizes.
ZIPF = 1.0
#: Degrees of freedom of the Student-t spread (latent) and of the embedding noise.
DF_LATENT = 3.0
DF_NOISE = 3.0


@dataclass(frozen=True)
class Design:
    """Everything shared by all cells, drawn once from the seed."""

    lineage_of_type: np.ndarray  # (N_TYPES,) lineage of each type
    type_share: np.ndarray  # (N_TYPES,) Zipf shares, sum 1
    type_centre: np.ndarray  # (N_TYPES, LATENT)
    type_factor: np.ndarray  # (N_TYPES, LATENT, LATENT) Student-t spread = factor @ t-vector
    trajectory: int  # the developmental lineage
    stage_of_type: np.ndarray  # (N_TYPES,) stage 0..N_STAGES-1, -1 off the trajectory
    path: np.ndarray  # (3, LATENT): start, direction and bend of the trajectory's curve
    drift: np.ndarray  # (LATENT,) slight movement of every other cell with time
    batch_weight: np.ndarray  # (N_LINEAGES, N_BATCHES) P(batch | lineage)
    batch_shift: np.ndarray  # (N_BATCHES, LATENT) additive shift of every cell
    batch_lineage_shift: np.ndarray  # (N_BATCHES, N_LINEAGES, LATENT) extra shift per lineage
    batch_lineage_scale: np.ndarray  # (N_BATCHES, N_LINEAGES) stretch of the spread per lineage
    readout: np.ndarray  # (LATENT, DIMS) latent -> embedding
    noise_scale: np.ndarray  # (DIMS,) per-dimension scale of the Student-t noise
    embedding_batch: np.ndarray  # (N_BATCHES, DIMS) batch offset left in the embedding
    gene_base: np.ndarray  # (n_genes,) log baseline expression
    gene_loading: np.ndarray  # (LATENT, n_genes) sparse loadings of genes on latent factors
    gene_theta: np.ndarray  # (n_genes,) negative-binomial inverse dispersion
    batch_gene: np.ndarray  # (N_BATCHES, n_genes) per-batch gene efficiency (log)
    batch_depth: np.ndarray  # (N_BATCHES,) per-batch median library size


def design(seed: int = 0, *, n_genes: int = 2000) -> Design:
    """Draw the shared structure (types, lineages, batches, read-outs) from ``seed``."""
    rng = np.random.default_rng([seed, 0])
    # Lineages: the developmental one (lineage 0) gets N_STAGES types, every other at
    # least one, the rest spread unevenly.
    rest = N_TYPES - N_STAGES - (N_LINEAGES - 1)
    extra = rng.multinomial(rest, rng.dirichlet(np.full(N_LINEAGES - 1, 0.8)))
    sizes = np.concatenate([[N_STAGES], 1 + extra])
    lineage_of_type = np.repeat(np.arange(N_LINEAGES), sizes)
    # Zipf shares, ranks assigned to types at random (the big types are anywhere).
    ranks = rng.permutation(N_TYPES) + 1
    share = ranks.astype(float) ** -ZIPF
    share /= share.sum()

    lineage_centre = rng.normal(0.0, 2.2, size=(N_LINEAGES, LATENT))
    type_centre = lineage_centre[lineage_of_type] + rng.normal(0.0, 0.9, size=(N_TYPES, LATENT))
    # The trajectory: a bent curve start + tau * direction + sin(pi tau) * bend.
    start = lineage_centre[0]
    direction = rng.normal(0.0, 1.0, size=LATENT)
    direction *= 4.5 / np.linalg.norm(direction)
    bend = rng.normal(0.0, 1.0, size=LATENT)
    bend *= 1.5 / np.linalg.norm(bend)
    path = np.stack([start, direction, bend])
    stage_of_type = np.where(lineage_of_type == 0, np.arange(N_TYPES), -1)
    for s in range(N_STAGES):
        type_centre[s] = _on_path(path, np.array([(s + 0.5) / N_STAGES]))[0]

    # Full random covariances: a random rotation times log-uniform axis lengths.
    type_factor = np.empty((N_TYPES, LATENT, LATENT))
    for t in range(N_TYPES):
        q, _ = np.linalg.qr(rng.normal(size=(LATENT, LATENT)))
        type_factor[t] = q * np.exp(rng.uniform(np.log(0.08), np.log(0.7), size=LATENT))
    drift = rng.normal(0.0, 0.06, size=LATENT)

    batch_base = rng.dirichlet(np.full(N_BATCHES, 3.0))
    batch_weight = batch_base * np.exp(rng.normal(0.0, 0.8, size=(N_LINEAGES, N_BATCHES)))
    batch_weight /= batch_weight.sum(axis=1, keepdims=True)
    batch_shift = rng.normal(0.0, 0.5, size=(N_BATCHES, LATENT))
    batch_lineage_shift = rng.normal(0.0, 0.25, size=(N_BATCHES, N_LINEAGES, LATENT))
    batch_lineage_scale = np.exp(rng.normal(0.0, 0.2, size=(N_BATCHES, N_LINEAGES)))

    # Read-out: a random linear map whose output dimensions carry decaying variance (as
    # the leading components of a real embedding do), plus anisotropic noise.
    dim_scale = np.exp(-np.linspace(0.0, 2.5, DIMS)) * np.exp(rng.normal(0.0, 0.2, size=DIMS))
    readout = rng.normal(0.0, 1.0 / np.sqrt(LATENT), size=(LATENT, DIMS)) * dim_scale
    noise_scale = 0.12 * np.exp(rng.normal(0.0, 0.5, size=DIMS))
    embedding_batch = rng.normal(0.0, 0.08, size=(N_BATCHES, DIMS))

    gene_base = np.clip(rng.normal(-0.5, 1.4, size=n_genes), -5.0, 3.5)
    # Each gene loads on 3 latent factors.
    gene_loading = np.zeros((LATENT, n_genes))
    for g in range(n_genes):
        gene_loading[rng.choice(LATENT, size=3, replace=False), g] = rng.normal(0.0, 0.45, size=3)
    gene_theta = np.exp(rng.normal(np.log(2.0), 0.7, size=n_genes))
    batch_gene = rng.normal(0.0, 0.25, size=(N_BATCHES, n_genes))
    batch_depth = 1500.0 * np.exp(rng.normal(0.0, 0.4, size=N_BATCHES))
    return Design(
        lineage_of_type=lineage_of_type, type_share=share, type_centre=type_centre, type_factor=type_factor,
        trajectory=0, stage_of_type=stage_of_type, path=path, drift=drift, batch_weight=batch_weight,
        batch_shift=batch_shift, batch_lineage_shift=batch_lineage_shift, batch_lineage_scale=batch_lineage_scale,
        readout=readout, noise_scale=noise_scale, embedding_batch=embedding_batch, gene_base=gene_base,
        gene_loading=gene_loading, gene_theta=gene_theta, batch_gene=batch_gene, batch_depth=batch_depth,
    )


def _on_path(path: np.ndarray, tau: np.ndarray) -> np.ndarray:
    start, direction, bend = path
    return start + tau[:, None] * direction + np.sin(np.pi * tau)[:, None] * bend


def type_counts(n_cells: int, d: Design) -> np.ndarray:
    """Cells per type: the Zipf shares rounded by largest remainder (every type >= 1 cell)."""
    if n_cells < N_TYPES:
        msg = f"need at least {N_TYPES} cells, got {n_cells}"
        raise ValueError(msg)
    exact = d.type_share * (n_cells - N_TYPES)
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n_cells - N_TYPES - counts.sum()]] += 1
    return counts + 1


def annotations(n_cells: int, d: Design, seed: int = 0) -> dict[str, np.ndarray]:
    """Type, batch, time point and developmental position of every cell (in obs order)."""
    rng = np.random.default_rng([seed, 1])
    types = rng.permutation(np.repeat(np.arange(N_TYPES), type_counts(n_cells, d)))
    lineage = d.lineage_of_type[types]
    # Batch depends on the lineage (inverse-CDF draw per cell).
    cdf = np.cumsum(d.batch_weight[lineage], axis=1)
    batches = np.minimum((rng.random(n_cells)[:, None] > cdf).sum(axis=1), N_BATCHES - 1)
    stage = d.stage_of_type[types]
    on_path = stage >= 0
    tau = np.full(n_cells, np.nan)
    tau[on_path] = (stage[on_path] + rng.random(on_path.sum())) / N_STAGES
    times = rng.integers(0, N_TIMES, size=n_cells)
    # Asynchrony: a cell at position tau is collected around time tau * (T - 1).
    jitter = rng.normal(0.0, 0.8, size=on_path.sum())
    times[on_path] = np.clip(np.rint(tau[on_path] * (N_TIMES - 1) + jitter), 0, N_TIMES - 1).astype(np.int64)
    return {"types": types, "lineage": lineage, "batches": batches, "times": times, "tau": tau}


def latent_chunk(ann: dict[str, np.ndarray], d: Design, rng: np.random.Generator) -> np.ndarray:
    """Latent positions of the cells in ``ann`` (one chunk)."""
    types, lineage, batches = ann["types"], ann["lineage"], ann["batches"]
    n = len(types)
    # Multivariate Student-t: Gaussian divided by sqrt(chi2 / df), per cell.
    g = rng.standard_normal((n, LATENT))
    heavy = g / np.sqrt(rng.chisquare(DF_LATENT, size=n) / DF_LATENT)[:, None]
    spread = np.einsum("nij,nj->ni", d.type_factor[types], heavy)
    spread *= d.batch_lineage_scale[batches, lineage][:, None]
    centre = d.type_centre[types].copy()
    on_path = ~np.isnan(ann["tau"])
    centre[on_path] = _on_path(d.path, ann["tau"][on_path])
    centre[~on_path] += ann["times"][~on_path, None] * d.drift
    return centre + spread + d.batch_shift[batches] + d.batch_lineage_shift[batches, lineage]


def embedding_chunk(z: np.ndarray, batches: np.ndarray, d: Design, rng: np.random.Generator) -> np.ndarray:
    """The 50-d embedding of latent positions ``z``: read-out, batch residue and heavy-tailed noise."""
    noise = rng.standard_t(DF_NOISE, size=(len(z), DIMS)) * d.noise_scale
    return (z @ d.readout + d.embedding_batch[batches] + noise).astype(np.float32)


def counts_chunk(z: np.ndarray, batches: np.ndarray, d: Design, rng: np.random.Generator):
    """Raw counts (CSR, float32 integers) of latent positions ``z``."""
    import scipy.sparse as sp

    log_mu = d.gene_base + z @ d.gene_loading + d.batch_gene[batches]
    log_mu -= log_mu.max(axis=1, keepdims=True)
    p = np.exp(log_mu)
    p /= p.sum(axis=1, keepdims=True)
    library = d.batch_depth[batches] * np.exp(rng.normal(0.0, 0.5, size=len(z)))
    mu = p * library[:, None]
    counts = rng.poisson(rng.gamma(d.gene_theta, mu / d.gene_theta)).astype(np.float32)
    empty = counts.sum(axis=1) == 0  # every cell has at least one count
    counts[empty, np.argmax(mu[empty], axis=1)] = 1.0
    return sp.csr_matrix(counts)


def obs_frame(ann: dict[str, np.ndarray], d: Design):
    """The obs table: cell_type, lineage, batch (categoricals), time (int64), pseudotime."""
    import pandas as pd

    type_names = [f"L{d.lineage_of_type[t]}_type{t:02d}" for t in range(N_TYPES)]
    n = len(ann["types"])
    return pd.DataFrame(
        {
            "cell_type": pd.Categorical.from_codes(ann["types"], type_names),
            "lineage": pd.Categorical.from_codes(ann["lineage"], [f"lineage{i}" for i in range(N_LINEAGES)]),
            "batch": pd.Categorical.from_codes(ann["batches"], [f"batch{i}" for i in range(N_BATCHES)]),
            "time": ann["times"].astype(np.int64),
            "pseudotime": ann["tau"].astype(np.float32),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n)]),
    )


def _chunks(n_cells: int, ann: dict[str, np.ndarray], d: Design, seed: int, chunk_size: int):
    """Per chunk of cells: ``(lo, hi, annotations, latent, rng)``, the chunk's own seeded
    stream having drawn the latent; the embedding and then the counts draw from it next."""
    for i, lo in enumerate(range(0, n_cells, chunk_size)):
        hi = min(lo + chunk_size, n_cells)
        rng = np.random.default_rng([seed, 2, i])
        part = {k: v[lo:hi] for k, v in ann.items()}
        yield lo, hi, part, latent_chunk(part, d, rng), rng


def paths(n_cells: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Where :func:`write_heldout` writes (``.h5ad``, ``.npy``)."""
    stem = folder / f"heldout_{n_cells}_s{seed}"
    return stem.with_suffix(".h5ad"), stem.with_suffix(".npy")


def write_heldout(n_cells: int, folder: Path, *, seed: int = 0, n_genes: int = 2000, chunk_size: int = 4096,
                  overwrite: bool = False) -> tuple[Path, Path]:
    """Generate ``n_cells`` held-out cells and write them; return the (.h5ad, .npy) paths.

    The .h5ad holds ``X`` (CSR raw counts, float32), ``obs`` (see :func:`obs_frame`) and
    ``var`` (gene names ``gene00000`` ...); the .npy the embedding, one float32 row per
    cell in obs order. Existing files are kept unless ``overwrite``. The same arguments
    give the same files (``chunk_size`` included: each chunk has its own stream).
    """
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    folder.mkdir(parents=True, exist_ok=True)
    h5ad, npy = paths(n_cells, folder, seed)
    if h5ad.exists() and npy.exists() and not overwrite:
        return h5ad, npy
    d = design(seed, n_genes=n_genes)
    ann = annotations(n_cells, d, seed)
    var = pd.DataFrame(index=pd.Index([f"gene{g:05d}" for g in range(n_genes)]))
    shell = ad.AnnData(obs=obs_frame(ann, d), var=var)
    shell.uns["heldout"] = {"generator": "benchmarks/heldout_data.py", "n_cells": n_cells, "seed": seed,
                            "n_genes": n_genes}
    tmp_h5ad, tmp_npy = h5ad.with_suffix(".h5ad.part"), npy.with_suffix(".part.npy")
    shell.write_h5ad(tmp_h5ad)
    del shell
    emb = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(n_cells, DIMS))
    with h5py.File(tmp_h5ad, "a") as f:
        for lo, hi, part, z, rng in _chunks(n_cells, ann, d, seed, chunk_size):
            emb[lo:hi] = embedding_chunk(z, part["batches"], d, rng)
            X = counts_chunk(z, part["batches"], d, rng)
            if lo == 0:
                write_elem(f, "X", X)
            else:
                sparse_dataset(f["X"]).append(X)
    emb.flush()
    del emb
    tmp_h5ad.replace(h5ad)
    tmp_npy.replace(npy)
    return h5ad, npy


def embedding_arrays(n_cells: int, *, seed: int = 0, chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """The held-out embedding and annotations without the counts, for atlas sizes.

    Equal to what :func:`write_heldout` writes with the same arguments (each chunk's
    stream draws the embedding before the counts), at a fraction of the cost: 5M cells
    in minutes and 1 GiB. Returns ``X`` (float32, ``(n_cells, 50)``), ``labels`` (cell
    type names), ``batches`` (batch names) and ``time_points`` (int64).
    """
    d = design(seed)
    ann = annotations(n_cells, d, seed)
    X = np.empty((n_cells, DIMS), dtype=np.float32)
    for lo, hi, part, z, rng in _chunks(n_cells, ann, d, seed, chunk_size):
        X[lo:hi] = embedding_chunk(z, part["batches"], d, rng)
    obs = obs_frame(ann, d)
    return {"X": X, "labels": obs["cell_type"].to_numpy(str), "batches": obs["batch"].to_numpy(str),
            "time_points": obs["time"].to_numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    for n in args.cells:
        h5ad, npy = write_heldout(n, args.out, seed=args.seed, n_genes=args.genes, overwrite=args.overwrite)
        print(f"{n} cells: {h5ad} {npy}")


if __name__ == "__main__":
    main()
