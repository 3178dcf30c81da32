"""Genetic perturbation prediction: differential expression and the two published scorings.

Formulation 1, *expression shift* (GEARS, Roohani et al. 2023): a model predicts the
mean post-perturbation expression profile of each held-out condition; it is scored
against the observed mean profile on the condition's top-20 differentially expressed
(DE) genes and on all genes (MSE; Pearson correlation of the changes from the control
mean), and by the overlap of the genes it moves most with the genes that move most
(Jaccard).

Formulation 2, *masked genes* (cz-benchmarks' perturbation expression prediction): a
model predicts, in every cell of a condition and of its matched controls, the
expression of a seeded random half of the condition's DE genes; per condition, the
predicted change of those genes is rank-correlated (Spearman) with the observed log
fold changes of a Wilcoxon test.

Everything here works on log-normalised expression (``normalize_total(1e4)`` then
``log1p``, as scanpy makes it). The Wilcoxon and t-tests reproduce scanpy's
``rank_genes_groups`` (scores, log fold changes, p-values, Benjamini-Hochberg adjusted
p-values) without densifying the cells x genes matrix: each condition is tested in gene
blocks, and on sparse data only stored values are ranked (the zeros of a gene are one
tie group whose rank is known from their count).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.evaluation.registry import MetricInfo, register_metric

_GEARS = "doi:10.1038/s41587-023-01905-6"
_CZ = "https://github.com/chanzuckerberg/cz-benchmarks"

MSE_TOP20_DE = register_metric(
    MetricInfo(
        "mse_top20_de",
        "Mean squared error between predicted and observed mean log expression of a condition "
        "on its 20 most differentially expressed genes (by |test statistic|), mean over conditions.",
        _GEARS,
        range=(0.0, None),
        higher_is_better=False,
    )
)
MSE_ALL_GENES = register_metric(
    MetricInfo(
        "mse_all_genes",
        "Mean squared error between predicted and observed mean log expression of a condition "
        "on all genes, mean over conditions.",
        _GEARS,
        range=(0.0, None),
        higher_is_better=False,
    )
)
PEARSON_DELTA_TOP20_DE = register_metric(
    MetricInfo(
        "pearson_delta_top20_de",
        "Pearson correlation of predicted and observed changes from the control mean "
        "(perturbed - control) on a condition's top-20 DE genes, mean over conditions; "
        "0 where a change vector is constant.",
        _GEARS,
        range=(-1.0, 1.0),
    )
)
PEARSON_DELTA_ALL_GENES = register_metric(
    MetricInfo(
        "pearson_delta_all_genes",
        "Pearson correlation of predicted and observed changes from the control mean on all "
        "genes, mean over conditions; 0 where a change vector is constant.",
        _GEARS,
        range=(-1.0, 1.0),
    )
)
JACCARD_DE_GENES = register_metric(
    MetricInfo(
        "jaccard_de_genes",
        "Jaccard similarity of the 20 genes with the largest predicted |change from control| and "
        "the 20 with the largest observed |change|, mean over conditions.",
        _GEARS,
    )
)
SPEARMAN_CORRELATION = register_metric(
    MetricInfo(
        "spearman_correlation_calculation",
        "Per condition, Spearman correlation of predicted changes (log ratio of treated to matched "
        "control means) and observed Wilcoxon log2 fold changes of the masked DE genes; 0 where "
        "undefined (cz-benchmarks' perturbation expression prediction).",
        _CZ,
        range=(-1.0, 1.0),
        stochastic=True,  # the masked genes are drawn with the seed
    )
)

#: Formulation-1 metric names, in reporting order.
EXPRESSION_SHIFT_METRICS = (
    MSE_TOP20_DE.name,
    MSE_ALL_GENES.name,
    PEARSON_DELTA_TOP20_DE.name,
    PEARSON_DELTA_ALL_GENES.name,
    JACCARD_DE_GENES.name,
)


# --------------------------------------------------------------------------- #
# Expression matrices
# --------------------------------------------------------------------------- #


def log_normalize(counts, target_sum: float = 1e4):
    """``log1p(counts / total * target_sum)`` per cell (scanpy's ``normalize_total`` + ``log1p``).

    Parameters
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, sparse or dense.
    target_sum
        Total every cell is scaled to.

    Returns
    -------
    ``float64`` matrix of the same shape (CSR if the input is sparse); cells with no
    counts stay zero.
    """
    if sp.issparse(counts):
        X = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        totals = np.asarray(X.sum(axis=1)).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        X.data *= np.repeat(scale, np.diff(X.indptr))
        np.log1p(X.data, out=X.data)
        return X
    X = np.asarray(counts, dtype=np.float64)
    totals = X.sum(axis=1)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(X * scale[:, None])


def condition_means(
    X, conditions: np.ndarray, categories: Sequence | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Mean expression profile of every condition.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` expression, sparse or dense.
    conditions
        ``(n_cells,)`` condition labels.
    categories
        Conditions to return, in this order (default: sorted unique labels).

    Returns
    -------
    ``(categories, means)``: ``(n_conditions,)`` labels and ``(n_conditions, n_genes)``
    ``float64`` means (NaN rows for conditions without cells).
    """
    conditions = np.asarray(conditions).astype(str)
    cats = np.unique(conditions) if categories is None else np.asarray(categories).astype(str)
    codes = pd.Categorical(conditions, categories=cats).codes
    keep = codes >= 0
    sizes = np.bincount(codes[keep], minlength=len(cats)).astype(np.float64)
    indicator = sp.csr_matrix(
        (np.ones(keep.sum()), (codes[keep], np.flatnonzero(keep))), shape=(len(cats), len(conditions))
    )
    sums = indicator @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cats, sums / sizes[:, None]


# --------------------------------------------------------------------------- #
# Differential expression
# --------------------------------------------------------------------------- #


def benjamini_hochberg(pvals: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (statsmodels' ``fdr_bh``); NaN p-values count as 1.

    ``p_adj[(i)] = min(1, min_{j >= i} p_(j) * m / j)`` over the p-values sorted ascending.
    """
    p = np.asarray(pvals, dtype=np.float64).copy()
    p[np.isnan(p)] = 1.0
    m = p.size
    if m == 0:
        return p
    order = np.argsort(p, kind="mergesort")
    scaled = p[order] * m / np.arange(1, m + 1)
    adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _wilcoxon_block(block: sp.csc_matrix, n1: int, tie_correct: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rank sum of the first ``n1`` rows and the tie coefficient of every column.

    ``block`` is ``(n, n_cols)`` CSC without stored zeros. Ranks are the average ranks
    of each column's values among all ``n`` rows (``scipy.stats.rankdata``); the
    implicit zeros of a column form one tie group.
    """
    n, n_cols = block.shape
    per_col = np.diff(block.indptr)
    zeros = n - per_col
    col = np.repeat(np.arange(n_cols), per_col)
    data, rows = block.data, block.indices
    if data.size == 0:
        rank_sum = n1 * (n + 1) / 2.0 * np.ones(n_cols)
        tc = np.where(n > 1, 0.0, 1.0) * np.ones(n_cols) if tie_correct else np.ones(n_cols)
        return rank_sum, tc
    order = np.lexsort((data, col))
    d, c, r = data[order], col[order], rows[order]
    new = np.ones(d.size, dtype=bool)
    new[1:] = (c[1:] != c[:-1]) | (d[1:] != d[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, d.size))
    group = np.cumsum(new) - 1
    below = starts[group] - block.indptr[c]  # stored values of the column below this one
    rank = below + (sizes[group] + 1) / 2.0 + np.where(d > 0, zeros[c], 0)
    negatives = np.bincount(col[data < 0], minlength=n_cols)
    zero_rank = negatives + (zeros + 1) / 2.0
    first = r < n1
    stored_first = np.bincount(c[first], minlength=n_cols)
    rank_sum = np.bincount(c[first], weights=rank[first], minlength=n_cols) + (n1 - stored_first) * zero_rank
    if not tie_correct:
        return rank_sum, np.ones(n_cols)
    t = sizes.astype(np.float64)
    z = zeros.astype(np.float64)
    ties = np.bincount(c[starts], weights=t**3 - t, minlength=n_cols) + (z**3 - z)
    tc = 1.0 - ties / (float(n) ** 3 - n) if n > 1 else np.ones(n_cols)
    return rank_sum, tc


def _mean_var(X: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Column means and variances (ddof=1) of a CSR matrix."""
    n = X.shape[0]
    s = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(X.multiply(X).sum(axis=0), dtype=np.float64).ravel()
    mean = s / n
    var = (sq - n * mean**2) / (n - 1) if n > 1 else np.full_like(mean, np.nan)
    return mean, np.maximum(var, 0.0)


def _scanpy_order(scores: np.ndarray) -> np.ndarray:
    """Indices of the non-NaN ``scores``, largest first, ordered exactly as scanpy orders them.

    ``rank_genes_groups`` sorts with ``argpartition`` then a reversed ``argsort``; tied
    scores then come in that (implementation-defined) order, which decides which genes
    cz-benchmarks' seeded masking draws. Doing the same keeps the masks identical.
    """
    tested = np.flatnonzero(~np.isnan(scores))
    s = scores[tested]
    if s.size == 0:
        return tested
    partition = np.argpartition(s, -s.size)[-s.size:]
    return tested[partition[np.argsort(s[partition])[::-1]]]


@dataclass
class DifferentialExpression:
    """Per-condition test results against reference (control) cells.

    Attributes
    ----------
    conditions
        ``(n_conditions,)`` labels tested.
    genes
        ``(n_genes,)`` gene names.
    scores
        ``(n_conditions, n_genes)`` test statistics: Wilcoxon z-scores (rank sum of the
        condition's cells, normal approximation) or Welch t statistics. NaN for genes
        excluded by ``min_cells_per_gene``.
    logfoldchanges
        ``log2((expm1(mean_condition) + 1e-9) / (expm1(mean_reference) + 1e-9))`` of the
        log-normalised means (scanpy's definition).
    pvals
        Two-sided p-values.
    pvals_adj
        Benjamini-Hochberg adjusted over the tested genes of each condition.
    n_cells, n_reference
        ``(n_conditions,)`` cells of the condition and reference cells used.
    method
        ``"wilcoxon"`` or ``"t-test"``.
    """

    conditions: np.ndarray
    genes: np.ndarray
    scores: np.ndarray
    logfoldchanges: np.ndarray
    pvals: np.ndarray
    pvals_adj: np.ndarray
    n_cells: np.ndarray
    n_reference: np.ndarray
    method: str = "wilcoxon"

    def table(
        self,
        *,
        pval_threshold: float | None = None,
        min_abs_logfoldchange: float | None = None,
        condition_key: str = "condition",
    ) -> pd.DataFrame:
        """Long table like cz-benchmarks' ``de_results``, optionally filtered to DE genes.

        Columns ``condition_key``, ``gene``, ``score``, ``logfoldchange``, ``pval``,
        ``pval_adj``; within a condition, genes in decreasing score order, ties in the
        order scanpy's ``rank_genes_groups_df`` gives them; untested genes left out. A gene is kept when
        ``pval_adj < pval_threshold`` and ``|logfoldchange| >= min_abs_logfoldchange``
        (cz-benchmarks' filter; its defaults are 1e-4 and 1).
        """
        frames = []
        for i, condition in enumerate(self.conditions):
            idx = _scanpy_order(self.scores[i])
            keep = np.ones(len(idx), dtype=bool)
            if pval_threshold is not None:
                keep &= self.pvals_adj[i, idx] < pval_threshold
            if min_abs_logfoldchange is not None:
                keep &= np.abs(self.logfoldchanges[i, idx]) >= min_abs_logfoldchange
            idx = idx[keep]
            frames.append(
                pd.DataFrame(
                    {
                        condition_key: condition,
                        "gene": self.genes[idx],
                        "score": self.scores[i, idx],
                        "logfoldchange": self.logfoldchanges[i, idx],
                        "pval": self.pvals[i, idx],
                        "pval_adj": self.pvals_adj[i, idx],
                    }
                )
            )
        columns = [condition_key, "gene", "score", "logfoldchange", "pval", "pval_adj"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def differential_expression(
    X,
    conditions: np.ndarray,
    *,
    control: str | None = None,
    reference: Mapping[str, np.ndarray] | None = None,
    groups: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    method: str = "wilcoxon",
    tie_correct: bool = False,
    min_cells_per_gene: int = 0,
    log1p_base: float | None = None,
    block_size: int = 10_000_000,
) -> DifferentialExpression:
    """Test every condition against its reference cells, gene by gene (scanpy's definitions).

    Equal, up to floating-point rounding, to ``scanpy.tl.rank_genes_groups(adata,
    groupby, groups=[condition], reference=..., method=method, tie_correct=tie_correct,
    corr_method="benjamini-hochberg")`` run on the condition's cells plus its reference
    cells, as cz-benchmarks does per condition (and GEARS with ``method="t-test"``).

    Wilcoxon: ``z = (R - n1 (n1 + n2 + 1) / 2) / sqrt(tc n1 n2 (n1 + n2 + 1) / 12)`` with
    ``R`` the rank sum of the condition's cells among both groups (average ranks for
    ties), ``tc = 1`` unless ``tie_correct``; ``p = 2 sf(|z|)`` of the standard normal.
    t-test: Welch's t from means and variances (ddof=1), Welch-Satterthwaite degrees
    of freedom. Genes with an undefined statistic get score 0 and p-value 1.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` log-normalised expression (sparse CSR/CSC or dense);
        never densified whole: each condition is processed in gene blocks of at most
        ``block_size`` cells x genes.
    conditions
        ``(n_cells,)`` condition labels.
    control
        Label of the reference cells of every condition (all controls), or ...
    reference
        ... condition -> row indices of its own reference cells (matched controls,
        see :func:`match_controls`).
    groups
        Conditions to test (default: every label but ``control`` in order of first
        appearance, or the keys of ``reference``).
    genes
        ``(n_genes,)`` names (default ``0 .. n_genes-1`` as strings).
    method
        ``"wilcoxon"`` (cz-benchmarks) or ``"t-test"`` (GEARS' DE genes).
    tie_correct
        Tie-corrected Wilcoxon variance (scanpy's default, and cz-benchmarks': off).
    min_cells_per_gene
        Per condition, genes with a nonzero value in fewer of its cells plus reference
        cells are not tested (scanpy ``filter_genes(min_cells=...)`` on the merged
        cells); their results are NaN and they do not count in the BH adjustment.
    log1p_base
        Base of the log in ``X`` (``None``: natural), for the fold changes.

    Returns
    -------
    :class:`DifferentialExpression`.
    """
    from scipy import stats

    if (control is None) == (reference is None):
        msg = "differential_expression: give exactly one of control= and reference="
        raise ValueError(msg)
    if method not in ("wilcoxon", "t-test"):
        msg = f"differential_expression: unknown method {method!r}; known: wilcoxon, t-test"
        raise ValueError(msg)
    conditions = np.asarray(conditions).astype(str)
    n_cells, n_genes = X.shape
    gene_names = np.asarray(genes).astype(str) if genes is not None else np.arange(n_genes).astype(str)
    by_condition = pd.Series(np.arange(n_cells)).groupby(conditions).indices
    if groups is None:
        groups = [c for c in pd.unique(conditions) if c != control] if reference is None else list(reference)
    groups = [str(g) for g in groups]
    if not sp.issparse(X):
        X = np.asarray(X)
    elif X.format != "csr":
        X = sp.csr_matrix(X)
    expm1 = np.expm1 if log1p_base is None else (lambda x: np.expm1(x * np.log(log1p_base)))

    shape = (len(groups), n_genes)
    scores, lfc, pvals, padj = (np.full(shape, np.nan) for _ in range(4))
    n_group = np.zeros(len(groups), dtype=np.int64)
    n_ref = np.zeros(len(groups), dtype=np.int64)
    control_rows = by_condition.get(control, np.array([], dtype=np.int64)) if control is not None else None
    for i, group in enumerate(groups):
        rows1 = by_condition.get(group, np.array([], dtype=np.int64))
        rows2 = control_rows if reference is None else np.asarray(reference.get(group, []), dtype=np.int64)
        n1, n2 = len(rows1), len(rows2)
        n_group[i], n_ref[i] = n1, n2
        if n1 < 2 or n2 < 2:
            continue  # scanpy refuses groups of one cell
        sub = X[np.concatenate([rows1, rows2])]
        sub = sp.csr_matrix(sub) if not sp.issparse(sub) else sub.copy()
        sub.eliminate_zeros()
        tested = np.ones(n_genes, dtype=bool)
        if min_cells_per_gene > 0:
            detected = np.bincount(sub.indices[sub.data > 0], minlength=n_genes)
            tested = detected >= min_cells_per_gene
        mean1, var1 = _mean_var(sub[:n1])
        mean2, var2 = _mean_var(sub[n1:])
        if method == "wilcoxon":
            z = np.empty(n_genes)
            csc = sub.tocsc()
            n = n1 + n2
            step = max(block_size // n, 1)
            for lo in range(0, n_genes, step):
                hi = min(lo + step, n_genes)
                rank_sum, tc = _wilcoxon_block(csc[:, lo:hi], n1, tie_correct)
                with np.errstate(invalid="ignore", divide="ignore"):
                    z[lo:hi] = (rank_sum - n1 * (n + 1) / 2.0) / np.sqrt(tc * n1 * n2 * (n + 1) / 12.0)
            z[np.isnan(z)] = 0.0
            p = 2.0 * stats.norm.sf(np.abs(z))
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                z, p = stats.ttest_ind_from_stats(
                    mean1, np.sqrt(var1), n1, mean2, np.sqrt(var2), n2, equal_var=False
                )
            z = np.asarray(z, dtype=np.float64)
            p = np.asarray(p, dtype=np.float64)
            z[np.isnan(z)] = 0.0
            p[np.isnan(p)] = 1.0
        scores[i, tested] = z[tested]
        pvals[i, tested] = p[tested]
        padj[i, tested] = benjamini_hochberg(p[tested])
        with np.errstate(divide="ignore", invalid="ignore"):
            fold = np.log2((expm1(mean1) + 1e-9) / (expm1(mean2) + 1e-9))
        lfc[i, tested] = fold[tested]
    return DifferentialExpression(
        conditions=np.asarray(groups),
        genes=gene_names,
        scores=scores,
        logfoldchanges=lfc,
        pvals=pvals,
        pvals_adj=padj,
        n_cells=n_group,
        n_reference=n_ref,
        method=method,
    )


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


def top_de_genes(scores: np.ndarray, k: int = 20) -> np.ndarray:
    """Indices of the ``k`` genes with the largest |score| per condition (both directions).

    Parameters
    ----------
    scores
        ``(n_conditions, n_genes)`` test statistics (:attr:`DifferentialExpression.scores`);
        NaN (untested) genes come last.
    k
        Genes per condition (GEARS: 20, ranked by absolute statistic, ``rankby_abs``).

    Returns
    -------
    ``(n_conditions, k)`` int indices, largest |score| first (ties: lower index first).
    """
    magnitude = np.abs(np.asarray(scores, dtype=np.float64))
    magnitude[np.isnan(magnitude)] = -1.0
    return np.argsort(-magnitude, axis=1, kind="stable")[:, :k]


# --------------------------------------------------------------------------- #
# Formulation 1: expression shift
# --------------------------------------------------------------------------- #


#: Size (relative to max(1, |control|), in log1p units) below which a predicted change
#: counts as none: float32 normalisation and averaging leave errors of ~1e-6.
CHANGE_RESOLUTION = 1e-5


def _row_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching rows; NaN where a row is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=1) / denom
    r[denom == 0] = np.nan
    return np.clip(r, -1.0, 1.0)


def top_changed(delta: np.ndarray, k: int) -> list[set[int]]:
    """Per row, the ``k`` genes with the largest |delta| among those with a nonzero delta.

    A predictor that moves no gene has an empty set.
    """
    delta = np.asarray(delta, dtype=np.float64)
    order = np.argsort(-np.abs(delta), axis=1, kind="stable")[:, :k]
    return [set(o[delta[i, o] != 0].tolist()) for i, o in enumerate(order)]


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|``; 1 when both are empty."""
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def expression_shift_scores(
    predicted: np.ndarray,
    observed: np.ndarray,
    control: np.ndarray,
    top_de: np.ndarray,
    *,
    conditions: Sequence[str] | None = None,
    k_jaccard: int = 20,
) -> pd.DataFrame:
    """The formulation-1 metrics of every condition (GEARS' definitions).

    With ``p``, ``o`` a condition's predicted and observed mean profile, ``c`` the
    control mean and ``D`` its top DE genes:

    - ``mse_top20_de = mean_{g in D} (p_g - o_g)^2``; ``mse_all_genes`` over all genes;
    - ``pearson_delta_top20_de = pearson(p_D - c_D, o_D - c_D)``; ``pearson_delta_all_genes``
      over all genes; 0 when either change vector is constant (undefined);
    - ``jaccard_de_genes``: Jaccard of the ``k_jaccard`` genes with the largest nonzero
      ``|p - c|`` and those with the largest nonzero ``|o - c|``.

    Predicted changes smaller than :data:`CHANGE_RESOLUTION` × max(1, |c|) (float32
    rounding of normalisation and averaging) count as zero.

    Parameters
    ----------
    predicted, observed
        ``(n_conditions, n_genes)`` mean log-normalised expression per condition.
    control
        ``(n_genes,)`` control mean (or ``(n_conditions, n_genes)``, one per condition).
    top_de
        ``(n_conditions, k)`` indices of each condition's observed top DE genes
        (:func:`top_de_genes`).
    conditions
        Row labels (index of the result).

    Returns
    -------
    DataFrame, one row per condition: the five metrics (:data:`EXPRESSION_SHIFT_METRICS`)
    and ``pearson_undefined`` (True when a Pearson value was set to 0).
    """
    p = np.asarray(predicted, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    c = np.broadcast_to(np.asarray(control, dtype=np.float64), o.shape)
    top_de = np.asarray(top_de)
    if p.shape != o.shape or top_de.shape[0] != o.shape[0]:
        msg = (
            f"expression_shift_scores: shapes differ: predicted {p.shape}, observed {o.shape}, "
            f"top_de {top_de.shape}"
        )
        raise ValueError(msg)
    rows = np.arange(o.shape[0])[:, None]
    err = (p - o) ** 2
    dp, do = p - c, o - c
    # A change at the level of float32 rounding is no change: a model that returns the
    # control profile (normalised and averaged in float32, written to a float32 file) must
    # score as "no change", not correlate rounding noise.
    dp[np.abs(dp) <= CHANGE_RESOLUTION * np.maximum(1.0, np.abs(c))] = 0.0
    r_top = _row_pearson(dp[rows, top_de], do[rows, top_de])
    r_all = _row_pearson(dp, do)
    pred_sets, obs_sets = top_changed(dp, k_jaccard), top_changed(do, k_jaccard)
    frame = pd.DataFrame(
        {
            MSE_TOP20_DE.name: err[rows, top_de].mean(axis=1),
            MSE_ALL_GENES.name: err.mean(axis=1),
            PEARSON_DELTA_TOP20_DE.name: np.nan_to_num(r_top, nan=0.0),
            PEARSON_DELTA_ALL_GENES.name: np.nan_to_num(r_all, nan=0.0),
            JACCARD_DE_GENES.name: [jaccard(a, b) for a, b in zip(pred_sets, obs_sets)],
            "pearson_undefined": np.isnan(r_top) | np.isnan(r_all),
        },
        index=pd.Index(conditions if conditions is not None else rows.ravel(), name="condition"),
    )
    return frame


def summarize_expression_shift(scores: pd.DataFrame) -> dict[str, float]:
    """Mean of each formulation-1 metric over conditions."""
    return {name: float(scores[name].mean()) for name in EXPRESSION_SHIFT_METRICS}


# --------------------------------------------------------------------------- #
# Formulation 2: masked DE genes
# --------------------------------------------------------------------------- #


@dataclass
class MaskedGenes:
    """Genes to predict per condition, and the conditions left out.

    Attributes
    ----------
    genes
        condition -> masked genes (in sampling order).
    skipped
        condition -> its number of DE genes, for conditions where
        ``int(n_de * fraction) < min_masked``.
    """

    genes: dict[str, list[str]]
    skipped: dict[str, int] = field(default_factory=dict)


def sample_masked_genes(
    de_table: pd.DataFrame,
    *,
    fraction: float = 0.5,
    min_masked: int = 5,
    seed: int = 42,
    condition_key: str = "condition",
    gene_key: str = "gene",
) -> MaskedGenes:
    """Seeded choice of the DE genes to mask in each condition (cz-benchmarks' ``sample_de_genes``).

    Conditions are visited in order of first appearance in ``de_table``; each gets
    ``int(n_de * fraction)`` of its DE genes drawn without replacement from one
    ``numpy.random.RandomState(seed)`` stream (the same draws as cz-benchmarks'
    ``np.random.seed(seed); np.random.choice(...)``, so the same table gives the same
    masks). A condition is skipped, and reported, when that number is below
    ``min_masked``: with the defaults, conditions with fewer than 10 DE genes.

    Parameters
    ----------
    de_table
        DE genes only (:meth:`DifferentialExpression.table` with the thresholds).
    """
    if fraction < 0 or min_masked < 0:
        msg = "sample_masked_genes: fraction and min_masked must be non-negative"
        raise ValueError(msg)
    rng = np.random.RandomState(seed)
    genes: dict[str, list[str]] = {}
    skipped: dict[str, int] = {}
    for condition in pd.unique(de_table[condition_key]):
        names = de_table.loc[de_table[condition_key] == condition, gene_key].to_numpy()
        n_mask = int(len(names) * fraction)
        if n_mask >= min_masked:
            genes[str(condition)] = rng.choice(names, size=n_mask, replace=False).tolist()
        else:
            skipped[str(condition)] = len(names)
    return MaskedGenes(genes=genes, skipped=skipped)


def masked_entries(
    obs_names: Sequence[str],
    var_names: Sequence[str],
    masked: MaskedGenes | Mapping[str, Sequence[str]],
    control_map: Mapping[str, Mapping[str, str]],
) -> sp.csr_matrix:
    """Which (cell, gene) entries are hidden from a model: each condition's masked genes
    in its perturbed cells that have a matched control.

    Returns
    -------
    ``(n_cells, n_genes)`` boolean CSR matrix, True where masked.
    """
    genes = masked.genes if isinstance(masked, MaskedGenes) else masked
    cell_index = pd.Index(np.asarray(obs_names).astype(str))
    gene_index = pd.Index(np.asarray(var_names).astype(str))
    rows, cols = [], []
    for condition, names in genes.items():
        cells = cell_index.get_indexer(list(control_map.get(condition, {})))
        g = gene_index.get_indexer(list(names))
        cells, g = cells[cells >= 0], g[g >= 0]
        rows.append(np.repeat(cells, len(g)))
        cols.append(np.tile(g, len(cells)))
    r = np.concatenate(rows) if rows else np.array([], dtype=np.int64)
    c = np.concatenate(cols) if cols else np.array([], dtype=np.int64)
    mask = sp.csr_matrix((np.ones(len(r), dtype=bool), (r, c)), shape=(len(cell_index), len(gene_index)))
    mask.sum_duplicates()
    return mask


def masked_gene_scores(
    predictions,
    *,
    cell_index: Sequence[str],
    gene_index: Sequence[str],
    de_table: pd.DataFrame,
    masked: MaskedGenes | Mapping[str, Sequence[str]],
    control_map: Mapping[str, Mapping[str, str]],
    operation: str = "ratio",
    condition_key: str = "condition",
    gene_key: str = "gene",
    metric_column: str = "logfoldchange",
) -> pd.DataFrame:
    """Spearman correlation of predicted and observed changes of the masked genes, per condition.

    cz-benchmarks' definition: for a condition, the genes are its masked genes that
    are in ``de_table`` (with a non-missing ``metric_column``) and among the predicted
    genes; the perturbed cells are the keys of ``control_map[condition]`` found among
    the predicted cells, each paired with its matched control (pairs with either cell
    missing are dropped). With ``t``, ``m`` the mean predicted value of a gene over the
    perturbed and over the paired control cells, the predicted change is
    ``log((t + 1e-8) / (m + 1e-8))`` (``operation="ratio"``; ``t - m`` for
    ``"difference"``, and for ``"ratio"`` whenever a mean is not positive); the
    observed change is the DE table's log2 fold change. Spearman (scipy) of the two
    vectors; 0 where undefined (constant vectors, or one gene).

    Parameters
    ----------
    predictions
        ``(n_predicted_cells, n_predicted_genes)`` model output, sparse or dense, in any
        unit monotone with expression.
    cell_index, gene_index
        Cell IDs of its rows, gene names of its columns.
    de_table
        DE genes (``condition_key``, ``gene_key``, ``metric_column`` columns).
    masked
        condition -> masked genes (:func:`sample_masked_genes`).
    control_map
        condition -> {perturbed cell ID: matched control cell ID} (:func:`match_controls`).

    Returns
    -------
    DataFrame, one row per scored condition: ``condition``, ``n_genes``, ``n_cells``,
    ``spearman_correlation_calculation``, ``operation`` (the one applied).
    """
    from scipy import stats

    if operation not in ("ratio", "difference"):
        msg = f"masked_gene_scores: operation must be 'ratio' or 'difference', not {operation!r}"
        raise ValueError(msg)
    genes_by_condition = masked.genes if isinstance(masked, MaskedGenes) else masked
    cells = pd.Index(np.asarray(cell_index).astype(str))
    gene_idx = pd.Index(np.asarray(gene_index).astype(str))
    if predictions.shape != (len(cells), len(gene_idx)):
        msg = (
            f"masked_gene_scores: predictions have shape {predictions.shape}, but "
            f"{len(cells)} cell IDs and {len(gene_idx)} gene names were given"
        )
        raise ValueError(msg)
    is_sparse = sp.issparse(predictions)
    if is_sparse:
        predictions = sp.csr_matrix(predictions)
    rows = []
    for condition in pd.unique(de_table[condition_key]):
        condition = str(condition)
        wanted = genes_by_condition.get(condition)
        if not wanted:
            continue
        de = de_table[de_table[condition_key].astype(str) == condition]
        truth = de.drop_duplicates(gene_key).set_index(gene_key)[metric_column]
        genes = [g for g in wanted if g in truth.index]
        true_change = truth.reindex(genes).to_numpy(dtype=np.float64)
        valid = ~np.isnan(true_change)
        genes, true_change = np.asarray(genes)[valid], true_change[valid]
        cols = gene_idx.get_indexer(genes)
        keep = cols >= 0
        genes, true_change, cols = genes[keep], true_change[keep], cols[keep]
        if len(cols) == 0:
            continue
        mapping = control_map.get(condition)
        if not isinstance(mapping, Mapping):
            msg = f"masked_gene_scores: no matched controls for condition {condition!r}"
            raise ValueError(msg)
        treated = cells.get_indexer(list(mapping.keys()))
        ctrl = cells.get_indexer(list(mapping.values()))
        pair = (treated >= 0) & (ctrl >= 0)
        treated, ctrl = treated[pair], ctrl[pair]
        if len(treated) == 0:
            continue
        t_block = predictions[treated][:, cols]
        c_block = predictions[ctrl][:, cols]
        t_mean = np.asarray(t_block.mean(axis=0), dtype=np.float64).ravel()
        c_mean = np.asarray(c_block.mean(axis=0), dtype=np.float64).ravel()
        applied = operation
        if operation == "ratio" and (np.any(t_mean <= 0) or np.any(c_mean <= 0)):
            applied = "difference"
        if applied == "ratio":
            pred_change = np.log((t_mean + 1e-8) / (c_mean + 1e-8))
        else:
            pred_change = t_mean - c_mean
        if len(cols) < 2:
            rho = np.nan
        else:
            with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", stats.ConstantInputWarning)
                rho = stats.spearmanr(true_change, pred_change).statistic
        rows.append(
            {
                "condition": condition,
                "n_genes": len(cols),
                "n_cells": len(treated),
                SPEARMAN_CORRELATION.name: 0.0 if np.isnan(rho) else float(rho),
                "operation": applied,
            }
        )
    columns = ["condition", "n_genes", "n_cells", SPEARMAN_CORRELATION.name, "operation"]
    return pd.DataFrame(rows, columns=columns)
