"""Genetic perturbation prediction: predict the expression of a perturbation screen.

The task scores a *predictor* (a model that predicts expression), not an embedding.
The runner hands it a :class:`PerturbationContext`: the screen as
:class:`PerturbationData` (raw counts, one condition label per cell) and a
:class:`Predictor`. Two formulations (``params.formulation``):

``expression_shift`` (GEARS, Roohani et al. 2023)
    The non-control conditions are split, seeded, into training and test conditions
    (:func:`split_conditions`). The predictor sees the training cells (controls and
    every cell of a training condition) and the names of the test conditions, and
    predicts each test condition's mean log-normalised profile. The host scores it
    against the observed mean profiles on the full data with the five GEARS metrics
    (:data:`~czb.evaluation.metrics.perturbation.EXPRESSION_SHIFT_METRICS`), the top DE
    genes of a condition being its ``n_top_de`` genes of largest |Welch t| against all
    controls (scanpy ``rank_genes_groups(method="t-test")``, ranked by absolute score,
    as GEARS ranks them); each metric is the mean over test conditions.

``masked_gene`` (cz-benchmarks' perturbation expression prediction)
    Every perturbed cell is matched to one control cell of its batch with similar
    total counts and detected genes (:func:`~czb.evaluation.metrics.perturbation.match_controls`;
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
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field

from czb.errors import NotApplicableError, TaskError
from czb.evaluation import perturbation_baselines as pb
from czb.evaluation.context import TaskContext
from czb.evaluation.metrics import perturbation as pm
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.tasks.base import MetricValue, Task, TaskParams

# --------------------------------------------------------------------------- #
# Data, predictors, context
# --------------------------------------------------------------------------- #


@dataclass
class PerturbationData:
    """A perturbation screen as the task reads it.

    Attributes
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, scipy sparse (kept as CSR) or ndarray.
    conditions
        ``(n_cells,)`` str: the control label, ``"GENE"`` or ``"GENEA+GENEB"``.
    control_label
        Label of the control cells.
    genes
        ``(n_genes,)`` str gene symbols (what conditions name).
    batches
        ``(n_cells,)`` str batch (e.g. 10x GEM group); controls are matched within it.
    cell_ids
        ``(n_cells,)`` cell IDs (for the predictor's bookkeeping; the task addresses
        cells by row).

    :attr:`log_normalized` (``log1p(counts / total * 1e4)``, CSR ``float32``) is
    computed once, on first use, and shared by :meth:`subset`.
    """

    counts: Any
    conditions: np.ndarray
    control_label: str
    genes: np.ndarray
    batches: np.ndarray | None = None
    cell_ids: np.ndarray | None = None
    _log_normalized: sp.csr_matrix | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if sp.issparse(self.counts):
            self.counts = sp.csr_matrix(self.counts)
        else:
            self.counts = np.asarray(self.counts)
        if self.counts.ndim != 2:
            msg = f"PerturbationData: counts must be 2-D (cells x genes); got shape {self.counts.shape}"
            raise TaskError(msg)
        n_cells, n_genes = self.counts.shape
        self.conditions = np.asarray(self.conditions).astype(str)
        self.genes = np.asarray(self.genes).astype(str)
        self.control_label = str(self.control_label)
        expected = {"conditions": (n_cells,), "genes": (n_genes,)}
        if self.batches is not None:
            self.batches = np.asarray(self.batches).astype(str)
            expected["batches"] = (n_cells,)
        if self.cell_ids is not None:
            self.cell_ids = np.asarray(self.cell_ids).astype(str)
            expected["cell_ids"] = (n_cells,)
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                msg = (
                    f"PerturbationData: {name} has shape {got}, expected {shape} to match "
                    f"counts {self.counts.shape}"
                )
                raise TaskError(msg)

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def log_normalized(self) -> sp.csr_matrix:
        """``log1p(counts / total * 1e4)`` per cell, CSR ``float32`` (computed once)."""
        if self._log_normalized is None:
            X = pm.log_normalize(self.counts)
            self._log_normalized = sp.csr_matrix(X, dtype=np.float32)
        return self._log_normalized

    def subset(self, rows: np.ndarray) -> PerturbationData:
        """The cells ``rows`` (indices), with the cached log-normalised rows carried over
        (normalisation is per cell, so subsetting commutes with it)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = PerturbationData(
            counts=self.counts[rows],
            conditions=self.conditions[rows],
            control_label=self.control_label,
            genes=self.genes,
            batches=None if self.batches is None else self.batches[rows],
            cell_ids=None if self.cell_ids is None else self.cell_ids[rows],
        )
        if self._log_normalized is not None:
            out._log_normalized = self._log_normalized[rows]
        return out

    def hide(self, hidden: sp.spmatrix) -> PerturbationData:
        """A copy with the counts of the ``hidden`` entries (boolean ``(n_cells, n_genes)``)
        set to zero; its log-normalised expression is recomputed from those counts."""
        hidden = sp.csr_matrix(hidden, dtype=bool)
        if sp.issparse(self.counts):
            counts = self.counts - self.counts.multiply(hidden)
            counts = sp.csr_matrix(counts, dtype=self.counts.dtype)
            counts.eliminate_zeros()
        else:
            counts = self.counts.copy()
            r, c = hidden.nonzero()
            counts[r, c] = 0
        return PerturbationData(counts, self.conditions, self.control_label, self.genes,
                                self.batches, self.cell_ids)


