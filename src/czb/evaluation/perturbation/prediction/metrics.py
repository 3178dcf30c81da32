"""Genetic perturbation prediction: the metrics of the two published scorings.

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
fold changes of a Wilcoxon test
(:mod:`~czb.evaluation.perturbation.prediction.differential_expression`).

Everything here works on log-normalised expression (``normalize_total(1e4)`` then
``log1p``, as scanpy makes it; :func:`~czb.evaluation.perturbation.expression.log_normalize`).
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
        (:func:`~czb.evaluation.perturbation.prediction.differential_expression.top_de_genes`).
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
        DE genes only (``DifferentialExpression.table`` with the thresholds, of
        :mod:`~czb.evaluation.perturbation.prediction.differential_expression`).
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
        condition -> {perturbed cell ID: matched control cell ID}
        (:func:`~czb.evaluation.perturbation.prediction.controls.match_controls`).

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
