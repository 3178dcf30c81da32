"""Metrics of level 5 of the perturbation-analysis hierarchy (EFAAR; Bendidi et al. 2024):
recall of known gene relationships in the tails of the similarity null, its upper bound,
and the mean average precision of retrieving each gene's known partners.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from czb.core.errors import TaskError
from czb.evaluation.distances import squared_norms
from czb.evaluation.registry import MetricInfo, register_metric

_EFAAR = "doi:10.1371/journal.pcbi.1012463"

RELATIONSHIP_RECALL = register_metric(MetricInfo(
    name="relationship_recall",
    description="Percentage of a database's known gene pairs (both genes perturbed) whose cosine "
    "similarity of mean perturbation embeddings lies in the lowest or highest 5% of all pairs' "
    "similarities (EFAAR); about 10 for an embedding without signal.",
    reference=_EFAAR, range=(0.0, 100.0),
))
RELATIONSHIP_RECALL_BOUND = register_metric(MetricInfo(
    name="relationship_recall_upper_bound",
    description="The largest relationship_recall any embedding can reach on these genes: the number "
    "of pairs in the two 5% tails divided by the number of known pairs, capped at 100.",
    reference=_EFAAR, range=(0.0, 100.0),
))
RELATIONSHIP_MAP = register_metric(MetricInfo(
    name="relationship_map",
    description="Mean average precision (copairs' definition) of retrieving each gene's known partners "
    "by cosine similarity of mean perturbation embeddings, over genes with a known partner; "
    "chance is about the share of partners among the other genes. Cosines are compared at 1e-9 and "
    "ties ranked pessimistically (a partner tied with non-partners counts after them), so identical "
    "embeddings cannot score above chance; copairs ranks such partners first.",
    reference="doi:10.1038/s41467-025-60306-2",
))


def cosine_matrix(M: np.ndarray) -> np.ndarray:
    """``(P, P)`` float32 cosine similarities of the rows of ``M`` (zero rows: 0)."""
    M = np.asarray(M, dtype=np.float64)
    norms = np.sqrt(squared_norms(M))
    U = np.divide(M, norms[:, None], out=np.zeros_like(M), where=norms[:, None] > 0).astype(np.float32)
    S = U @ U.T
    np.clip(S, -1.0, 1.0, out=S)
    return S


def tail_recall(null_sorted: np.ndarray, query: np.ndarray, *, low: float = 0.05, high: float = 0.95) -> float:
    """Share of ``query`` similarities in the tails of the null distribution (EFAAR's recall).

    A value is in the low tail when the share of null values ``<=`` it is at most
    ``low``, and in the high tail when the share of null values ``<`` it is at least
    ``high`` (``compute_recall`` of efaar-benchmarking).

    Parameters
    ----------
    null_sorted
        Ascending similarities of all gene pairs.
    query
        Similarities of the known pairs.
    """
    n = len(null_sorted)
    if len(query) == 0 or n == 0:
        return float("nan")
    rank_left = np.searchsorted(null_sorted, query, side="left") / n
    rank_right = np.searchsorted(null_sorted, query, side="right") / n
    return float(np.mean((rank_right <= low) | (rank_left >= high)))


def tail_recall_upper_bound(null_sorted: np.ndarray, n_query: int, *, low: float = 0.05,
                            high: float = 0.95) -> float:
    """The largest :func:`tail_recall` any ``n_query`` known pairs can reach: the number of
    null values inside the two tails over ``n_query``, capped at 1 (the reference code's
    "perfect recall" counted the values between the tails instead)."""
    n = len(null_sorted)
    if n_query == 0 or n == 0:
        return float("nan")
    # Without ties the i-th smallest value (0-based) has right rank (i + 1) / n and left
    # rank i / n: count the i meeting each tail's test, with the same float comparisons.
    n_low = _count_below(lambda i: (i + 1) / n <= low, n)
    n_high = n - _count_below(lambda i: not i / n >= high, n)
    return min(1.0, (n_low + n_high) / n_query)


def _count_below(holds, n: int) -> int:
    """How many of ``i = 0 .. n-1`` satisfy ``holds``, a predicate true on a prefix."""
    lo, hi = 0, n  # bisection for the first i where it fails
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def upper_triangle(S: np.ndarray) -> np.ndarray:
    """Values above the diagonal of a square matrix, row by row (no self-pairs)."""
    return S[np.triu_indices(S.shape[0], k=1)]


#: Decimals kept of the float64 cosines ranked by :func:`cosine_mean_average_precisions`.
COSINE_DECIMALS = 9


def mean_average_precision(S: np.ndarray, partners: sp.csr_matrix, *, block_rows: int = 512) -> tuple[float, int]:
    """Mean over query genes of the average precision of retrieving their known partners.

    For each gene with at least one partner, the other genes are ranked by
    decreasing score; AP = mean over partners of (partners ranked at or above
    it) / (its rank), as copairs' ``average_precision``. Scores are compared exactly
    as given; ties are ranked pessimistically: a partner tied with non-partners comes
    after all of them (copairs' stable sort puts partners first instead, which gives a
    constant embedding a perfect score). Reads ``S`` one block of rows at a time.

    Parameters
    ----------
    S
        ``(P, P)`` score matrix, higher is more similar; no NaN.
    partners
        ``(P, P)`` symmetric boolean adjacency of known pairs (no diagonal).

    Returns
    -------
    ``(mAP, number of query genes)``; NaN when no gene has a partner.
    """
    return _mean_average_precisions(lambda rows: np.asarray(S[rows], dtype=np.float64), S.shape[0],
                                    [partners], block_rows)[0]


def cosine_mean_average_precisions(M: np.ndarray, partner_sets: Sequence[sp.csr_matrix], *,
                                   block_rows: int = 512) -> list[tuple[float, int]]:
    """:func:`mean_average_precision` of the cosine similarities of the rows of ``M``
    (zero rows: 0), for each adjacency in ``partner_sets``.

    The cosines are computed in float64 one block of ``block_rows`` rows at a time and
    rounded to :data:`COSINE_DECIMALS` decimals before ranking, so that mathematically
    equal cosines (identical or rescaled rows) tie exactly and take the pessimistic rule.

    Returns
    -------
    ``(mAP, number of query genes)`` per adjacency, in order.
    """
    M = np.asarray(M, dtype=np.float64)
    norms = np.sqrt(squared_norms(M))
    U = np.divide(M, norms[:, None], out=np.zeros_like(M), where=norms[:, None] > 0)

    def cosines(rows: np.ndarray) -> np.ndarray:
        # float64 noise (< 1e-12) is far below 1e-9, and 1e-9 far below the float32 spacing
        # (6e-8) of copairs' scores: untied scores keep copairs' order, equal ones tie.
        return np.round(U[rows] @ U.T, COSINE_DECIMALS)

    return _mean_average_precisions(cosines, len(U), partner_sets, block_rows)


def _mean_average_precisions(scores, P: int, partner_sets: Sequence[sp.csr_matrix],
                             block_rows: int) -> list[tuple[float, int]]:
    """Walk the queries of all adjacencies in row blocks; ``scores(rows)`` gives a
    ``(len(rows), P)`` float64 block, computed once for all adjacencies."""
    partner_sets = [sp.csr_matrix(A, dtype=bool) for A in partner_sets]
    is_query = [np.diff(A.indptr) > 0 for A in partner_sets]
    queries = np.flatnonzero(np.logical_or.reduce(is_query)) if is_query else np.empty(0, int)
    aps = [[] for _ in partner_sets]
    for start in range(0, len(queries), block_rows):
        rows = queries[start:start + block_rows]
        sims = scores(rows)
        if np.isnan(sims).any():
            msg = "similarity scores contain NaN; mean average precision needs comparable scores"
            raise TaskError(msg)
        for A, query, out in zip(partner_sets, is_query, aps):
            keep = query[rows]
            out.append(_average_precisions(sims[keep], A[rows[keep]].toarray(), rows[keep]))
    results = []
    for out in aps:
        values = np.concatenate(out) if out else np.empty(0)
        results.append((float(values.mean()) if len(values) else float("nan"), int(len(values))))
    return results


def _average_precisions(sims: np.ndarray, positive: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """AP of each query row: ``sims`` and ``positive`` are ``(len(rows), P)``, ``rows``
    the queries' own columns."""
    P = sims.shape[1]
    keys = -sims  # ascending keys: by score, descending
    keys[np.arange(len(rows)), rows] = np.nan  # self sorts last (after -inf scores), never counted
    # Among equal scores non-partners (False) first: the pessimistic tie rule.
    order = np.lexsort((positive, keys), axis=-1)
    ranked_pos = np.take_along_axis(positive, order, axis=1)[:, : P - 1]
    cum = np.cumsum(ranked_pos, axis=1)
    precision_at_pos = np.where(ranked_pos, cum / np.arange(1, P), 0.0)
    return precision_at_pos.sum(axis=1) / ranked_pos.sum(axis=1)
