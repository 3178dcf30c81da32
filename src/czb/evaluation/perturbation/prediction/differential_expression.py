"""Differential expression of perturbed against control cells: scanpy's Wilcoxon and
Welch t-tests with Benjamini-Hochberg adjustment, and each condition's top DE genes.

The tests reproduce scanpy's ``rank_genes_groups`` (scores, log fold changes,
p-values, Benjamini-Hochberg adjusted p-values) without densifying the cells x genes
matrix: each condition is tested in gene blocks, and on sparse data only stored values
are ranked (the zeros of a gene are one tie group whose rank is known from their count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


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
    continuity: bool = False,
    fold_change_epsilon: float = 1e-9,
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
        see :func:`~czb.evaluation.perturbation.prediction.controls.match_controls`).
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
    continuity
        Wilcoxon p-values with the continuity correction (``|R - n1 (n + 1) / 2| - 0.5``
        in the numerator, capped at 1), as pdex (cell-eval's DE) and
        ``scipy.stats.mannwhitneyu`` compute them; scores stay scanpy's z.
    fold_change_epsilon
        Pseudocount of the fold change (scanpy: 1e-9). With 0 (pdex, as cell-eval calls
        it) an undefined fold change (zero in both groups) is 0 and one-sided zeros give
        ``±inf``.

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
            deviation, sd = np.empty(n_genes), np.empty(n_genes)
            csc = sub.tocsc()
            n = n1 + n2
            step = max(block_size // n, 1)
            for lo in range(0, n_genes, step):
                hi = min(lo + step, n_genes)
                rank_sum, tc = _wilcoxon_block(csc[:, lo:hi], n1, tie_correct)
                deviation[lo:hi] = rank_sum - n1 * (n + 1) / 2.0
                sd[lo:hi] = np.sqrt(tc * n1 * n2 * (n + 1) / 12.0)
            with np.errstate(invalid="ignore", divide="ignore"):
                z = deviation / sd
                # pdex's p (scipy's mannwhitneyu): |U - mean| - 1/2 over sd, capped at 1
                zc = (np.abs(deviation) - 0.5) / sd if continuity else np.abs(z)
            z[np.isnan(z)] = 0.0
            zc[np.isnan(zc)] = 0.0
            p = np.minimum(2.0 * stats.norm.sf(zc), 1.0)
            p[sd == 0] = 1.0  # every value tied: no evidence
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
        eps = fold_change_epsilon
        with np.errstate(divide="ignore", invalid="ignore"):
            fold = np.log2((expm1(mean1) + eps) / (expm1(mean2) + eps))
        if eps == 0:
            fold[np.isnan(fold)] = 0.0  # pdex: 0/0 (and a negative mean) is no change
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
    ``(n_conditions, k)`` int indices, largest |score| first. |Scores| are ranked at
    :data:`RANK_DIGITS` significant digits, so values equal but for float noise
    (summation order, the CPU's kernels) tie, and ties go to the lower index: the
    genes chosen do not depend on the machine.
    """
    magnitude = np.abs(np.asarray(scores, dtype=np.float64))
    magnitude[np.isnan(magnitude)] = -1.0
    return np.argsort(-significant(magnitude, RANK_DIGITS), axis=1, kind="stable")[:, :k]


#: Significant digits at which DE statistics are ranked (float64 noise sits near the 16th).
RANK_DIGITS = 10


def significant(values: np.ndarray, digits: int) -> np.ndarray:
    """``values`` rounded to ``digits`` significant digits (zeros and negatives too)."""
    values = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(values)
    exponent = np.floor(np.log10(magnitude, out=np.zeros_like(magnitude), where=magnitude > 0))
    scale = 10.0 ** (digits - 1 - exponent)
    return np.round(values * scale) / scale
