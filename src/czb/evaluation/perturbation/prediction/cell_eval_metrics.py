"""Genetic perturbation prediction scored as the Virtual Cell Challenge scores it (cell-eval 0.8).

The Virtual Cell Challenge (Roohani et al. 2025, doi:10.1016/j.cell.2025.06.008) ranks
models with cell-eval (github.com/ArcInstitute/cell-eval): the differential expression
score (``overlap_at_n``), the perturbation discrimination score
(``discrimination_score_l1``) and the mean absolute error (``mae_all_genes``), and
cell-eval reports more by default. Here they score the mean profiles czb's
expression-shift formulation collects, the way cell-eval scores its own mean baseline
(``build_base_mean_adata``): a condition's predicted profile counts as that many
identical cells as the condition has, and the observed control cells are the predicted
controls.

Differential expression is pdex's (as cell-eval 0.8 calls it): each condition against
all control cells, Mann-Whitney U with tie and continuity corrections,
Benjamini-Hochberg over genes, ``log2FC = log2(expm1(mean_condition) /
expm1(mean_control))`` of log-normalised means (0 where undefined, ``±inf`` for
one-sided zeros). A gene is DE at FDR < 0.05. cell-eval stores fold changes and FDRs
as float32; they are ranked and thresholded as float32 here too, genes ranked by
|log2FC| with ties in gene order.

A profile repeated as cells is one tie group, so a gene is "predicted DE" wherever the
profile sits away from the middle of the control cells' values: even the control mean
is, for skewed genes (cell-eval scores its mean baseline the same way), but its
log2FCs are 0, so it matches no direction. Not reported: ``mse``/``pearson_delta``
(the GEARS ``*_all_genes`` metrics are the same), ``mse_delta``/``mae_delta`` (equal
to ``mse``/``mae`` with the observed controls), ``overlap_at_k``/``precision_at_k``
for fixed k = 50, ..., 500 (the N variants capped at k), and the cross-condition or
cell-level ``de_spearman_sig``, ``de_nsig_counts``, ``pearson_edistance``,
``clustering_agreement``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.evaluation.perturbation.prediction.baselines import split_condition
from czb.evaluation.perturbation.prediction.differential_expression import (
    benjamini_hochberg,
    differential_expression,
)
from czb.evaluation.perturbation.prediction.metrics import CHANGE_RESOLUTION
from czb.evaluation.registry import MetricInfo, register_metric

_VCC = "doi:10.1016/j.cell.2025.06.008"
_CELL_EVAL = "https://github.com/ArcInstitute/cell-eval"

#: cell-eval's FDR threshold for a DE gene.
FDR_THRESHOLD = 0.05

OVERLAP_AT_N = register_metric(MetricInfo(
    "overlap_at_n",
    "DE score (cell-eval overlap_at_N): share of a condition's observed DE genes among as many "
    "predicted DE genes of largest |log2FC|, mean over conditions.",
    _VCC,
))
PRECISION_AT_N = register_metric(MetricInfo(
    "precision_at_n",
    "cell-eval precision_at_N: share of a condition's predicted DE genes among as many observed "
    "DE genes of largest |log2FC|, mean over conditions.",
    _CELL_EVAL,
))
DE_DIRECTION_MATCH = register_metric(MetricInfo(
    "de_direction_match",
    "Share of a condition's observed DE genes whose predicted log2FC has the observed sign, "
    "mean over conditions with DE genes.",
    _CELL_EVAL,
))
DE_SPEARMAN_LFC = register_metric(MetricInfo(
    "de_spearman_lfc_sig",
    "Spearman correlation of predicted and observed log2FC over a condition's observed DE genes "
    "(0 where undefined), mean over conditions with DE genes.",
    _CELL_EVAL,
    range=(-1.0, 1.0),
))
DE_RECALL = register_metric(MetricInfo(
    "de_sig_genes_recall",
    "Share of a condition's observed DE genes that are predicted DE, mean over conditions with "
    "DE genes.",
    _CELL_EVAL,
))
DE_PR_AUC = register_metric(MetricInfo(
    "de_pr_auc",
    "Average precision of the predicted FDR (-log10) at recovering a condition's observed DE "
    "genes among all genes, mean over conditions with DE and non-DE genes.",
    _CELL_EVAL,
))
DE_ROC_AUC = register_metric(MetricInfo(
    "de_roc_auc",
    "ROC AUC of the predicted FDR (-log10) at recovering a condition's observed DE genes among "
    "all genes, mean over conditions with DE and non-DE genes.",
    _CELL_EVAL,
))
MAE_ALL_GENES = register_metric(MetricInfo(
    "mae_all_genes",
    "Mean absolute error between predicted and observed mean log expression of a condition on "
    "all genes, mean over conditions (cell-eval mae).",
    _VCC,
    range=(0.0, None),
    higher_is_better=False,
))
DISCRIMINATION = {
    distance: register_metric(MetricInfo(
        f"discrimination_score_{distance}",
        f"Perturbation discrimination score ({distance} distance): 1 - rank / n of the observed "
        "change (from the control mean) of a condition among all n conditions' by distance to "
        "its predicted change, target genes left out, mean over conditions.",
        _VCC if distance == "l1" else _CELL_EVAL,
    ))
    for distance in ("l1", "l2", "cosine")
}

#: The metric names, in reporting order.
CELL_EVAL_METRICS = (
    OVERLAP_AT_N.name,
    DISCRIMINATION["l1"].name,
    MAE_ALL_GENES.name,
    PRECISION_AT_N.name,
    DE_DIRECTION_MATCH.name,
    DE_SPEARMAN_LFC.name,
    DE_RECALL.name,
    DE_PR_AUC.name,
    DE_ROC_AUC.name,
    DISCRIMINATION["l2"].name,
    DISCRIMINATION["cosine"].name,
)


def observed_de(X, conditions: np.ndarray, *, control: str, groups) -> tuple[np.ndarray, np.ndarray]:
    """pdex's test of each of ``groups`` against all ``control`` cells.

    Returns
    -------
    ``(log2fc, fdr)``, each ``(len(groups), n_genes)``; NaN for a group of fewer than 2 cells.
    """
    de = differential_expression(
        X, conditions, control=control, groups=groups, method="wilcoxon", tie_correct=True,
        continuity=True, fold_change_epsilon=0.0,
    )
    return de.logfoldchanges, de.pvals_adj


@dataclass
class ControlCells:
    """The control cells' values of every gene, sorted, to rank a predicted value among.

    Attributes
    ----------
    n
        Number of control cells.
    values, indptr
        Stored (nonzero) values of gene ``g``, ascending: ``values[indptr[g]:indptr[g + 1]]``.
    zeros
        ``(n_genes,)`` zeros per gene.
    tie_term
        ``(n_genes,)`` ``sum(t^3 - t)`` over the gene's groups of tied values.
    """

    n: int
    values: np.ndarray
    indptr: np.ndarray
    zeros: np.ndarray
    tie_term: np.ndarray

    @classmethod
    def of(cls, X) -> ControlCells:
        """From the ``(n_control, n_genes)`` log-normalised control cells (sparse or dense)."""
        csc = sp.csc_matrix(X, dtype=np.float64, copy=True)
        csc.eliminate_zeros()
        n, n_genes = csc.shape
        per_gene = np.diff(csc.indptr)
        col = np.repeat(np.arange(n_genes), per_gene)
        order = np.lexsort((csc.data, col))
        values, col = csc.data[order], col[order]
        new = np.ones(values.size, dtype=bool)
        new[1:] = (col[1:] != col[:-1]) | (values[1:] != values[:-1])
        starts = np.flatnonzero(new)
        t = np.diff(np.append(starts, values.size)).astype(np.float64)
        zeros = (n - per_gene).astype(np.float64)
        tie_term = np.bincount(col[starts], weights=t**3 - t, minlength=n_genes) + zeros**3 - zeros
        return cls(n=n, values=values, indptr=csc.indptr.copy(), zeros=zeros, tie_term=tie_term)


def repeated_profile_de(
    predicted: np.ndarray, n_cells: np.ndarray, controls: ControlCells, control_mean: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """pdex's test of each predicted profile, repeated ``n_cells[i]`` times, against the
    observed control cells (cell-eval's scoring of a mean prediction).

    The repeated value of a gene is one tie group: with ``L`` control values below it and
    ``E`` equal to it, its cells' rank sum is ``n1 (L + (E + n1 + 1) / 2)`` and the tie
    term gains ``(E + n1)^3 - (E + n1) - (E^3 - E)``; the rest is pdex's normal
    approximation (:func:`observed_de`).

    Returns
    -------
    ``(log2fc, fdr)``, each ``(n_conditions, n_genes)``.
    """
    from scipy import stats

    P = np.asarray(predicted, dtype=np.float64)
    n1 = np.asarray(n_cells, dtype=np.float64)[:, None]
    below, equal = np.empty_like(P), np.empty_like(P)
    for g in range(P.shape[1]):
        stored = controls.values[controls.indptr[g]:controls.indptr[g + 1]]
        v = P[:, g]
        lo, hi = np.searchsorted(stored, v, "left"), np.searchsorted(stored, v, "right")
        below[:, g] = lo + np.where(v > 0, controls.zeros[g], 0.0)
        equal[:, g] = hi - lo + np.where(v == 0, controls.zeros[g], 0.0)
    n2 = float(controls.n)
    n = n1 + n2
    ties = controls.tie_term[None, :] - (equal**3 - equal) + (equal + n1) ** 3 - (equal + n1)
    u1 = n1 * (below + (equal + n1 + 1.0) / 2.0) - n1 * (n1 + 1.0) / 2.0
    s2 = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (np.abs(u1 - n1 * n2 / 2.0) - 0.5) / np.sqrt(s2)
    p = np.where(s2 > 0, np.minimum(2.0 * stats.norm.sf(z), 1.0), 1.0)
    fdr = np.vstack([benjamini_hochberg(row) for row in p]) if len(p) else p
    with np.errstate(invalid="ignore", divide="ignore"):
        lfc = np.log2(np.expm1(P) / np.expm1(np.asarray(control_mean, dtype=np.float64))[None, :])
    lfc[np.isnan(lfc)] = 0.0
    return lfc, fdr


def _ranked_de(lfc: np.ndarray, fdr: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of the DE genes (float32 FDR < threshold), largest float32 |log2FC| first,
    ties in gene order (cell-eval's ordinal rank)."""
    significant = np.flatnonzero(np.asarray(fdr, dtype=np.float32) < threshold)
    key = np.abs(np.asarray(lfc[significant], dtype=np.float32))
    return significant[np.argsort(-key, kind="stable")]


def _auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Average precision and ROC AUC (sklearn's definitions, tied scores one threshold)."""
    from scipy import stats

    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.append(np.flatnonzero(np.diff(s) != 0), len(s) - 1)  # end of each tie group
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1.0)
    recall = np.concatenate([[0.0], tp / y.sum()])
    ap = float(np.sum(np.diff(recall) * precision))
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    ranks = stats.rankdata(scores)
    roc = float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
    return ap, roc


def de_agreement(
    real_lfc: np.ndarray, real_fdr: np.ndarray, pred_lfc: np.ndarray, pred_fdr: np.ndarray,
    *, threshold: float = FDR_THRESHOLD,
) -> dict[str, float]:
    """cell-eval's DE metrics of one condition.

    With ``R`` the observed DE genes and ``P`` the predicted ones, each ranked by |log2FC|:
    ``overlap_at_n = |R ∩ P[:|R|]| / |R|``; ``precision_at_n = |R[:|P|] ∩ P| / |P|`` (0 when
    the denominator is 0); over ``R``: the share of matching log2FC signs, the Spearman
    correlation of the log2FCs (0 where undefined) and the share in ``P``; over all genes,
    average precision and ROC AUC of ``-log10(clip(predicted FDR, 1e-10, 1))`` for
    membership of ``R``. NaN where a metric needs DE genes (or non-DE genes) and there are none.
    """
    from scipy import stats

    real, pred = _ranked_de(real_lfc, real_fdr, threshold), _ranked_de(pred_lfc, pred_fdr, threshold)
    k_real, k_pred = len(real), len(pred)
    out = {
        OVERLAP_AT_N.name: len(np.intersect1d(real, pred[:k_real])) / k_real if k_real else 0.0,
        PRECISION_AT_N.name: len(np.intersect1d(real[:k_pred], pred)) / k_pred if k_pred else 0.0,
    }
    nan = float("nan")
    if k_real:
        r32 = np.asarray(real_lfc[real], dtype=np.float32).astype(np.float64)
        p32 = np.asarray(pred_lfc[real], dtype=np.float32).astype(np.float64)
        out[DE_DIRECTION_MATCH.name] = float(np.mean(np.sign(r32) == np.sign(p32)))
        rho = nan
        if k_real > 1 and np.ptp(r32) > 0 and np.ptp(p32) > 0:
            rho = stats.spearmanr(r32, p32).statistic
        out[DE_SPEARMAN_LFC.name] = 0.0 if np.isnan(rho) else float(rho)
        out[DE_RECALL.name] = len(np.intersect1d(real, pred)) / k_real
    else:
        out[DE_DIRECTION_MATCH.name] = out[DE_SPEARMAN_LFC.name] = out[DE_RECALL.name] = nan
    labels = np.asarray(real_fdr, dtype=np.float32) < threshold
    if 0 < labels.sum() < labels.size:
        # -log10 is monotone: rank by the clipped float32 FDR itself
        q = np.clip(np.nan_to_num(np.asarray(pred_fdr, dtype=np.float32), nan=1.0), np.float32(1e-10), 1.0)
        out[DE_PR_AUC.name], out[DE_ROC_AUC.name] = _auc(labels, -q.astype(np.float64))
    else:
        out[DE_PR_AUC.name] = out[DE_ROC_AUC.name] = nan
    return out


def discrimination_scores(
    predicted_change: np.ndarray,
    observed_change: np.ndarray,
    conditions: list[str],
    excluded: list[np.ndarray],
    *,
    distance: str = "l1",
) -> np.ndarray:
    """cell-eval's perturbation discrimination score of every condition.

    For condition ``i``: distances from its predicted change to every condition's
    observed change over the genes not in ``excluded[i]`` (its target genes); with
    ``r`` the number of conditions nearer than its own observed change (ties: those
    earlier in sorted label order, as a stable sort of cell-eval's distances places
    them), the score is ``1 - r / n``: 1 when its own is nearest, ``1 / n`` when farthest.
    ``distance``: ``l1`` (sum of |differences|), ``l2`` (Euclidean) or ``cosine``
    (1 - cosine similarity, 1 against a zero vector).
    """
    P = np.asarray(predicted_change, dtype=np.float64)
    O = np.asarray(observed_change, dtype=np.float64)
    n = len(conditions)
    position = np.argsort(np.argsort(np.asarray(conditions, dtype=str), kind="stable"), kind="stable")
    out = np.empty(n)
    for i in range(n):
        keep = np.ones(P.shape[1], dtype=bool)
        keep[excluded[i]] = False
        diff = O[:, keep] - P[i, keep]
        if distance == "l1":
            d = np.abs(diff).sum(axis=1)
        elif distance == "l2":
            d = np.sqrt((diff * diff).sum(axis=1))
        elif distance == "cosine":
            norms = np.linalg.norm(O[:, keep], axis=1) * np.linalg.norm(P[i, keep])
            dot = O[:, keep] @ P[i, keep]
            with np.errstate(invalid="ignore", divide="ignore"):
                d = np.clip(1.0 - np.where(norms > 0, dot / norms, 0.0), 0.0, 2.0)
        else:
            msg = f"discrimination_scores: unknown distance {distance!r}; known: l1, l2, cosine"
            raise ValueError(msg)
        rank = np.sum(d < d[i]) + np.sum((d == d[i]) & (position < position[i]))
        out[i] = 1.0 - rank / n
    return out


def cell_eval_scores(
    predicted: np.ndarray,
    observed: np.ndarray,
    control: np.ndarray,
    *,
    conditions: list[str],
    genes: np.ndarray,
    n_cells: np.ndarray,
    controls: ControlCells,
    real_lfc: np.ndarray,
    real_fdr: np.ndarray,
    control_label: str = "ctrl",
    threshold: float = FDR_THRESHOLD,
) -> pd.DataFrame:
    """The cell-eval metrics (:data:`CELL_EVAL_METRICS`) of every condition.

    Parameters
    ----------
    predicted, observed
        ``(n_conditions, n_genes)`` mean log-normalised expression per condition.
    control
        ``(n_genes,)`` mean of the control cells.
    conditions
        Condition labels (rows); their target genes (``"A+B"``: A and B) are left out of
        the discrimination distances, as cell-eval leaves out the gene named like the
        perturbation.
    genes
        ``(n_genes,)`` gene names.
    n_cells
        ``(n_conditions,)`` observed cells per condition (the predicted profile's repeats).
    controls
        The control cells (:meth:`ControlCells.of`).
    real_lfc, real_fdr
        The observed DE of each condition (:func:`observed_de`).

    Predicted changes smaller than the rounding of normalisation and averaging
    (:data:`~czb.evaluation.perturbation.prediction.metrics.CHANGE_RESOLUTION`) count
    as none, as in the GEARS metrics; cell-eval itself would score that noise.

    Returns
    -------
    DataFrame indexed by condition, one column per metric (NaN where undefined).
    """
    p = np.asarray(predicted, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    c = np.asarray(control, dtype=np.float64).ravel()
    if p.shape != o.shape or p.shape[0] != len(conditions) or p.shape[1] != c.size:
        msg = f"cell_eval_scores: shapes differ: predicted {p.shape}, observed {o.shape}, control {c.shape}"
        raise ValueError(msg)
    none = np.abs(p - c) <= CHANGE_RESOLUTION * np.maximum(1.0, np.abs(c))
    p_changed = np.where(none, c, p)
    pred_lfc, pred_fdr = repeated_profile_de(p_changed, n_cells, controls, c)
    rows = [de_agreement(real_lfc[i], real_fdr[i], pred_lfc[i], pred_fdr[i], threshold=threshold)
            for i in range(len(conditions))]
    frame = pd.DataFrame(rows, index=pd.Index(list(conditions), name="condition"))
    frame[MAE_ALL_GENES.name] = np.abs(p - o).mean(axis=1)
    gene_names = np.asarray(genes).astype(str)
    excluded = [
        np.flatnonzero(np.isin(gene_names, split_condition(label, control_label=control_label)))
        for label in conditions
    ]
    for distance, info in DISCRIMINATION.items():
        frame[info.name] = discrimination_scores(p_changed - c, o - c, list(conditions), excluded,
                                                 distance=distance)
    return frame[list(CELL_EVAL_METRICS)]


def summarize_cell_eval(scores: pd.DataFrame) -> dict[str, float]:
    """Mean of each metric over the conditions where it is defined (NaN if none)."""
    out = {}
    for name in CELL_EVAL_METRICS:
        values = scores[name].to_numpy(dtype=np.float64)
        out[name] = float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")
    return out
