"""Ranks of each item's true class among its class scores: top-k accuracy of the
hierarchy's probes, and the codes of labels among sorted classes."""

from __future__ import annotations

import numpy as np


def topk_ranks(scores: np.ndarray, true_codes: np.ndarray) -> np.ndarray:
    """Rank (0 = first) of each row's true class among its scores; see :func:`topk_hits`.

    Returns
    -------
    ``(n,)`` float: the number of classes ranked above the true one, ``inf`` where the
    true code is ``-1``.
    """
    n = len(true_codes)
    ranks = np.full(n, np.inf)
    rows = np.flatnonzero(true_codes >= 0)
    if rows.size == 0:
        return ranks
    S = scores[rows]
    t = true_codes[rows]
    true_score = S[np.arange(len(rows)), t]
    above = (S > true_score[:, None]).sum(axis=1)
    left = np.arange(S.shape[1])[None, :] < t[:, None]
    tied_before = ((S == true_score[:, None]) & left).sum(axis=1)
    ranks[rows] = above + tied_before
    return ranks


def topk_hits(scores: np.ndarray, true_codes: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's true class is among its ``k`` highest scores.

    A class ranks above the true one when its score is strictly higher; ties are
    broken against the true class (a class tied with it counts as above when it comes
    first), so constant scores never count as hits beyond chance.

    Parameters
    ----------
    scores
        ``(n, n_classes)`` class scores (probabilities, votes).
    true_codes
        ``(n,)`` true class index per row; ``-1`` (class unknown to the scorer) is a miss.
    k
        How many top classes count.
    """
    return topk_ranks(scores, true_codes) < k


def class_codes(classes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in the sorted array ``classes``; ``-1`` where it is not a class."""
    classes = np.asarray(classes)
    values = np.asarray(values)
    if len(classes) == 0:
        return np.full(len(values), -1)
    pos = np.minimum(np.searchsorted(classes, values), len(classes) - 1)
    return np.where(classes[pos] == values, pos, -1)
