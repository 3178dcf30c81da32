"""The ``planted_cells`` generator: cell types, batches, donors and a time axis."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from czb.data.synthetic.common import ensembl_like_ids, negative_binomial_counts

if TYPE_CHECKING:
    import anndata


def planted_cells(
    n_cells: int = 1500,
    n_genes: int = 2000,
    n_cell_types: int = 6,
    n_batches: int = 3,
    *,
    batch_effect: float = 1.0,
    n_time_points: int = 5,
    n_donors_per_batch: int = 2,
    mean_counts: float = 3000.0,
    dispersion: float = 5.0,
    gene_prefix: str = "ENSG",
    seed: int = 0,
) -> anndata.AnnData:
    """Raw counts with planted cell types, batches and a time axis.

    Expected expression follows a low-rank log-linear model::

        log mu[c, g] = base[g]                                 # gene baseline
                     + program[type[c], g]                     # cell-type program
                     + tau[c] * trajectory[type[c], g]         # movement along time
                     + shift[batch[c], g]                      # batch effect
                     + noise[c] @ loadings[:, g]               # shared cell-to-cell variation

    normalised per cell to a log-normal library size, and counts are drawn from a
    negative binomial (gamma-Poisson) around ``mu``. ``tau = time_point / (T - 1)``
    moves cells of each type from their program towards a type-specific end state.
    Each batch multiplies every gene by its own factor ``exp(shift)`` whose log has
    standard deviation ``0.5 * batch_effect``. Cell types are separated clearly:
    a kNN classifier on 50 principal components of log-normalised counts reaches
    > 0.9 accuracy with the defaults, while unrelated embeddings stay at chance.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    n_cell_types
        Number of planted cell types (uneven proportions, every type present).
    n_batches
        Number of batches; cells are assigned to batches at random.
    batch_effect
        Strength of the batch effect; ``0`` means none.
    n_time_points
        Number of time points (``obs['time_point']`` takes values ``0 .. T-1``).
    n_donors_per_batch
        Donors are nested in batches.
    mean_counts
        Median total counts per cell.
    dispersion
        Negative-binomial inverse dispersion ``theta`` (larger: closer to Poisson).
    gene_prefix
        Ensembl prefix of the gene IDs (``ENSMUSG`` for mouse-like data).
    seed
        Seed of everything random; the same arguments give the identical matrix.

    Returns
    -------
    AnnData with

    - ``X``: ``scipy.sparse.csr_matrix`` of shape ``(n_cells, n_genes)``, dtype
      ``float32`` holding integer counts; every cell has at least one count.
    - ``obs``: ``cell_type``, ``batch``, ``donor`` (categoricals) and
      ``time_point`` (``int64``), indexed by unique cell IDs ``cell_00000 ...``.
    - ``var_names``: human Ensembl-like IDs from :func:`ensembl_like_ids`.
    - ``uns['synthetic']``: the generator's name and arguments.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if min(n_cells, n_genes, n_cell_types, n_batches, n_time_points, n_donors_per_batch) < 1:
        msg = "planted_cells: sizes and counts must be at least 1"
        raise ValueError(msg)
    if n_cells < n_cell_types:
        msg = f"planted_cells: n_cells ({n_cells}) must be at least n_cell_types ({n_cell_types})"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)

    # Gene baseline: log-normal spread of expression levels, as in real data.
    base = rng.normal(0.0, 1.5, size=n_genes).clip(-5.0, 3.0)

    # Each type up-regulates its own markers (~5% of genes) and has its own
    # trajectory genes; the programs are what makes types separable.
    n_markers = max(3, n_genes // 20)
    program = np.zeros((n_cell_types, n_genes))
    trajectory = np.zeros((n_cell_types, n_genes))
    for t in range(n_cell_types):
        markers = rng.choice(n_genes, size=n_markers, replace=False)
        program[t, markers] = rng.normal(2.0, 0.5, size=n_markers)
        moving = rng.choice(n_genes, size=n_markers, replace=False)
        trajectory[t, moving] = rng.normal(0.0, 1.5, size=n_markers)

    shift = rng.normal(0.0, 0.5 * batch_effect, size=(n_batches, n_genes))
    n_noise_factors = 5
    loadings = rng.normal(0.0, 0.3, size=(n_noise_factors, n_genes))

    # Uneven type proportions, but every type gets at least one cell.
    proportions = rng.dirichlet(np.full(n_cell_types, 4.0))
    cell_type = np.concatenate(
        [
            np.arange(n_cell_types),
            rng.choice(n_cell_types, size=n_cells - n_cell_types, p=proportions),
        ]
    )
    rng.shuffle(cell_type)
    batch = rng.integers(0, n_batches, size=n_cells)
    donor = batch * n_donors_per_batch + rng.integers(0, n_donors_per_batch, size=n_cells)
    time_point = rng.integers(0, n_time_points, size=n_cells)
    tau = time_point / max(n_time_points - 1, 1)
    noise = rng.normal(0.0, 1.0, size=(n_cells, n_noise_factors))

    log_mu = (
        base[None, :]
        + program[cell_type]
        + tau[:, None] * trajectory[cell_type]
        + shift[batch]
        + noise @ loadings
    )
    log_mu -= log_mu.max(axis=1, keepdims=True)  # stable softmax
    proportions_per_gene = np.exp(log_mu)
    proportions_per_gene /= proportions_per_gene.sum(axis=1, keepdims=True)
    library = mean_counts * rng.lognormal(0.0, 0.35, size=n_cells)
    mu = proportions_per_gene * library[:, None]

    counts = negative_binomial_counts(rng, mu, dispersion)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"cell_type_{t}" for t in cell_type]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
            "donor": pd.Categorical([f"donor_{d}" for d in donor]),
            "time_point": time_point.astype(np.int64),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_cells)], name=None),
    )
    var = pd.DataFrame(index=pd.Index(ensembl_like_ids(n_genes, prefix=gene_prefix), name=None))
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.uns["synthetic"] = {
        "generator": "planted_cells",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "batch_effect": batch_effect,
        "n_time_points": n_time_points,
        "n_donors_per_batch": n_donors_per_batch,
        "mean_counts": mean_counts,
        "dispersion": dispersion,
        "seed": seed,
    }
    return adata
