"""Means over cells computed exactly, or estimated from sampled cells with a CI, and the
bootstrap CI of a mean over cells (or donors).

At atlas scale, per-cell quantities whose exact mean costs O(n²) (silhouettes) or
O(n · k) neighbourhoods for every cell (entropy, LISI) are averaged over a sample of
cells instead. Each sampled cell's value is still exact; the estimate carries a 95%
confidence interval, so a reader sees how precise it is.

Whether exact or estimated, a mean of per-cell values also gets a bootstrap 95% CI
(:func:`bootstrap_mean`): how much it would move with other cells (or donors) of the same
kind. The report compares deterministic per-cell means of two models with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from czb.core.sampling import MIN_PER_STRATUM

#: Cells sampled for per-cell means at atlas scale (label silhouette, entropy, iLISI):
#: 95% CIs of about ±0.001 for silhouettes and ±0.003 for entropy at 2×10^5 cells.
SAMPLE_SIZE = 20_000
#: Two-sided 95% normal quantile.
Z95 = 1.959963984540054
#: Resamples of a bootstrap CI: percentile endpoints to within about a tenth of a
#: standard error (Monte Carlo), at a fraction of a second per metric.
N_RESAMPLES = 1000
#: Most groups of cells a bootstrap over cells draws weights for (:func:`bootstrap_mean`),
#: shared among strata by size, each stratum at least :data:`MIN_LEVELS`.
MAX_LEVELS = 1024
MIN_LEVELS = 32


@dataclass(frozen=True)
class Bootstrap:
    """Percentile bootstrap 95% CI of a mean of per-cell values.

    Attributes
    ----------
    low, high
        The interval.
    over
        What was resampled: ``cells`` or ``donors``.
    n_units
        How many cells (or donors) were resampled.
    n_resamples
        Bootstrap resamples drawn.
    """

    low: float
    high: float
    over: str
    n_units: int
    n_resamples: int = N_RESAMPLES

    def map(self, f: Callable[[float], float]) -> Bootstrap:
        """The interval under an increasing map ``f``."""
        return Bootstrap(f(self.low), f(self.high), self.over, self.n_units, self.n_resamples)

    def to_json(self) -> dict[str, Any]:
        """As result records and score outputs hold it (``MetricRecord.bootstrap``)."""
        return {"ci95": [self.low, self.high], "over": self.over, "n_units": self.n_units,
                "n_resamples": self.n_resamples}

    @classmethod
    def from_json(cls, data: Any) -> Bootstrap | None:
        """The inverse of :meth:`to_json`; ``None`` for anything else (absent in outputs
        of an older czb, or damaged)."""
        try:
            low, high = (float(x) for x in data["ci95"])
            out = cls(low, high, str(data["over"]), int(data["n_units"]), int(data["n_resamples"]))
        except (TypeError, KeyError, ValueError):
            return None
        return out if np.isfinite([low, high]).all() and low <= high else None


def _levels(values: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values and their counts; with more than ``budget`` distinct values, the
    sorted values cut into ``budget`` groups of (nearly) equal counts, each its mean."""
    levels, counts = np.unique(values, return_counts=True)
    if len(levels) <= budget:
        return levels, counts
    ordered = np.sort(values)
    starts = (np.arange(budget) * len(ordered)) // budget
    counts = np.diff(np.append(starts, len(ordered)))
    return np.add.reduceat(ordered, starts) / counts, counts


