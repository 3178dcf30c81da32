"""Metrics of the perturbation-analysis hierarchy (Bendidi et al. 2024, arXiv:2410.13956).

Every function here is chunked or aggregated so that a screen of a million cells and
ten thousand perturbations fits in a laptop's memory: no cells × cells, cells × genes
or per-pair Python work.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.evaluation.metrics.mixing import lisi
from czb.evaluation.neighbors import euclidean_block, exact_knn, squared_norms
from czb.evaluation.registry import MetricInfo, register_metric

_PAPER = "arXiv:2410.13956"
_EFAAR = "doi:10.1371/journal.pcbi.1012463"

ILISI_MEAN = register_metric(MetricInfo(
    name="ilisi_mean",
    description="Mean over test1 cells (controls included) of Harmony's LISI of batch labels: the "
    "inverse Simpson index of a perplexity-calibrated Gaussian kernel over each cell's neighbours; "
    "1 = one batch around every cell, #batches = perfectly mixed (the value the reference code logs "
    "as 'normalised').",
    reference="doi:10.1038/s41592-019-0619-0", range=(1.0, None),
))
ILISI_MEAN_NORMALIZED = register_metric(MetricInfo(
    name="ilisi_mean_normalized",
    description="1 + (ilisi_mean - 1) / (#batches - 1): the mean iLISI on the paper's normalised scale, "
    "1 (no mixing) to 2 (perfect mixing), comparable across numbers of batches.",
    reference=_PAPER, range=(1.0, 2.0),
))
LINEAR_PROBE_TOP1 = register_metric(MetricInfo(
    name="linear_probe_top1",
    description="Top-1 accuracy on test1 (held-out batches, train perturbations; no controls) of a "
    "multinomial logistic regression of the perturbed gene trained on train; chance = 1/#perturbations.",
    reference=_PAPER,
))
LINEAR_PROBE_TOP5 = register_metric(MetricInfo(
    name="linear_probe_top5",
    description="Top-5 accuracy of the linear probe on test1 (the true perturbation among the 5 most "
    "probable); chance = 5/#perturbations.",
    reference=_PAPER,
))
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
    "among train cells (k = floor(sqrt(#train cells)) unless set); chance = 1/#perturbations.",
    reference=_PAPER,
))
KNN_TOP5 = register_metric(MetricInfo(
    name="knn_top5",
    description="Top-5 accuracy of the k-nearest-neighbour vote on test1 (the true perturbation among "
    "the 5 classes with the largest vote).",
    reference=_PAPER,
))
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
    "chance is about the share of partners among the other genes.",
    reference="doi:10.1038/s41467-025-60306-2",
))
RECONSTRUCTION_SPEARMAN = register_metric(MetricInfo(
    name="reconstruction_spearman",
    description="Mean over genes of the Spearman correlation across test2 cells (held-out batches and "
    "perturbations, controls included) between log-normalised expression and a ridge decoder's "
    "prediction from the embedding, trained on train; genes constant in test2 are left out.",
    reference=_PAPER, range=(-1.0, 1.0),
))
STRUCTURAL_INTEGRITY = register_metric(MetricInfo(
    name="structural_integrity",
    description="1 - mean_b ||P_b - T_b||_F / n_b / (2 mean_b ||T_b||_F / n_b) over test2 batches b, "
    "with predicted (P) and true (T) expression each centred on the batch's own controls; 1 = the "
    "perturbation effects are reconstructed exactly, 0.5 = predicting no effect.",
    reference=_PAPER, range=(None, 1.0),
))


# --------------------------------------------------------------------------- iLISI


def ilisi(X: np.ndarray, batches: np.ndarray, *, perplexity: float) -> tuple[float, float]:
    """Mean iLISI and its normalised value ``1 + (mean - 1) / (B - 1)``.

    Neighbours: the ``3 * perplexity`` nearest other cells (Euclidean), as Harmony's
    ``compute_lisi``; kernel ``exp(-beta * distance)`` calibrated per cell to ``perplexity``.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batches
        ``(n_cells,)`` batch labels.
    perplexity
        Effective number of neighbours.

    Returns
    -------
    ``(mean, normalised)``; NaN for both with fewer than two batches.
    """
    n_batches = len(pd.unique(np.asarray(batches)))
    if n_batches < 2 or len(X) < 2:
        return float("nan"), float("nan")
    k = int(min(3 * perplexity + 1, len(X)))  # +1: the cell itself, ignored by lisi()
    idx, dist = exact_knn(X, k)
    values = lisi(idx, dist, batches, perplexity=min(perplexity, (k - 1) / 3))
    mean = float(np.nanmean(values))
    return mean, 1.0 + (mean - 1.0) / (n_batches - 1)


# --------------------------------------------------------------------------- top-k accuracy


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
    n = len(true_codes)
    hits = np.zeros(n, dtype=bool)
    known = true_codes >= 0
    rows = np.flatnonzero(known)
    if rows.size == 0:
        return hits
    true_score = scores[rows, true_codes[rows]]
    above = (scores[rows] > true_score[:, None]).sum(axis=1)
    cols = np.arange(scores.shape[1])
    tied_before = ((scores[rows] == true_score[:, None]) & (cols[None, :] < true_codes[rows, None])).sum(axis=1)
    hits[rows] = (above + tied_before) < k
    return hits


def class_codes(classes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in the sorted array ``classes``; ``-1`` where it is not a class."""
    classes = np.asarray(classes)
    values = np.asarray(values)
    if len(classes) == 0:
        return np.full(len(values), -1)
    pos = np.minimum(np.searchsorted(classes, values), len(classes) - 1)
    return np.where(classes[pos] == values, pos, -1)


