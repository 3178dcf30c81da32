"""The in-process predictors (no GPU, no pretrained model) that every perturbation
predictor is compared with: the control mean and the additive/linear model
(:mod:`~czb.evaluation.perturbation.prediction.baselines`) on :class:`PerturbationData`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.core.errors import TaskError
from czb.evaluation.perturbation.expression import condition_means
from czb.evaluation.perturbation.prediction import baselines as pb
from czb.evaluation.perturbation.prediction.data import PerturbationData


def _control_profile(data: PerturbationData) -> np.ndarray:
    is_control = data.conditions == data.control_label
    if not is_control.any():
        msg = f"no control cells (label {data.control_label!r}) in the data given to the predictor"
        raise TaskError(msg)
    # The host's own computation (float64 sums), so "no change" is exactly no change.
    return condition_means(data.log_normalized, data.conditions, [data.control_label])[1][0]


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
    (:func:`~czb.evaluation.perturbation.prediction.baselines.additive_linear`).

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
        _, profiles = condition_means(train.log_normalized, train.conditions, labels)
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
        _, plain_mean = condition_means(data.log_normalized, data.conditions, labels)
        _, hidden_share = condition_means(hidden, data.conditions, labels)
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