def bootstrap_mean(
    groups: Sequence[np.ndarray],
    weights: Sequence[float] | None = None,
    *,
    clusters: Sequence[np.ndarray] | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Bootstrap | None:
    """Percentile bootstrap 95% CI of ``sum_h weights_h * mean(groups[h])``.

    Over cells (``clusters`` ``None``): a Poisson bootstrap within each group (stratum),
    every cell weighted by an independent Poisson(1) count. Cells of equal value share
    one Poisson draw of their total (exact in distribution: the kNN accuracy's 0/1
    values of 10^6 cells cost two draws per resample); a group with more distinct values
    than its share of :data:`MAX_LEVELS` is cut by rank into that many groups of equal
    size, each drawn at its mean, which keeps the mean exact and loses only the spread
    within a group (for normal values, 1% of the variance with 32 groups, 0.02% with 1,024).
    Over donors (``clusters``: each cell's donor, aligned with ``groups``): every donor
    gets one Poisson(1) count for all its cells, in every group; cells without a donor
    form one more. A group that draws no weight in a resample keeps its observed mean.

    Parameters
    ----------
    groups
        Per-cell values of each stratum (one array for a plain mean), all finite.
    weights
        Weight of each stratum's mean; default: one stratum of weight 1.
    seed
        Seed of the resamples (the same values give the same interval).

    Returns
    -------
    The interval, or ``None`` with fewer than two cells (or donors), an empty group or
    a value that is not finite.
    """
    groups = [np.asarray(g, dtype=np.float64).ravel() for g in groups]
    w = np.ones(1) if weights is None else np.asarray(weights, dtype=np.float64)
    n = sum(len(g) for g in groups)
    if len(w) != len(groups) or any(len(g) == 0 or not np.isfinite(g).all() for g in groups) or n < 2:
        return None
    rng = np.random.default_rng(seed)
    observed = np.array([g.mean() for g in groups])
    means = np.empty((n_resamples, len(groups)))
    if clusters is None:
        for h, g in enumerate(groups):
            levels, counts = _levels(g, max(MIN_LEVELS, round(MAX_LEVELS * len(g) / n)))
            drawn = rng.poisson(counts, size=(n_resamples, len(counts))).astype(np.float64)
            total = drawn.sum(axis=1)
            means[:, h] = np.where(total > 0, drawn @ levels / np.maximum(total, 1.0), observed[h])
        return _interval(means @ w, "cells", n, n_resamples)
    codes, uniques = pd.factorize(np.concatenate([np.asarray(c) for c in clusters]))
    n_units = len(uniques) + int((codes < 0).any())
    codes = np.where(codes < 0, len(uniques), codes)
    if n_units < 2:
        return None
    splits = np.cumsum([len(g) for g in groups])[:-1]
    sums = np.stack([np.bincount(c, weights=g, minlength=n_units) for c, g in zip(np.split(codes, splits), groups)],
                    axis=1)
    counts = np.stack([np.bincount(c, minlength=n_units) for c in np.split(codes, splits)], axis=1).astype(float)
    chunk = max(1, (1 << 22) // n_units)  # resamples per block: memory O(4M) whatever the donors
    for start in range(0, n_resamples, chunk):
        drawn = rng.poisson(1.0, size=(min(chunk, n_resamples - start), n_units)).astype(np.float64)
        total = drawn @ counts
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start : start + len(drawn)] = np.where(total > 0, (drawn @ sums) / total, observed)
    return _interval(means @ w, "donors", n_units, n_resamples)


def _interval(resampled: np.ndarray, over: str, n_units: int, n_resamples: int) -> Bootstrap:
    low, high = np.quantile(resampled, [0.025, 0.975])
    return Bootstrap(float(low), float(high), over, n_units, n_resamples)


@dataclass(frozen=True)
class Estimate:
    """A mean computed exactly, or estimated from sampled cells.

    Attributes
    ----------
    value
        The mean (or its estimate).
    ci95
        95% confidence interval of an estimate (normal approximation); ``None`` when exact.
    n_sampled
        Cells whose values entered the mean (all of them when exact).
    bootstrap
        Bootstrap 95% CI of the mean over cells or donors (:func:`bootstrap_mean`; of an
        estimate, over the sampled cells, so it holds the sampling error too), or ``None``.
    """

    value: float
    ci95: tuple[float, float] | None = None
    n_sampled: int | None = None
    bootstrap: Bootstrap | None = None

    @property
    def exact(self) -> bool:
        return self.ci95 is None

    def map(self, f: Callable[[float], float]) -> Estimate:
        """The estimate under an increasing affine map ``f`` (e.g. rescaling to [0, 1])."""
        ci = None if self.ci95 is None else (f(self.ci95[0]), f(self.ci95[1]))
        return Estimate(f(self.value), ci, self.n_sampled, None if self.bootstrap is None else self.bootstrap.map(f))

    def describe(self) -> dict:
        """How it was computed, for result records."""
        if self.exact:
            return {"method": "exact"}
        return {"method": "stratified_sample", "n_sampled": self.n_sampled, "ci95": list(self.ci95)}


def sample_cells(strata: np.ndarray, size: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A simple random sample of cells, topped up so every stratum is represented.

    One sample serves every per-cell mean: the simple random part for plain means and
    medians (entropy, iLISI), the whole for stratified means (silhouettes), where the
    cells of a stratum are, given their number, a simple random sample of it.

    Returns
    -------
    uniform
        ``min(size, n)`` cells drawn without replacement, sorted.
    extra
        Further cells, sorted: for each stratum the uniform part holds fewer than
        ``min(MIN_PER_STRATUM, stratum size)`` of, that many minus those held.
    """
    rng = np.random.default_rng(seed)
    n = len(strata)
    uniform = np.sort(rng.choice(n, size=min(size, n), replace=False))
    taken = np.zeros(n, dtype=bool)
    taken[uniform] = True
    totals = np.bincount(strata)
    held = np.bincount(strata[uniform], minlength=len(totals))
    extra = [
        rng.choice(np.flatnonzero((strata == h) & ~taken), size=min(MIN_PER_STRATUM, totals[h]) - held[h], replace=False)
        for h in np.flatnonzero(held < np.minimum(MIN_PER_STRATUM, totals))
    ]
    return uniform, np.sort(np.concatenate([np.empty(0, dtype=np.int64), *extra]))


def stratified_mean(
    values: list[np.ndarray], totals: np.ndarray, weights: np.ndarray, *,
    clusters: list[np.ndarray] | None = None, seed: int = 0,
) -> Estimate:
    """Stratified estimate of ``sum_h weights_h * mean_h`` with its normal 95% CI, and
    the bootstrap CI over its sampled cells (or their donors, ``clusters``: aligned with
    ``values``).

    ``values[h]`` are the sampled values of stratum ``h`` of ``totals[h]`` cells; the
    variance carries the finite-population correction, so a stratum sampled whole adds none.
    """
    means = np.array([v.mean() for v in values])
    variances = np.array([
        (1 - len(v) / N) * v.var(ddof=1) / len(v) if len(v) > 1 else 0.0 for v, N in zip(values, totals)
    ])
    value = float(weights @ means)
    half = Z95 * float(np.sqrt(weights**2 @ variances))
    bootstrap = bootstrap_mean(values, weights, clusters=clusters, seed=seed)
    return Estimate(value, (value - half, value + half), int(sum(len(v) for v in values)), bootstrap)


def mean_estimate(values: np.ndarray, *, clusters: np.ndarray | None = None, seed: int = 0) -> Estimate:
    """The exact mean of every cell's ``values``, with its bootstrap CI over cells (or
    over ``clusters``, each cell's donor)."""
    values = np.asarray(values, dtype=np.float64)
    bootstrap = bootstrap_mean([values], clusters=None if clusters is None else [clusters], seed=seed)
    return Estimate(float(values.mean()), None, len(values), bootstrap)


def median_estimate(values: np.ndarray, n_total: int) -> Estimate:
    """Median of a simple random sample of ``n_total`` cells' values, with the
    distribution-free 95% CI from binomial order statistics; exact when all were sampled.

    NaN values (cells without a defined value) are left out, as ``nanmedian`` does.
    """
    v = np.sort(values[np.isfinite(values)])
    m = len(v)
    if m == 0:
        return Estimate(float("nan"), None, 0)
    value = float(np.median(v))
    if len(values) >= n_total:
        return Estimate(value, None, m)
    half = Z95 * np.sqrt(m) / 2
    lo, hi = int(np.floor(m / 2 - half)), int(np.ceil(m / 2 + half))
    return Estimate(value, (float(v[max(lo, 0)]), float(v[min(hi, m - 1)])), m)
