"""Metrics of the perturbation-analysis hierarchy (Bendidi et al. 2024, arXiv:2410.13956).

Every function here is chunked or aggregated so that a screen of a million cells and
ten thousand perturbations fits in a laptop's memory: no cells × cells, cells × genes
or per-pair Python work.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.evaluation.distances import default_n_jobs, map_row_blocks, squared_norms
from czb.evaluation.metrics.mixing import lisi
from czb.evaluation.neighbors import knn_search
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


def ilisi(X: np.ndarray, batches: np.ndarray, *, perplexity: float,
          exact: bool | None = True) -> tuple[float, float]:
    """Mean iLISI and its normalised value ``1 + (mean - 1) / (B - 1)``.

    Neighbours: the ``3 * perplexity`` nearest other cells (Euclidean), as Harmony's
    ``compute_lisi``; kernel ``exp(-beta * distance)`` calibrated per cell to ``perplexity``
    (:func:`czb.evaluation.metrics.mixing.lisi`, in row chunks).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batches
        ``(n_cells,)`` batch labels.
    perplexity
        Effective number of neighbours.
    exact
        Neighbour search (:func:`czb.evaluation.neighbors.knn_search`): ``True`` exact,
        ``False`` approximate, ``None`` exact up to its size threshold.

    Returns
    -------
    ``(mean, normalised)``; NaN for both with fewer than two batches.
    """
    n_batches = len(pd.unique(np.asarray(batches)))
    if n_batches < 2 or len(X) < 2:
        return float("nan"), float("nan")
    k = int(min(3 * perplexity + 1, len(X)))  # +1: the cell itself, ignored by lisi()
    idx, dist = knn_search(X, None, k, exact=exact)
    values = lisi(idx, dist, batches, perplexity=min(perplexity, (k - 1) / 3))
    mean = float(np.nanmean(values))
    return mean, 1.0 + (mean - 1.0) / (n_batches - 1)


# --------------------------------------------------------------------------- top-k accuracy


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


# --------------------------------------------------------------------------- kNN vote


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
    """Rank of each query's true class in its vote, as :func:`topk_ranks` on the dense
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