@runtime_checkable
class Predictor(Protocol):
    """A model that predicts the expression of a perturbation screen."""

    name: str

    def predict_expression_shift(
        self, train: PerturbationData, test_conditions: Sequence[str], *, seed: int
    ) -> np.ndarray:
        """(n_test, n_genes) predicted mean log-normalised expression of each test
        condition, rows in ``test_conditions`` order."""
        ...

    def predict_masked_genes(
        self, data: PerturbationData, cells: np.ndarray, masked: np.ndarray, *, seed: int
    ) -> np.ndarray:
        """``cells``: (n_sel,) row indices into ``data``; ``masked``: (n_sel, n_genes) bool,
        True where the value was hidden (zeroed in ``data``). Returns (n_sel, n_genes)
        predicted log-normalised expression."""
        ...


class PerturbationContext(TaskContext):
    """What the runner hands a perturbation task: the screen and the predictor.

    Offers :meth:`role` / :meth:`require` like
    :class:`~czb.evaluation.context.EvaluationContext`, so ``run_task``'s check works:
    the role ``condition`` is always there, ``batch`` when the screen has batches.
    Seed-independent intermediate results (DE tests, matched controls) are memoised
    (:meth:`memo`), so several seeds and both formulations compute them once.
    """

    def __init__(self, data: PerturbationData, predictor: Predictor, *, n_jobs: int = 1):
        if not isinstance(data, PerturbationData):
            msg = f"PerturbationContext needs PerturbationData, not {type(data).__name__}"
            raise TaskError(msg)
        self.data = data
        self.predictor = predictor
        self.n_jobs = n_jobs
        self._memo: dict[tuple, Any] = {}
        roles = {"condition": data.conditions, "batch": data.batches}
        self._roles = {name: values for name, values in roles.items() if values is not None}

    @property
    def n_cells(self) -> int:
        return self.data.n_cells


# --------------------------------------------------------------------------- #
# In-process baselines
# --------------------------------------------------------------------------- #


def _control_profile(data: PerturbationData) -> np.ndarray:
    is_control = data.conditions == data.control_label
    if not is_control.any():
        msg = f"no control cells (label {data.control_label!r}) in the data given to the predictor"
        raise TaskError(msg)
    # The host's own computation (float64 sums), so "no change" is exactly no change.
    return pm.condition_means(data.log_normalized, data.conditions, [data.control_label])[1][0]


class ControlMeanPredictor:
    """"No change": every condition, and every cell, is predicted to look like the mean
    control profile (Ahlmann-Eltze et al.'s baseline).

    In the masked-gene formulation every selected cell gets the mean control profile
    (the visible control cells' mean; controls are never masked), so the predicted
    change of every masked gene is 0 and the Spearman correlation is 0 by construction
    (undefined, reported as 0): the floor a model must beat.
    """

    name = "control_mean"

    def predict_expression_shift(
        self, train: PerturbationData, test_conditions: Sequence[str], *, seed: int
    ) -> np.ndarray:
        return pb.control_mean(_control_profile(train), len(test_conditions))

    def predict_masked_genes(
        self, data: PerturbationData, cells: np.ndarray, masked: np.ndarray, *, seed: int
    ) -> np.ndarray:
        return np.tile(_control_profile(data), (len(cells), 1))