def knn_votes(
    reference: np.ndarray,
    reference_codes: np.ndarray,
    query: np.ndarray,
    n_classes: int,
    k: int,
    *,
    on_block: Callable[[slice, np.ndarray], None],
    block_rows: int = 1024,
) -> None:
    """Distance-weighted k-nearest-neighbour votes of query cells, block by block.

    Each of the ``k`` nearest reference cells (Euclidean) votes for its class with
    weight ``1 / (distance + 1e-5)`` (Tx-Evaluation's weighting). Votes of a block of
    queries, shape ``(block, n_classes)``, are passed to ``on_block(rows, votes)``,
    so the full query × class matrix is never held.
    """
    reference = np.asarray(reference, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    k = min(k, len(reference))
    ref_norms = squared_norms(reference)
    for start in range(0, len(query), block_rows):
        block = query[start:start + block_rows]
        dist = euclidean_block(block, reference, squared_norms(block), ref_norms)
        nearest = np.argpartition(dist, k - 1, axis=1)[:, :k] if k < dist.shape[1] else np.tile(
            np.arange(dist.shape[1]), (len(block), 1))
        weights = 1.0 / (np.take_along_axis(dist, nearest, axis=1) + 1e-5)
        votes = np.zeros((len(block), n_classes))
        np.add.at(votes, (np.repeat(np.arange(len(block)), nearest.shape[1]), reference_codes[nearest].ravel()),
                  weights.ravel())
        on_block(slice(start, start + len(block)), votes)


# --------------------------------------------------------------------------- consistency


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


# --------------------------------------------------------------------------- known relationships


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


def mean_average_precision(S: np.ndarray, partners: sp.csr_matrix, *, block_rows: int = 512) -> tuple[float, int]:
    """Mean over query genes of the average precision of retrieving their known partners.

    For each gene with at least one partner, the other genes are ranked by
    decreasing similarity; AP = mean over partners of (partners ranked at or above
    it) / (its rank), as copairs' ``average_precision``. Ties are ranked
    pessimistically (a partner tied with non-partners comes after them).

    Parameters
    ----------
    S
        ``(P, P)`` similarity matrix.
    partners
        ``(P, P)`` symmetric boolean adjacency of known pairs (no diagonal).

    Returns
    -------
    ``(mAP, number of query genes)``; NaN when no gene has a partner.
    """
    partners = sp.csr_matrix(partners, dtype=bool)
    queries = np.flatnonzero(np.diff(partners.indptr) > 0)
    if queries.size == 0:
        return float("nan"), 0
    aps = np.empty(len(queries))
    P = S.shape[0]
    for start in range(0, len(queries), block_rows):
        rows = queries[start:start + block_rows]
        sims = np.asarray(S[rows], dtype=np.float64).copy()
        sims[np.arange(len(rows)), rows] = -np.inf  # self last, never counted
        positive = partners[rows].toarray()
        # By similarity, descending; on ties non-partners first (pessimistic); self last.
        order = np.lexsort((positive, -sims), axis=-1)
        ranked_pos = np.take_along_axis(positive, order, axis=1)[:, : P - 1]
        cum = np.cumsum(ranked_pos, axis=1)
        ranks = np.arange(1, P)
        precision_at_pos = np.where(ranked_pos, cum / ranks, 0.0)
        aps[start:start + len(rows)] = precision_at_pos.sum(axis=1) / ranked_pos.sum(axis=1)
    return float(aps.mean()), int(len(queries))


# --------------------------------------------------------------------------- reconstruction


def _column_ranks(A: np.ndarray) -> np.ndarray:
    """Average ranks of each column (ties share their mean rank), as ``scipy.stats.rankdata``."""
    from scipy.stats import rankdata

    return rankdata(A, axis=0)


def per_gene_spearman(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``pred`` with the same column of ``truth``.

    Returns
    -------
    ``(n_genes,)``; NaN where either column is constant (no ranking to compare).
    """
    rp = _column_ranks(pred)
    rt = _column_ranks(truth)
    rp -= rp.mean(axis=0)
    rt -= rt.mean(axis=0)
    num = (rp * rt).sum(axis=0)
    den = np.sqrt((rp * rp).sum(axis=0) * (rt * rt).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def structural_integrity(distance_per_batch: np.ndarray, truth_norm_per_batch: np.ndarray) -> float:
    """``1 - mean_b(d_b) / (2 mean_b(m_b))`` from per-batch ``d_b = ||P~ - T~||_F / n_b`` and
    ``m_b = ||T~||_F / n_b``."""
    d = np.asarray(distance_per_batch, dtype=np.float64)
    m = np.asarray(truth_norm_per_batch, dtype=np.float64)
    if len(d) == 0 or m.mean() == 0:
        return float("nan")
    return float(1.0 - d.mean() / (2.0 * m.mean()))