# --------------------------------------------------------------------------- linear probe


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty: scikit-learn's
    ``LogisticRegression(C=C, solver="lbfgs")`` objective and stopping rule, computed
    for many cells and classes.

    Minimises ``mean_i(-log p_i[y_i]) + ||W||^2 / (2 C n)`` (the intercept is not
    penalised) with scipy's L-BFGS-B from zeros, ``gtol=tol``, ``maxls=50`` and
    ``ftol=64 eps`` as scikit-learn does, so it takes the same steps. The loss and
    gradient are computed in float32 over row chunks in parallel threads (one BLAS
    thread each), so memory is O(chunk × classes) per thread and the cells × classes
    probability matrix never exists. Per chunk: one GEMM for the logits (the intercept
    as a column of ones), ``exp`` and a row sum, and one GEMM accumulating
    ``exp(Z)^T (X / rowsum)`` in place; the one-hot part of the gradient (per-class
    sums of ``X``) is computed once. The logits are shifted by their row maximum only
    when a norm bound says ``exp`` could overflow.

    Attributes (after :meth:`fit`)
    ------------------------------
    coef_
        ``(n_classes, n_dims)`` float32.
    intercept_
        ``(n_classes,)`` float32.
    n_iter_
        L-BFGS iterations.
    converged_
        Whether L-BFGS met its tolerance before ``max_iter``.
    """

    #: Logits within +-this are exponentiated unshifted (float32 exp overflows at 88).
    _SAFE_LOGIT = 60.0

    def __init__(self, C: float = 1.0, *, max_iter: int = 100, tol: float = 1e-4, chunk_rows: int = 256,
                 n_jobs: int | None = None):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.chunk_rows = chunk_rows
        self.n_jobs = n_jobs

    def _loss_grad(self, theta: np.ndarray, Xa: np.ndarray, codes: np.ndarray, class_sums: np.ndarray,
                   row_norms: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and gradient at ``theta`` (``(K, d + 1)`` raveled: weights, intercept)
        for ``Xa = [X, 1]`` (float32)."""
        from scipy.linalg.blas import sgemm

        n, d1 = Xa.shape
        n_classes = class_sums.shape[0]
        Wb = theta.reshape(n_classes, d1)
        Wt = np.ascontiguousarray(Wb.T, dtype=np.float32)  # (d + 1, K)
        w_norm = float(np.sqrt(np.einsum("ij,ij->i", Wb, Wb).max()))
        starts = range(0, n, self.chunk_rows)
        n_jobs = max(1, min(self.n_jobs or default_n_jobs(), len(starts)))

        def work(worker: int) -> tuple[float, np.ndarray]:
            G = np.zeros((n_classes, d1), dtype=np.float32, order="F")  # += exp(Z)^T (X / s)
            Z = np.empty((self.chunk_rows, n_classes), dtype=np.float32)
            loss = 0.0
            for start in starts[worker::n_jobs]:
                Xc = Xa[start:start + self.chunk_rows]
                m = len(Xc)
                z = np.matmul(Xc, Wt, out=Z[:m])
                z_true = z[np.arange(m), codes[start:start + m]].astype(np.float64)
                if row_norms[start:start + m].max() * w_norm > self._SAFE_LOGIT:
                    shift = z.max(axis=1, keepdims=True)
                    z -= shift
                    loss += float(shift.sum(dtype=np.float64))
                np.exp(z, out=z)
                s = z.sum(axis=1)
                loss += float(np.log(s.astype(np.float64)).sum() - z_true.sum())
                Xs = Xc / s[:, None]
                # G += z^T Xs in place (Fortran views: no copies).
                sgemm(1.0, z.T, Xs.T, beta=1.0, c=G, trans_b=1, overwrite_c=1)
            return loss, G

        parts: list = [None] * n_jobs

        def run(workers: np.ndarray) -> None:
            parts[workers[0]] = work(int(workers[0]))

        map_row_blocks(run, np.arange(n_jobs), n_jobs=n_jobs, block=1)
        loss = sum(p[0] for p in parts) / n
        G = (sum(p[1].astype(np.float64) for p in parts) - class_sums) / n
        l2 = 1.0 / (self.C * n)
        W = Wb[:, :-1]
        loss += 0.5 * l2 * float(np.sum(W * W))
        G[:, :-1] += l2 * W
        return loss, G.ravel()

    def fit(self, X: np.ndarray, codes: np.ndarray, n_classes: int) -> SoftmaxRegression:
        """Fit on ``X`` ``(n, d)`` with integer classes ``codes`` in ``[0, n_classes)``."""
        from scipy import optimize

        n, d = X.shape
        Xa = np.empty((n, d + 1), dtype=np.float32)
        Xa[:, :d] = X
        Xa[:, d] = 1.0
        codes = np.asarray(codes, dtype=np.int64)
        one_hot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_classes, n))
        class_sums = np.asarray(one_hot @ Xa.astype(np.float64))
        row_norms = np.sqrt(np.einsum("ij,ij->i", Xa, Xa, dtype=np.float64))
        result = optimize.minimize(
            self._loss_grad, np.zeros(n_classes * (d + 1)), args=(Xa, codes, class_sums, row_norms),
            method="L-BFGS-B", jac=True,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol, "ftol": 64 * np.finfo(float).eps},
        )
        Wb = result.x.reshape(n_classes, d + 1)
        self.coef_ = Wb[:, :d].astype(np.float32)
        self.intercept_ = Wb[:, d].astype(np.float32)
        self.n_iter_ = int(result.nit)
        self.n_evaluations_ = int(result.nfev)
        self.converged_ = bool(result.success)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` float32 logits (ranked like the probabilities)."""
        Z = np.asarray(X, dtype=np.float32) @ self.coef_.T
        Z += self.intercept_
        return Z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` softmax probabilities (float64)."""
        Z = self.decision_function(X).astype(np.float64)
        Z -= Z.max(axis=1, keepdims=True)
        np.exp(Z, out=Z)
        Z /= Z.sum(axis=1, keepdims=True)
        return Z


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


def _column_ranks(A: np.ndarray, *, n_jobs: int | None = None, block: int = 32) -> np.ndarray:
    """Average ranks of each column (ties share their mean rank, 1-based), as
    ``scipy.stats.rankdata(A, axis=0)``; columns sorted in parallel threads."""
    A = np.asarray(A, dtype=np.float64)
    n, n_cols = A.shape
    out = np.empty((n, n_cols))
    if n == 0:
        return out

    def ranks(block_cols: np.ndarray) -> None:
        cols = slice(block_cols[0], block_cols[-1] + 1)
        B = np.ascontiguousarray(A[:, cols].T)  # one column per row: contiguous sorts
        order = np.argsort(B, axis=1)
        v = np.take_along_axis(B, order, axis=1)
        first = np.ones(v.shape, dtype=bool)
        first[:, 1:] = v[:, 1:] != v[:, :-1]
        last = np.ones(v.shape, dtype=bool)
        last[:, :-1] = first[:, 1:]
        pos = np.arange(n)
        start_pos = np.maximum.accumulate(np.where(first, pos, 0), axis=1)
        end_pos = np.minimum.accumulate(np.where(last, pos, n)[:, ::-1], axis=1)[:, ::-1]
        R = np.empty(v.shape)
        np.put_along_axis(R, order, (start_pos + end_pos) / 2.0 + 1.0, axis=1)
        out[:, cols] = R.T

    map_row_blocks(ranks, np.arange(n_cols), n_jobs=n_jobs, block=block)
    return out


def per_gene_spearman(pred: np.ndarray, truth) -> np.ndarray:
    """Spearman correlation of each column of ``pred`` with the same column of ``truth``.

    Parameters
    ----------
    pred
        ``(n, n_genes)`` dense predictions.
    truth
        ``(n, n_genes)`` dense, or sparse: then its ranks are computed from the stored
        entries (:func:`sparse_column_ranks`) and it is never densified.

    Returns
    -------
    ``(n_genes,)``; NaN where either column is constant (no ranking to compare).
    """
    if sp.issparse(truth):
        return _spearman_sparse_truth(pred, truth)
    rp = _column_ranks(pred)
    rt = _column_ranks(truth)
    rp -= rp.mean(axis=0)
    rt -= rt.mean(axis=0)
    num = (rp * rt).sum(axis=0)
    den = np.sqrt((rp * rp).sum(axis=0) * (rt * rt).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def sparse_column_ranks(T) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
    """Per-column average ranks (``scipy.stats.rankdata``, 1-based) of a sparse matrix
    whose unstored entries are zeros, from one sort of the stored values.

    Returns
    -------
    T
        The matrix as CSC without stored zeros.
    ranks
        ``(nnz,)`` rank of each stored entry, aligned with ``T.data``.
    zero_rank
        ``(n_genes,)`` the rank every zero of the column shares.
    """
    T = sp.csc_matrix(T, dtype=np.float64, copy=True)
    T.eliminate_zeros()
    n, n_cols = T.shape
    stored = np.diff(T.indptr)
    col = np.repeat(np.arange(n_cols), stored)
    order = np.lexsort((T.data, col))
    v, c = T.data[order], col[order]
    pos = np.arange(len(v)) - T.indptr[c]  # 0-based place among the column's stored values
    starts = np.ones(len(v), dtype=bool)
    starts[1:] = (c[1:] != c[:-1]) | (v[1:] != v[:-1])
    group = np.cumsum(starts) - 1
    first = pos[starts]
    last = np.append(pos[np.flatnonzero(starts)[1:] - 1], pos[-1:]) if len(v) else first
    rank = (first + last)[group] / 2.0 + 1.0
    zeros = n - stored
    negative = np.bincount(c[v < 0], minlength=n_cols)
    rank = np.where(v > 0, rank + zeros[c], rank)  # zeros rank between negatives and positives
    ranks = np.empty(len(v))
    ranks[order] = rank
    return T, ranks, negative + (zeros + 1) / 2.0


def _spearman_sparse_truth(pred: np.ndarray, truth) -> np.ndarray:
    """:func:`per_gene_spearman` with sparse ``truth``: Pearson of the rank columns,
    using that every zero of a truth column shares one rank."""
    n = pred.shape[0]
    T, ranks, zero_rank = sparse_column_ranks(truth)
    rp = _column_ranks(pred)
    mean = (n + 1) / 2.0  # average ranks always sum to n (n + 1) / 2
    stored = np.diff(T.indptr)
    col = np.repeat(np.arange(T.shape[1]), stored)
    cross = zero_rank * rp.sum(axis=0) + np.bincount(
        col, weights=rp[T.indices, col] * (ranks - zero_rank[col]), minlength=T.shape[1])
    cov = cross - n * mean * mean
    var_t = (n - stored) * zero_rank**2 + np.bincount(col, weights=ranks**2, minlength=T.shape[1]) - n * mean**2
    var_p = np.einsum("ij,ij->j", rp, rp) - n * mean**2
    den = np.sqrt(np.maximum(var_p, 0.0) * np.maximum(var_t, 0.0))
    # Rank variances are integers/4 or more: below 0.1 they are zero up to rounding.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((var_p > 0.1) & (var_t > 0.1), cov / den, np.nan)


def centred_distance_terms(P: np.ndarray, T, rows: np.ndarray, controls: np.ndarray) -> tuple[float, float]:
    """``||P~ - T~||_F^2`` and ``||T~||_F^2`` over ``rows``, with ``P~``, ``T~`` the rows
    of ``P`` (dense) and ``T`` (dense or sparse CSR, never densified) minus the mean of
    their ``controls`` rows (structural integrity's per-batch terms)."""
    Pc = P[rows] - P[controls].mean(axis=0)
    if not sp.issparse(T):
        Tc = T[rows] - T[controls].mean(axis=0)
        return float(np.sum((Pc - Tc) ** 2)), float(np.sum(Tc**2))
    T = sp.csr_matrix(T)
    mu = np.asarray(T[controls].mean(axis=0)).ravel()
    Tr = T[rows].tocoo()
    col_sum = np.asarray(Tr.sum(axis=0)).ravel()
    # <Pc, Tr - 1 mu'> and ||Tr - 1 mu'||^2 from the stored entries and column sums.
    inner = float(np.dot(Pc[Tr.row, Tr.col], Tr.data) - mu @ Pc.sum(axis=0))
    truth_sq = float(np.dot(Tr.data, Tr.data) - 2.0 * mu @ col_sum + len(rows) * mu @ mu)
    return float(np.sum(Pc * Pc)) - 2.0 * inner + truth_sq, truth_sq


def structural_integrity(distance_per_batch: np.ndarray, truth_norm_per_batch: np.ndarray) -> float:
    """``1 - mean_b(d_b) / (2 mean_b(m_b))`` from per-batch ``d_b = ||P~ - T~||_F / n_b`` and
    ``m_b = ||T~||_F / n_b``."""
    d = np.asarray(distance_per_batch, dtype=np.float64)
    m = np.asarray(truth_norm_per_batch, dtype=np.float64)
    if len(d) == 0 or m.mean() == 0:
        return float("nan")
    return float(1.0 - d.mean() / (2.0 * m.mean()))
