"""Genetic perturbation prediction: predict the expression of a perturbation screen.

The task scores a *predictor* (a model that predicts expression), not an embedding.
The runner hands it a :class:`~czb.evaluation.perturbation.prediction.data.PerturbationContext`:
the screen as :class:`~czb.evaluation.perturbation.prediction.data.PerturbationData` (raw
counts, one condition label per cell) and a
:class:`~czb.evaluation.perturbation.prediction.data.Predictor`. Two formulations
(``params.formulation``):

``expression_shift`` (GEARS, Roohani et al. 2023)
    The non-control conditions are split, seeded, into training and test conditions
    (:func:`~czb.evaluation.perturbation.prediction.splits.split_conditions`). The
    predictor sees the training cells (controls and every cell of a training condition)
    and the names of the test conditions, and predicts each test condition's mean
    log-normalised profile. The host scores it
    against the observed mean profiles on the full data with the five GEARS metrics
    (:data:`~czb.evaluation.perturbation.prediction.metrics.EXPRESSION_SHIFT_METRICS`), the top DE
    genes of a condition being its ``n_top_de`` genes of largest |Welch t| against all
    controls (scanpy ``rank_genes_groups(method="t-test")``, ranked by absolute score,
    as GEARS ranks them); each metric is the mean over test conditions. The same
    predictions are also scored as the Virtual Cell Challenge scores them
    (:mod:`~czb.evaluation.perturbation.prediction.cell_eval_metrics`: cell-eval's DE
    overlap, discrimination, MAE and DE agreement metrics).

``masked_gene`` (cz-benchmarks' perturbation expression prediction)
    Every perturbed cell is matched to one control cell of its batch with similar
    total counts and detected genes (:func:`~czb.evaluation.perturbation.prediction.controls.match_controls`;
    conditions with fewer than ``min_cells_matched`` cells are not matched). Each matched
    condition is tested against its matched controls (Wilcoxon, no tie correction);
    genes with BH-adjusted p < ``pval_threshold`` and |log2 fold change| >=
    ``min_abs_logfoldchange`` are its DE genes, of which a seeded ``mask_fraction``
    is masked (conditions where that is fewer than ``min_masked_genes`` genes are
    skipped and reported). The masked genes are hidden (their counts set to zero) in
    the condition's matched perturbed cells; the predictor gets the screen so masked,
    the selected cells (those perturbed cells and their matched controls) and the mask,
    and predicts the log-normalised expression of the selected cells. Per condition,
    the predicted change of the masked genes (log ratio of the mean prediction in the
    perturbed cells to that in their matched controls) is rank-correlated with the
    observed log2 fold changes; ``spearman_correlation_calculation`` is the mean over
    scored conditions.

Both formulations are seeded (split, masks), so the task runs once per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from czb.core.errors import NotApplicableError, TaskError
from czb.evaluation.perturbation.expression import condition_means
from czb.evaluation.perturbation.prediction import baselines as pb
from czb.evaluation.perturbation.prediction import cell_eval_metrics as ce
from czb.evaluation.perturbation.prediction import metrics as pm
from czb.evaluation.perturbation.prediction.controls import match_controls
from czb.evaluation.perturbation.prediction.data import (
    PerturbationContext,
    PerturbationData,
    Predictor,
)
from czb.evaluation.perturbation.prediction.differential_expression import (
    differential_expression,
    top_de_genes,
)
from czb.evaluation.perturbation.prediction.splits import split_conditions
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task, TaskParams


class GeneticPerturbationPredictionParams(TaskParams):
    formulation: Literal["expression_shift", "masked_gene"] = "expression_shift"
    # expression_shift
    #: Share of the eligible conditions held out per seed.
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    #: DE genes per condition for the top-DE metrics (GEARS: 20).
    n_top_de: int = Field(20, ge=1)
    # masked_gene (cz-benchmarks' defaults)
    #: Share of each condition's DE genes masked (cz: percent_genes_to_mask).
    mask_fraction: float = Field(0.5, gt=0.0, le=1.0)
    #: Conditions with fewer masked genes are skipped (cz: min_de_genes_to_mask).
    min_masked_genes: int = Field(5, ge=1)
    #: DE genes: BH-adjusted p below this ...
    pval_threshold: float = Field(1e-4, gt=0.0)
    #: ... and |log2 fold change| at least this.
    min_abs_logfoldchange: float = Field(1.0, ge=0.0)
    #: Conditions with fewer cells get no matched controls (and are not scored).
    min_cells_matched: int = Field(50, ge=1)
    #: Predicted change: log ratio of means ("ratio"), or their difference.
    operation: Literal["ratio", "difference"] = "ratio"


def _names(values: Sequence[str], limit: int = 20) -> str:
    """Comma-joined names, at most ``limit`` (then ``... (+N)``)."""
    values = list(values)
    text = ",".join(values[:limit])
    return text + (f",... (+{len(values) - limit})" if len(values) > limit else "")


@register_task
class GeneticPerturbationPrediction(Task):
    """Expression-shift (GEARS) and masked-gene (cz-benchmarks) scoring of a predictor
    on a perturbation screen; see the module docstring for both formulations."""

    info = TaskInfo(
        name="genetic_perturbation_prediction",
        description="Predict expression after genetic perturbations: mean profiles of held-out "
        "conditions (GEARS metrics) or masked DE genes (cz-benchmarks' Spearman).",
        metrics=(*pm.EXPRESSION_SHIFT_METRICS, *ce.CELL_EVAL_METRICS, pm.SPEARMAN_CORRELATION.name),
        requires=("condition",),
        stochastic=True,
        reference="doi:10.1038/s41587-023-01905-6",
        kind="perturbation",
    )
    Params = GeneticPerturbationPredictionParams

    def check(self, context: Any) -> None:
        if not isinstance(context, PerturbationContext):
            msg = (
                f"task {self.info.name!r} scores expression predictors on a perturbation screen; "
                "it needs a PerturbationContext, not an embedding"
            )
            raise NotApplicableError(msg)
        super().check(context)

    def run(self, context: PerturbationContext, *, seed: int) -> list[MetricValue]:
        self.check(context)
        screen = context.memo(("screen",), lambda: _describe_screen(context.data))
        if self.params.formulation == "expression_shift":
            return self._expression_shift(context, screen, seed)
        return self._masked_gene(context, screen, seed)

    # ------------------------------------------------------------------ #

    def _expression_shift(
        self, context: PerturbationContext, screen: dict, seed: int
    ) -> list[MetricValue]:
        p = self.params
        data, predictor = context.data, context.predictor
        split = split_conditions(
            screen["labels"], data.control_label, test_fraction=p.test_fraction, seed=seed
        )
        train_rows = np.flatnonzero(np.isin(data.conditions, [data.control_label, *split.train]))
        train = data.subset(train_rows)
        predicted = predictor.predict_expression_shift(train, list(split.test), seed=seed)
        predicted = _checked(
            predicted, (len(split.test), data.n_genes), predictor, "predict_expression_shift"
        )

        X = data.log_normalized
        all_means = context.memo(
            ("condition_means",), lambda: condition_means(X, data.conditions, screen["all"])
        )
        row = {c: i for i, c in enumerate(all_means[0])}
        observed = all_means[1][[row[c] for c in split.test]]
        control = all_means[1][row[data.control_label]]
        top = top_de_genes(_ttest_scores(context, split.test), p.n_top_de)
        scores = pm.expression_shift_scores(predicted, observed, control, top, conditions=split.test)
        summary = pm.summarize_expression_shift(scores)
        params = {
            "formulation": "expression_shift",
            "split": split.mode,
            "n_train_conditions": len(split.train),
            "n_test_conditions": len(split.test),
            "n_conditions_unmeasured_target": len(screen["unmeasured"]),
        }
        out = [MetricValue(name, value, dict(params)) for name, value in summary.items()]
        return out + _cell_eval(context, split.test, predicted, observed, control, params)

    def _masked_gene(
        self, context: PerturbationContext, screen: dict, seed: int
    ) -> list[MetricValue]:
        p = self.params
        data, predictor = context.data, context.predictor
        key = ("masked_gene_de", p.min_cells_matched, p.pval_threshold, p.min_abs_logfoldchange)
        cmap, table = context.memo(key, lambda: _matched_de(data, p))
        matched = sorted(cmap)
        masked = pm.sample_masked_genes(
            table, fraction=p.mask_fraction, min_masked=p.min_masked_genes, seed=seed
        )
        scored = [c for c in matched if c in masked.genes]
        skipped = [c for c in matched if c not in masked.genes]
        unmatched = [c for c in screen["labels"] if c not in cmap]
        if not scored:
            msg = (
                f"no condition has at least {p.min_masked_genes} DE genes to mask (DE: adjusted p < "
                f"{p.pval_threshold:g}, |log2FC| >= {p.min_abs_logfoldchange:g} vs matched controls; "
                f"{len(matched)} conditions matched, {len(unmatched)} with fewer than "
                f"{p.min_cells_matched} cells not matched)"
            )
            raise NotApplicableError(msg)
        cell_ids = np.arange(data.n_cells).astype(str)
        gene_ids = np.arange(data.n_genes).astype(str)
        hidden = pm.masked_entries(cell_ids, gene_ids, masked, cmap)
        cells = np.unique(np.concatenate(
            [np.asarray(list(cmap[c]), dtype=np.int64) for c in scored]
            + [np.asarray(list(cmap[c].values()), dtype=np.int64) for c in scored]
        ))
        mask = hidden[cells].toarray()
        predicted = predictor.predict_masked_genes(data.hide(hidden), cells, mask, seed=seed)
        predicted = _checked(
            predicted, (len(cells), data.n_genes), predictor, "predict_masked_genes"
        )
        frame = pm.masked_gene_scores(
            predicted, cell_index=cell_ids[cells], gene_index=gene_ids, de_table=table,
            masked=masked, control_map=cmap, operation=p.operation,
        )
        value = float(frame[pm.SPEARMAN_CORRELATION.name].mean()) if len(frame) else float("nan")
        params = {
            "formulation": "masked_gene",
            "n_conditions_scored": len(frame),
            "n_conditions_skipped": len(skipped),
            "skipped_conditions": _names(skipped),
            "n_conditions_unmatched": len(unmatched),
            "n_conditions_unmeasured_target": len(screen["unmeasured"]),
        }
        return [MetricValue(pm.SPEARMAN_CORRELATION.name, value, params)]


def _describe_screen(data: PerturbationData) -> dict:
    """Validate the screen's labels (cheap; before any heavy work)."""
    labels_all = list(pd.unique(data.conditions))
    if data.control_label not in labels_all:
        shown = ", ".join(repr(x) for x in labels_all[:8])
        msg = (
            f"control label {data.control_label!r} is not among the {len(labels_all)} condition labels "
            f"({shown}{', ...' if len(labels_all) > 8 else ''}); set the dataset's control label"
        )
        raise TaskError(msg)
    labels = sorted(c for c in labels_all if c != data.control_label)
    if len(labels) < 2:
        msg = f"a perturbation task needs at least 2 non-control conditions; the screen has {len(labels)}"
        raise NotApplicableError(msg)
    known = set(data.genes.tolist())
    unmeasured = [
        c for c in labels
        if any(g not in known for g in pb.split_condition(c, control_label=data.control_label))
    ]
    return {"labels": labels, "all": [data.control_label, *labels], "unmeasured": unmeasured}