class AdditiveLinearPredictor:
    """Ahlmann-Eltze et al.'s additive model with their linear model for the rest
    (:func:`~czb.evaluation.perturbation_baselines.additive_linear`).

    Expression shift: the training pseudobulks (condition means of log-normalised
    expression) predict ``A+B`` as ``control + (A - control) + (B - control)``; an
    unseen single comes from the linear model fitted on the training conditions.

    Masked genes: every selected cell gets the predicted profile of its condition
    (controls: the control mean). The profile of a condition ``c`` at gene ``g`` is

    1. the mean of the *visible* values of ``c``'s cells at ``g`` (cells of ``c``
       where ``g`` is not masked; usually none at a masked gene, since a condition's
       masked genes are hidden in all its matched cells);
    2. otherwise ``control + sum of the parts' changes``: for each perturbed gene
       ``p`` of ``c``, the visible change of the single-gene condition ``p`` at ``g``
       when it has one (the additive model: a pair borrows its singles), else the
       change the linear model predicts for ``p``, fitted on the visible pseudobulks
       with unseen entries set to the control value (no change), else its mean
       training change (``p`` not a measured gene; 0 without a model).

    Only visible values are read: the hidden entries are never used.
    """

    name = "additive_linear"

    def __init__(self, *, n_components: int = 10, ridge: float = 0.1):
        self.n_components = n_components
        self.ridge = ridge
        #: How each profile of the last expression-shift call was made (``observed``,
        #: ``linear``, ``fallback``; see ``additive_linear``).
        self.last_sources: list[str] = []

    def predict_expression_shift(
        self, train: PerturbationData, test_conditions: Sequence[str], *, seed: int
    ) -> np.ndarray:
        control = _control_profile(train)
        labels = [c for c in pd.unique(train.conditions) if c != train.control_label]
        _, profiles = pm.condition_means(train.log_normalized, train.conditions, labels)
        prediction = pb.additive_linear(
            profiles, labels, control, list(test_conditions), train.genes,
            control_label=train.control_label, n_components=self.n_components, ridge=self.ridge,
        )
        self.last_sources = prediction.sources
        return prediction.profiles

    def predict_masked_genes(
        self, data: PerturbationData, cells: np.ndarray, masked: np.ndarray, *, seed: int
    ) -> np.ndarray:
        cells = np.asarray(cells, dtype=np.int64)
        control_label = data.control_label
        labels = [c for c in pd.unique(data.conditions) if c != control_label]
        control = _control_profile(data)
        # Visible pseudobulks. Hidden entries are zero in data, so the plain mean over a
        # condition's cells is (sum of visible values) / n; dividing by the share of its
        # cells where the gene is visible gives the mean of the visible values.
        r, g = np.nonzero(np.asarray(masked, dtype=bool))
        hidden = sp.csr_matrix((np.ones(len(r)), (cells[r], g)), shape=(data.n_cells, data.n_genes))
        hidden.data[:] = 1.0  # a cell listed twice hides an entry once
        _, plain_mean = pm.condition_means(data.log_normalized, data.conditions, labels)
        _, hidden_share = pm.condition_means(hidden, data.conditions, labels)
        visible_share = 1.0 - hidden_share
        with np.errstate(invalid="ignore", divide="ignore"):
            visible = np.where(visible_share > 1e-12, plain_mean / visible_share, np.nan)
        row_of = {c: i for i, c in enumerate(labels)}
        single_row: dict[str, int] = {}
        for c in labels:
            parts = pb.split_condition(c, control_label=control_label)
            if len(parts) == 1:
                single_row.setdefault(parts[0], row_of[c])

        needed = sorted({str(c) for c in data.conditions[cells]} - {control_label})
        profiles = {control_label: control}
        model = None
        if any(np.isnan(visible[row_of[c]]).any() for c in needed):
            filled = np.where(np.isnan(visible), control[None, :], visible)
            model = pb.fit_linear_model(
                filled, labels, control, data.genes,
                n_components=self.n_components, ridge=self.ridge, control_label=control_label,
            )
        for c in needed:
            profile = visible[row_of[c]].copy()
            missing = np.isnan(profile)
            if missing.any():
                change = np.zeros(int(missing.sum()))
                for p in pb.split_condition(c, control_label=control_label):
                    own = visible[single_row[p], missing] - control[missing] if p in single_row else None
                    if model is not None and model.knows(p):
                        fallback = model.predict_change(p)[missing]
                    elif model is not None:
                        fallback = model.center[missing]
                    else:
                        fallback = np.zeros(int(missing.sum()))
                    change += fallback if own is None else np.where(np.isnan(own), fallback, own)
                profile[missing] = control[missing] + change
            profiles[c] = profile
        out = np.zeros((len(cells), data.n_genes))
        for i, c in enumerate(data.conditions[cells]):
            out[i] = profiles[str(c)]
        return out


#: The in-process predictors by name.
PREDICTORS: dict[str, type] = {
    ControlMeanPredictor.name: ControlMeanPredictor,
    AdditiveLinearPredictor.name: AdditiveLinearPredictor,
}


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


@dataclass
class ConditionSplit:
    """Training and test conditions of the expression-shift formulation.

    Attributes
    ----------
    train, test
        Condition labels (sorted), the control label in neither.
    mode
        ``"combo_seen2"``: test conditions are combinations whose every gene has a
        single-gene condition, all of which are in training (GEARS' "combo seen 2");
        ``"single"``: test conditions are single-gene conditions.
    """

    train: list[str]
    test: list[str]
    mode: Literal["combo_seen2", "single"]


