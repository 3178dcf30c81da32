"""Baselines for genetic perturbation prediction that need no GPU and no pretrained model.

Ahlmann-Eltze, Huber & Anders (2025, doi:10.1038/s41592-025-02772-6) found that no deep
model beat these on predicting expression after single or double genetic
perturbations. Both work on per-condition mean profiles of log-normalised expression
(pseudobulks) and predict such profiles:

- :func:`control_mean`, "no change": every condition is predicted to look like the
  mean control profile.
- :func:`additive_linear`: a two-gene condition ``A+B`` is predicted as
  ``control + (A - control) + (B - control)`` from the observed single-perturbation
  profiles of training (their additive model); a perturbation without a training
  profile gets the change predicted by their linear model (:class:`LinearModel`), and
  the control profile plus the mean training change where that is impossible too.

Condition labels follow GEARS and cz-benchmarks: ``"GENEA"`` (or ``"GENEA+ctrl"``)
for one perturbed gene, ``"GENEA+GENEB"`` for two, the control label for controls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def split_condition(label: str, *, control_label: str = "ctrl", separator: str = "+") -> tuple[str, ...]:
    """The perturbed genes of a condition label (control tokens dropped).

    ``"A+B" -> ("A", "B")``, ``"A+ctrl" -> ("A",)``, ``"ctrl" -> ()``.
    """
    return tuple(p for p in str(label).split(separator) if p and p != control_label)


def control_mean(control_profile: np.ndarray, n_conditions: int) -> np.ndarray:
    """The "no change" prediction: the control mean profile for every condition.

    Parameters
    ----------
    control_profile
        ``(n_genes,)`` mean log-normalised expression of control cells.
    n_conditions
        Number of conditions to predict.

    Returns
    -------
    ``(n_conditions, n_genes)`` ``float64``.
    """
    profile = np.asarray(control_profile, dtype=np.float64).ravel()
    return np.tile(profile, (n_conditions, 1))


@dataclass
class LinearModel:
    """Ahlmann-Eltze et al.'s linear model, fitted on training pseudobulks.

    The change of gene ``g`` after perturbing gene ``p`` is modelled as
    ``G[g] @ W @ G[p] + center[g]``: ``G`` is a gene embedding (the top principal
    component scores of the genes in the training pseudobulk matrix), used both for
    the read-out gene and for the perturbed gene, and ``W`` is fitted by ridge
    regression. See :func:`fit_linear_model`.

    Attributes
    ----------
    genes
        ``(n_genes,)`` gene names (rows of ``embedding``).
    embedding
        ``(n_genes, K)`` gene embedding ``G``.
    weights
        ``(K, K)`` fitted ``W``.
    center
        ``(n_genes,)`` mean training change (the row means removed before the fit).
    control_profile
        ``(n_genes,)`` control mean the changes are relative to.
    """

    genes: np.ndarray
    embedding: np.ndarray
    weights: np.ndarray
    center: np.ndarray
    control_profile: np.ndarray

    def __post_init__(self) -> None:
        self._row = {g: i for i, g in enumerate(self.genes)}

    def knows(self, gene: str) -> bool:
        """Whether ``gene`` has an embedding (is a measured gene)."""
        return gene in self._row

    def predict_change(self, gene: str) -> np.ndarray:
        """``(n_genes,)`` predicted change from control after perturbing ``gene``.

        A gene without an embedding gets the zero embedding (as the fit gives the
        control condition), i.e. the mean training change ``center``.
        """
        row = self._row.get(gene)
        if row is None:
            return self.center.copy()
        return self.embedding @ (self.weights @ self.embedding[row]) + self.center


def fit_linear_model(
    train_profiles: np.ndarray,
    train_conditions: Sequence[str],
    control_profile: np.ndarray,
    genes: Sequence[str],
    *,
    n_components: int = 10,
    ridge: float = 0.1,
    control_label: str = "ctrl",
    separator: str = "+",
) -> LinearModel | None:
    """Fit Ahlmann-Eltze et al.'s linear model (their ``run_linear_pretrained_model.R``).

    With ``X`` the ``(n_genes, n_train)`` matrix of training pseudobulks (the control
    profile included as a condition) and ``c`` the control profile:

    1. gene embedding ``G``: PCA of ``X`` with genes as observations (each condition
       column centred over genes, no scaling), ``G = `` the scores of the top
       ``K = min(n_components, n_train - 1)`` components (``prcomp(X)$x``);
    2. the perturbation embedding of a single-gene condition ``p`` is ``G[p]``; the
       control condition's is zero; two-gene conditions and conditions whose gene was
       not measured are not used in the fit;
    3. ``Y = X[:, used] - c`` (changes), ``center = `` row means of ``Y``, and with
       ``B`` the ``(K, n_used)`` perturbation embeddings,
       ``W = (G'G + ridge I)^-1 G' (Y - center) B' (B B' + ridge I)^-1``;
    4. the predicted profile after perturbing ``p`` is ``c + G W G[p] + center``.

    Their defaults: ``K = 10``, ``ridge = 0.1``. The only difference is an exact SVD
    instead of ``irlba``'s truncated one (equal up to the signs of components, which
    the prediction does not depend on).

    Parameters
    ----------
    train_profiles
        ``(n_train, n_genes)`` mean log-normalised profiles of the training conditions.
    train_conditions
        ``(n_train,)`` their labels.
    control_profile
        ``(n_genes,)`` control mean.
    genes
        ``(n_genes,)`` gene names (the symbols conditions are named with).

    Returns
    -------
    :class:`LinearModel`, or ``None`` when fewer than two single-gene training
    conditions name a measured gene (nothing to fit).
    """
    Y_all = np.asarray(train_profiles, dtype=np.float64)
    control = np.asarray(control_profile, dtype=np.float64).ravel()
    genes = np.asarray(genes).astype(str)
    row_of = {g: i for i, g in enumerate(genes)}
    labels = [str(c) for c in train_conditions]
    parts_of = [split_condition(c, control_label=control_label, separator=separator) for c in labels]
    is_control = np.array([len(parts) == 0 for parts in parts_of])
    X = Y_all[~is_control].T
    X = np.column_stack([X, control])  # controls enter as one condition, as in the paper
    singles = []
    for i, parts in enumerate(parts_of):
        if len(parts) == 1 and parts[0] in row_of:
            singles.append((i, row_of[parts[0]]))
    if len(singles) < 2:
        return None
    k = int(min(n_components, X.shape[1] - 1, X.shape[0]))
    centred = X - X.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(centred, full_matrices=False)
    G = U[:, :k] * S[:k]
    B = np.column_stack([G[r] for _, r in singles] + [np.zeros(k)])
    Y = np.column_stack([Y_all[i] - control for i, _ in singles] + [np.zeros_like(control)])
    center = Y.mean(axis=1)
    Yc = Y - center[:, None]
    left = np.linalg.solve(G.T @ G + ridge * np.eye(k), G.T @ Yc @ B.T)
    W = np.linalg.solve((B @ B.T + ridge * np.eye(k)).T, left.T).T
    return LinearModel(genes=genes, embedding=G, weights=W, center=center, control_profile=control)


@dataclass
class AdditivePrediction:
    """Predicted profiles and how each was made.

    Attributes
    ----------
    profiles
        ``(n_targets, n_genes)`` predicted mean log-normalised expression.
    sources
        ``(n_targets,)``: ``"observed"`` (every perturbed gene had a training single
        profile), ``"linear"`` (some came from the linear model), ``"fallback"``
        (some had neither: the linear model's mean training change was added, or
        nothing when no linear model could be fitted), ``"control"`` (no perturbed
        gene in the label).
    """

    profiles: np.ndarray
    sources: list[str]


def additive_linear(
    train_profiles: np.ndarray,
    train_conditions: Sequence[str],
    control_profile: np.ndarray,
    targets: Sequence[str],
    genes: Sequence[str],
    *,
    control_label: str = "ctrl",
    separator: str = "+",
    n_components: int = 10,
    ridge: float = 0.1,
) -> AdditivePrediction:
    """Additive prediction from training singles; the linear model for unseen singles.

    For a target ``p1+...+pn`` the prediction is ``control + sum_i change(p_i)``, where
    ``change(p) = profile(p) - control`` if ``p`` was a single-gene training condition
    (Ahlmann-Eltze et al.'s additive model), else the change predicted by
    :func:`fit_linear_model` fitted on the training conditions (their linear model);
    a gene that is not measured gets the linear model's mean training change, and
    zero when the model cannot be fitted (fewer than two training singles). A single
    unseen ``p`` is thus the linear model's prediction.

    Parameters
    ----------
    train_profiles
        ``(n_train, n_genes)`` mean log-normalised profiles of the training conditions
        (singles, and pairs if any; pairs are only used for the gene embedding).
    train_conditions
        ``(n_train,)`` their labels.
    control_profile
        ``(n_genes,)`` mean log-normalised expression of control cells.
    targets
        ``(n_targets,)`` labels of the conditions to predict.
    genes
        ``(n_genes,)`` gene names, the symbols conditions are named with.

    Returns
    -------
    :class:`AdditivePrediction`.
    """
    profiles = np.asarray(train_profiles, dtype=np.float64)
    control = np.asarray(control_profile, dtype=np.float64).ravel()
    single_change: dict[str, np.ndarray] = {}
    for i, c in enumerate(train_conditions):
        parts = split_condition(c, control_label=control_label, separator=separator)
        if len(parts) == 1:
            single_change[parts[0]] = profiles[i] - control
    model = None
    needs_model = any(
        p not in single_change
        for t in targets
        for p in split_condition(t, control_label=control_label, separator=separator)
    )
    if needs_model:
        model = fit_linear_model(
            profiles, train_conditions, control, genes,
            n_components=n_components, ridge=ridge, control_label=control_label, separator=separator,
        )
    out = np.empty((len(targets), control.size))
    sources = []
    for i, target in enumerate(targets):
        parts = split_condition(target, control_label=control_label, separator=separator)
        prediction = control.copy()
        source = "observed" if parts else "control"
        for p in parts:
            if p in single_change:
                prediction += single_change[p]
            elif model is not None and model.knows(p):
                prediction += model.predict_change(p)
                source = "linear" if source != "fallback" else source
            else:
                if model is not None:
                    prediction += model.center
                source = "fallback"
        out[i] = prediction
        sources.append(source)
    return AdditivePrediction(profiles=out, sources=sources)