def _checked(values: Any, shape: tuple[int, int], predictor: Predictor, method: str) -> np.ndarray:
    """The predictor's output as float64, or a :class:`TaskError` naming it."""
    name = getattr(predictor, "name", type(predictor).__name__)
    try:
        out = values.toarray() if sp.issparse(values) else np.asarray(values, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as e:
        msg = f"predictor {name!r}: {method} returned something that is not a numeric matrix ({e})"
        raise TaskError(msg) from None
    if out.shape != shape:
        msg = f"predictor {name!r}: {method} returned shape {out.shape}, expected {shape}"
        raise TaskError(msg)
    bad = ~np.isfinite(out)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        msg = (
            f"predictor {name!r}: {method} returned {int(bad.sum())} NaN/inf values "
            f"(in {len(rows)} rows, first: {rows[:5].tolist()})"
        )
        raise TaskError(msg)
    return out


def _ttest_scores(context: PerturbationContext, conditions: Sequence[str]) -> np.ndarray:
    """Welch t statistics of each condition against all controls (full data), memoised
    per condition."""
    data = context.data
    cache: dict[str, np.ndarray] = context.memo(("ttest_scores",), dict)
    todo = [c for c in conditions if c not in cache]
    if todo:
        de = differential_expression(
            data.log_normalized, data.conditions, control=data.control_label, groups=todo,
            method="t-test",
        )
        cache.update(zip(todo, de.scores))
    return np.stack([cache[c] for c in conditions])


def _cell_eval(
    context: PerturbationContext,
    conditions: Sequence[str],
    predicted: np.ndarray,
    observed: np.ndarray,
    control: np.ndarray,
    params: dict,
) -> list[MetricValue]:
    """The cell-eval metrics of the expression-shift predictions; pdex's DE of each
    condition and the sorted control cells are memoised."""
    data = context.data
    is_control = data.conditions == data.control_label
    controls = context.memo(
        ("cell_eval_controls",), lambda: ce.ControlCells.of(data.log_normalized[np.flatnonzero(is_control)])
    )
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = context.memo(("cell_eval_de",), dict)
    todo = [c for c in conditions if c not in cache]
    if todo:
        lfc, fdr = ce.observed_de(data.log_normalized, data.conditions, control=data.control_label,
                                  groups=todo)
        cache.update((c, (lfc[i], fdr[i])) for i, c in enumerate(todo))
    real_lfc = np.stack([cache[c][0] for c in conditions])
    real_fdr = np.stack([cache[c][1] for c in conditions])
    counts = pd.Series(data.conditions).value_counts()
    scores = ce.cell_eval_scores(
        predicted, observed, control, conditions=list(conditions), genes=data.genes,
        n_cells=counts.reindex(list(conditions)).to_numpy(), controls=controls,
        real_lfc=real_lfc, real_fdr=real_fdr, control_label=data.control_label,
    )
    with_de = int((np.asarray(real_fdr, dtype=np.float32) < ce.FDR_THRESHOLD).any(axis=1).sum())
    params = {**params, "n_conditions_with_de": with_de}
    return [MetricValue(name, value, dict(params)) for name, value in ce.summarize_cell_eval(scores).items()]


def _matched_de(
    data: PerturbationData, p: GeneticPerturbationPredictionParams
) -> tuple[dict, pd.DataFrame]:
    """Matched controls and the DE-gene table of the masked-gene formulation (seed-independent).

    Cells and genes are named by position (``"0"``, ``"1"``, ...), so duplicated IDs
    or symbols cannot confuse the look-ups.
    """
    counts = data.counts
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    detected = np.asarray((counts > 0).sum(axis=1), dtype=np.float64).ravel()
    cell_ids = np.arange(data.n_cells).astype(str)
    cmap = match_controls(
        cell_ids, data.conditions, data.control_label, groups=data.batches,
        features=np.column_stack([totals, detected]), min_cells=p.min_cells_matched,
    )
    reference = {c: np.asarray(list(m.values()), dtype=np.int64) for c, m in cmap.items()}
    if not reference:
        columns = ["condition", "gene", "score", "logfoldchange", "pval", "pval_adj"]
        return cmap, pd.DataFrame(columns=columns)
    de = differential_expression(
        data.log_normalized, data.conditions, reference=reference,
        genes=np.arange(data.n_genes).astype(str), method="wilcoxon",
    )
    table = de.table(pval_threshold=p.pval_threshold, min_abs_logfoldchange=p.min_abs_logfoldchange)
    return cmap, table
