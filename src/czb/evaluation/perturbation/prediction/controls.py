"""Matching every perturbed cell to one control cell of its batch (cz-benchmarks' preprocessing)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def match_controls(
    obs_names: Sequence[str],
    conditions: np.ndarray,
    control: str,
    *,
    groups: np.ndarray | None = None,
    features: np.ndarray | None = None,
    min_cells: int = 50,
) -> dict[str, dict[str, str]]:
    """One matched control cell per perturbed cell (cz-benchmarks' preprocessing).

    For each condition with at least ``min_cells`` cells, and within each value of
    ``groups`` (10x GEM group, or batch), perturbed and not yet matched control cells
    are described by ``log1p(features)`` standardised over both; the assignment
    minimising the total Euclidean distance (Hungarian algorithm) pairs them, one
    control per perturbed cell (fewer when the group has fewer controls). Controls may
    serve several conditions, never two cells of one condition.

    Parameters
    ----------
    obs_names
        ``(n_cells,)`` cell IDs.
    conditions
        ``(n_cells,)`` condition labels.
    control
        Control label.
    groups
        ``(n_cells,)`` group each cell belongs to; ``None``: one group.
    features
        ``(n_cells, n_features)`` non-negative features to match on, e.g. total counts
        and detected genes (cz-benchmarks' UMI_count and ngenes); ``None``: every
        pairing costs the same, and cells are paired in order within each group.
    min_cells
        Conditions with fewer cells get no mapping.

    Returns
    -------
    condition -> {perturbed cell ID: control cell ID}.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    names = np.asarray(obs_names).astype(str)
    conditions = np.asarray(conditions).astype(str)
    n = len(names)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    feats = np.zeros((n, 1)) if features is None else np.asarray(features, dtype=np.float64).reshape(n, -1)
    feats = np.log1p(np.maximum(feats, 0.0))
    is_control = conditions == control
    result: dict[str, dict[str, str]] = {}
    for condition in pd.unique(conditions[~is_control]):
        rows = np.flatnonzero(conditions == condition)
        if len(rows) < min_cells:
            continue
        mapping: dict[str, str] = {}
        for g in np.unique(groups[rows]):
            treated = rows[groups[rows] == g]
            ctrl = np.flatnonzero(is_control & (groups == g))
            if len(ctrl) == 0:
                continue
            pooled = np.vstack([feats[treated], feats[ctrl]])
            mu, sigma = pooled.mean(axis=0), pooled.std(axis=0)
            sigma[sigma < 1e-8] = 1.0
            cost = cdist((feats[treated] - mu) / sigma, (feats[ctrl] - mu) / sigma)
            t_idx, c_idx = linear_sum_assignment(cost)
            mapping.update(zip(names[treated[t_idx]], names[ctrl[c_idx]]))
        if mapping:
            result[str(condition)] = mapping
    return result
