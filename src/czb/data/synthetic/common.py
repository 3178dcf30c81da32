"""What every generator uses: Ensembl-like gene IDs and negative-binomial counts."""

from __future__ import annotations

import numpy as np

#: Ensembl-style gene IDs are drawn from this range, like real human IDs
#: (ENSG00000000003 ... ENSG00000310000).
GENE_NUMBER_RANGE = (3, 310_000)


def ensembl_like_ids(n_genes: int, *, prefix: str = "ENSG") -> list[str]:
    """Sorted, unique gene IDs shaped like Ensembl's (``prefix`` + 11 digits).

    The IDs depend only on ``n_genes`` and ``prefix`` (not on a data seed), so
    synthetic datasets of the same size share their genes.

    Parameters
    ----------
    n_genes
        How many IDs.
    prefix
        Ensembl gene prefix of the organism (``ENSG`` for human).

    Returns
    -------
    list of ``n_genes`` strings, e.g. ``'ENSG00000123456'``.
    """
    rng = np.random.default_rng(20_250_101)
    numbers = rng.choice(np.arange(*GENE_NUMBER_RANGE), size=n_genes, replace=False)
    return [f"{prefix}{n:011d}" for n in np.sort(numbers)]


def negative_binomial_counts(rng: np.random.Generator, mu: np.ndarray, dispersion: float) -> np.ndarray:
    """Counts drawn around ``mu`` (gamma-Poisson = negative binomial with inverse dispersion
    ``dispersion``), as ``float32``; a cell left with no counts gets one read in its most
    expected gene, since an empty cell would fail validation (rare: only with tiny depth)."""
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    empty = counts.sum(axis=1) == 0
    counts[empty, mu[empty].argmax(axis=1)] = 1.0
    return counts
