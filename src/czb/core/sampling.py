"""Which rows of a table of cells to keep: label-stratified samples of a fixed size,
rare labels kept whole."""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Smaller strata (labels) are sampled whole, so rare labels are always represented.
MIN_PER_STRATUM = 50


def stratified_sample(strata: np.ndarray, size: int, *, seed: int) -> list[np.ndarray]:
    """Rows of each stratum to sample: proportional allocation of ``size`` cells, at
    least :data:`MIN_PER_STRATUM` per stratum (all of a smaller one), without replacement.

    Returns
    -------
    One sorted index array per stratum code ``0..strata.max()``.
    """
    rng = np.random.default_rng(seed)
    n = len(strata)
    out = []
    for code in range(int(strata.max()) + 1 if n else 0):
        members = np.flatnonzero(strata == code)
        take = min(len(members), max(MIN_PER_STRATUM, round(size * len(members) / n)))
        out.append(np.sort(rng.choice(members, size=take, replace=False)))
    return out


def stratified_rows(n_cells: int, labels: np.ndarray | None, size: int, *, seed: int = 0) -> np.ndarray:
    """Rows to keep of ``n_cells`` cells: all of them up to ``size``; above, a sorted
    :func:`stratified_sample` of ``size`` by ``labels`` (simple random when ``None``)."""
    if n_cells <= size:
        return np.arange(n_cells)
    strata = np.zeros(n_cells, dtype=np.int64) if labels is None else pd.factorize(np.asarray(labels))[0]
    return np.sort(np.concatenate(stratified_sample(strata, size, seed=seed)))
