"""Silhouette widths: label silhouette (bio conservation) and batch silhouette (mixing).

Exact, in blocks: each block of rows gets its distances to every cell from one GEMM
and is reduced at once to per-label distance sums (another GEMM against a one-hot
matrix), so memory stays O(block × n) and the work is BLAS-bound.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from czb.evaluation.neighbors import _block_rows, euclidean_block, squared_norms
from czb.evaluation.registry import MetricInfo, register_metric

SILHOUETTE_SCORE = register_metric(
    MetricInfo(
        name="silhouette_score",
        description="Mean silhouette width of cell labels, rescaled to [0, 1] as (s + 1) / 2 "
        "(scib-metrics' silhouette_label).",
        reference="doi:10.1038/s41592-021-01336-8",
    )
)
BATCH_SILHOUETTE = register_metric(
    MetricInfo(
        name="batch_silhouette",
        description="Per cell type, 1 - |silhouette of batch labels|, averaged over cells of the "
        "type then over types (scib-metrics' silhouette_batch); 1 = batches fully mixed.",
        reference="doi:10.1038/s41592-021-01336-8",
    )
)


def silhouette_samples(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Silhouette coefficient of every cell (Euclidean), as scikit-learn defines it.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` labels of any hashable type.

    Returns
    -------
    ``(n_cells,)`` values in [-1, 1]; cells alone in their label get 0.

    References
    ----------
    Rousseeuw (1987), doi:10.1016/0377-0427(87)90125-7.
    """
    X = np.asarray(X, dtype=np.float64)
    codes, uniques = pd.factorize(np.asarray(labels))
    n, n_labels = len(codes), len(uniques)
    counts = np.bincount(codes, minlength=n_labels).astype(np.float64)
    onehot = np.zeros((n, n_labels))
    onehot[np.arange(n), codes] = 1.0
    norms = squared_norms(X)
    intra = np.empty(n)
    inter = np.empty(n)
    step = _block_rows(n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        sums = euclidean_block(X[start:stop], X, norms[start:stop], norms) @ onehot
        rows = np.arange(stop - start)
        own = codes[start:stop]
        intra[start:stop] = sums[rows, own]
        means = sums / counts
        means[rows, own] = np.inf
        inter[start:stop] = means.min(axis=1) if n_labels > 1 else np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        intra /= counts[codes] - 1
        s = (inter - intra) / np.maximum(intra, inter)
    return np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


def silhouette_label(X: np.ndarray, labels: np.ndarray, *, rescale: bool = True) -> float:
    """Mean silhouette of ``labels``; rescaled to [0, 1] by (s + 1) / 2 unless ``rescale=False``."""
    s = float(np.mean(silhouette_samples(X, labels)))
    return (s + 1.0) / 2.0 if rescale else s


def silhouette_batch(X: np.ndarray, labels: np.ndarray, batches: np.ndarray) -> float:
    """Batch silhouette within each label (scIB's definition, scib-metrics' defaults).

    For every label with at least two batches (and not one batch per cell), the
    silhouette of batch labels is computed among the cells of that label; each cell
    scores ``1 - |s|``; cell scores are averaged per label, then over labels.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels, batches
        ``(n_cells,)`` cell-type and batch labels.
    """
    X = np.asarray(X, dtype=np.float64)
    labels = np.asarray(labels)
    batches = np.asarray(batches)
    per_label = []
    for label in pd.unique(labels):
        mask = labels == label
        n_batches = len(pd.unique(batches[mask]))
        if n_batches == 1 or n_batches == mask.sum():
            continue
        per_label.append(np.mean(1.0 - np.abs(silhouette_samples(X[mask], batches[mask]))))
    if not per_label:
        return float("nan")
    return float(np.mean(per_label))