def _share(n: int, fraction: float) -> int:
    """``round(fraction * n)`` (halves up), at least 1."""
    return max(1, int(np.floor(fraction * n + 0.5)))


def split_conditions(
    conditions: Sequence[str], control_label: str, *, test_fraction: float, seed: int
) -> ConditionSplit:
    """Seeded split of the non-control conditions into training and test conditions.

    With ``parts(c)`` the perturbed genes of a label (``"A+B" -> A, B``;
    :func:`~czb.evaluation.perturbation_baselines.split_condition`):

    - singles are conditions with one part, combinations those with more;
    - a combination is *eligible* when each of its parts has a single-gene condition;
    - if any combination is eligible: ``n_test = max(1, round(test_fraction *
      n_eligible))`` eligible combinations are drawn as test conditions; every other
      condition (all singles, the remaining combinations) trains. Each test
      combination's singles are thus in training (mode ``"combo_seen2"``);
    - otherwise: ``n_test = min(max(1, round(test_fraction * n_singles)), n_singles - 1)``
      singles are drawn as test conditions, everything else trains (mode ``"single"``).

    The draw is ``numpy.random.default_rng(seed).choice`` without replacement over the
    candidates in sorted order, so it depends only on the labels and the seed.

    Raises
    ------
    NotApplicableError
        Fewer than two non-control conditions, or no eligible combination and fewer
        than two singles.
    """
    labels = sorted({str(c) for c in conditions} - {str(control_label)})
    if len(labels) < 2:
        msg = (
            "a perturbation screen needs at least 2 non-control conditions to split; "
            f"found {len(labels)}"
        )
        raise NotApplicableError(msg)
    parts = {c: pb.split_condition(c, control_label=control_label) for c in labels}
    singles = [c for c in labels if len(parts[c]) == 1]
    single_genes = {parts[c][0] for c in singles}
    combos = [c for c in labels if len(parts[c]) > 1]
    eligible = [c for c in combos if all(p in single_genes for p in parts[c])]
    rng = np.random.default_rng(seed)
    if eligible:
        n_test = min(_share(len(eligible), test_fraction), len(eligible))
        test = sorted(rng.choice(eligible, size=n_test, replace=False).tolist())
        mode = "combo_seen2"
    else:
        if len(singles) < 2:
            msg = (
                f"cannot split the screen: {len(singles)} single-gene condition(s) and no combination "
                "whose genes all have single-gene conditions"
            )
            raise NotApplicableError(msg)
        n_test = min(_share(len(singles), test_fraction), len(singles) - 1)
        test = sorted(rng.choice(singles, size=n_test, replace=False).tolist())
        mode = "single"
    held = set(test)
    return ConditionSplit(train=[c for c in labels if c not in held], test=test, mode=mode)


# --------------------------------------------------------------------------- #
# The task
# --------------------------------------------------------------------------- #


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
        metrics=(*pm.EXPRESSION_SHIFT_METRICS, pm.SPEARMAN_CORRELATION.name),
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
            ("condition_means",), lambda: pm.condition_means(X, data.conditions, screen["all"])
        )
        row = {c: i for i, c in enumerate(all_means[0])}
        observed = all_means[1][[row[c] for c in split.test]]
        control = all_means[1][row[data.control_label]]
        top = pm.top_de_genes(_ttest_scores(context, split.test), p.n_top_de)
        scores = pm.expression_shift_scores(predicted, observed, control, top, conditions=split.test)
        summary = pm.summarize_expression_shift(scores)
        params = {
            "formulation": "expression_shift",
            "split": split.mode,
            "n_train_conditions": len(split.train),
            "n_test_conditions": len(split.test),
            "n_conditions_unmeasured_target": len(screen["unmeasured"]),
        }
        return [MetricValue(name, value, dict(params)) for name, value in summary.items()]

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
        de = pm.differential_expression(
            data.log_normalized, data.conditions, control=data.control_label, groups=todo,
            method="t-test",
        )
        cache.update(zip(todo, de.scores))
    return np.stack([cache[c] for c in conditions])


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
    cmap = pm.match_controls(
        cell_ids, data.conditions, data.control_label, groups=data.batches,
        features=np.column_stack([totals, detected]), min_cells=p.min_cells_matched,
    )
    reference = {c: np.asarray(list(m.values()), dtype=np.int64) for c, m in cmap.items()}
    if not reference:
        columns = ["condition", "gene", "score", "logfoldchange", "pval", "pval_adj"]
        return cmap, pd.DataFrame(columns=columns)
    de = pm.differential_expression(
        data.log_normalized, data.conditions, reference=reference,
        genes=np.arange(data.n_genes).astype(str), method="wilcoxon",
    )
    table = de.table(pval_threshold=p.pval_threshold, min_abs_logfoldchange=p.min_abs_logfoldchange)
    return cmap, table
