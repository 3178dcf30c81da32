"""Metrics of levels 3-4 of the perturbation-analysis hierarchy (Bendidi et al. 2024,
arXiv:2410.13956): the consistency of a perturbation's cells (mean pairwise cosine
against a null) and the distance-weighted k-nearest-neighbour vote.

Chunked and aggregated: no cells x cells matrix and no per-pair Python work.
"""

from __future__ import annotations

import numpy as np

from czb.evaluation.distances import map_row_blocks, squared_norms
from czb.evaluation.neighbors import knn_search
from czb.evaluation.registry import MetricInfo, register_metric

_PAPER = "arXiv:2410.13956"
_EFAAR = "doi:10.1371/journal.pcbi.1012463"

CONSISTENCY = register_metric(MetricInfo(
    name="perturbation_consistency",
    description="Share of perturbations (2+ cells, expressed target gene) whose mean pairwise cosine "
    "similarity between cells beats the null of unexpressed-gene perturbations at p < 0.05 "
    "(p = (1 + #null >= observed) / (1 + #null)); about 0.05 for an embedding without signal.",
    reference=_EFAAR,
))
KNN_TOP1 = register_metric(MetricInfo(
    name="knn_top1",
    description="Top-1 accuracy on test1 (no controls) of a distance-weighted k-nearest-neighbour vote "
    "among train cells (at most 100,000, a perturbation-stratified subsample; k = floor(sqrt(#reference "
    "cells)) made odd unless set, as Tx-Evaluation); chance = 1/#perturbations.",
    reference=_PAPER,
))
KNN_TOP5 = register_metric(MetricInfo(
    name="knn_top5",
    description="Top-5 accuracy of the k-nearest-neighbour vote on test1 (the true perturbation among "
    "the 5 classes with the largest vote).",
    reference=_PAPER,
))


def mean_pairwise_cosine(X: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean cosine similarity over distinct pairs of rows within each group, without pairs.

    With unit rows ``u`` (zero rows stay zero, as scikit-learn's ``normalize``) the sum
    over ordered pairs ``i != j`` of a group is ``||sum u||^2 - sum ||u||^2``, so the
    mean is that divided by ``n (n - 1)``: O(cells × dims) instead of O(n²) per group.

    Returns
    -------
    means
        ``(n_groups,)``; NaN for groups with fewer than two rows.
    sizes
        ``(n_groups,)`` rows per group.
    """
    X = np.asarray(X, dtype=np.float64)
    norms = np.sqrt(squared_norms(X))
    U = np.divide(X, norms[:, None], out=np.zeros_like(X), where=norms[:, None] > 0)
    sums = np.zeros((n_groups, X.shape[1]))
    np.add.at(sums, codes, U)
    self_terms = np.bincount(codes, weights=(norms > 0).astype(float), minlength=n_groups)
    sizes = np.bincount(codes, minlength=n_groups)
    pair_sum = np.einsum("ij,ij->i", sums, sums) - self_terms
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(sizes >= 2, pair_sum / (sizes * (sizes - 1.0)), np.nan)
    return means, sizes


def empirical_pvalues(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """``(1 + #{null >= observed}) / (1 + #null)`` for each observed value (NaN stays NaN)."""
    null = np.sort(np.asarray(null, dtype=np.float64))
    observed = np.asarray(observed, dtype=np.float64)
    at_least = len(null) - np.searchsorted(null, observed, side="left")
    p = (1.0 + at_least) / (1.0 + len(null))
    return np.where(np.isnan(observed), np.nan, p)


#: Added to each neighbour's distance before inverting it into a vote weight (Tx-Evaluation).
KNN_EPSILON = 1e-5


def weighted_votes(neighbor_codes: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance-weighted kNN votes as sparse triplets.

    Each neighbour votes for its class with weight ``1 / (distance + 1e-5)``
    (Tx-Evaluation's ``WeightedKNNClassifier`` with Euclidean distance).

    Parameters
    ----------
    neighbor_codes
        ``(n_queries, k)`` class of each query's neighbours.
    distances
        ``(n_queries, k)`` their distances.

    Returns
    -------
    ``(rows, classes, votes)``: one entry per query and class with at least one vote,
    sorted by query then class.
    """
    m, k = neighbor_codes.shape
    order = np.argsort(neighbor_codes, axis=1, kind="stable")
    codes = np.take_along_axis(neighbor_codes, order, axis=1).ravel()
    weights = (1.0 / (np.take_along_axis(np.asarray(distances, dtype=np.float64), order, axis=1)
                      + KNN_EPSILON)).ravel()
    row = np.repeat(np.arange(m), k)
    first = np.ones(len(codes), dtype=bool)
    first[1:] = (codes[1:] != codes[:-1]) | (row[1:] != row[:-1])
    starts = np.flatnonzero(first)
    if starts.size == 0:
        return row[:0], codes[:0], weights[:0]
    return row[starts], codes[starts], np.add.reduceat(weights, starts)


def vote_ranks(rows: np.ndarray, classes: np.ndarray, votes: np.ndarray, true_codes: np.ndarray) -> np.ndarray:
    """Rank of each query's true class in its vote, as
    :func:`~czb.evaluation.perturbation.hierarchy.ranking.topk_ranks` on the dense
    query × class vote matrix, without building it.

    A true class without votes (or code ``-1``) gets rank ``inf``: a miss however few
    classes were voted for.
    """
    m = len(true_codes)
    truth = true_codes[rows]
    is_true = classes == truth
    true_vote = np.zeros(m)
    voted = np.zeros(m, dtype=bool)
    true_vote[rows[is_true]] = votes[is_true]
    voted[rows[is_true]] = True
    tv = true_vote[rows]
    above = ~is_true & ((votes > tv) | ((votes == tv) & (classes < truth)))
    ranks = np.bincount(rows, weights=above, minlength=m)
    ranks[~voted] = np.inf
    return ranks


def knn_vote_ranks(
    reference: np.ndarray,
    reference_codes: np.ndarray,
    query: np.ndarray,
    query_codes: np.ndarray,
    k: int,
    *,
    exact: bool | None = True,
    chunk_rows: int = 4096,
) -> np.ndarray:
    """Rank of each query's class in the distance-weighted vote of its ``k`` nearest
    reference cells (:func:`czb.evaluation.neighbors.knn_search`, :func:`weighted_votes`,
    :func:`vote_ranks`).

    Top-``t`` accuracy is ``mean(ranks < t)``. Memory: the ``(n_query, k)`` neighbour
    lists and O(chunk × k) besides; never a query × reference or query × class matrix.

    Parameters
    ----------
    reference, reference_codes
        ``(n_reference, n_dims)`` cells and their class codes.
    query, query_codes
        ``(n_query, n_dims)`` cells and their true class codes (``-1``: unknown, a miss).
    k
        Neighbours per query (at most ``n_reference`` are used).
    exact
        Passed to :func:`~czb.evaluation.neighbors.knn_search`.
    """
    idx, dist = knn_search(reference, query, k, exact=exact)
    ranks = np.empty(len(query))

    def chunk(rows: np.ndarray) -> None:
        r, c, v = weighted_votes(reference_codes[idx[rows]], dist[rows])
        ranks[rows] = vote_ranks(r, c, v, query_codes[rows])

    map_row_blocks(chunk, np.arange(len(query)), block=chunk_rows)
    return ranks
