"""The four post-processings of a screen's embedding (Bendidi et al. 2024): none,
centring and centre-scaling on each batch's controls, and typical variation
normalisation (TVN), each fitted on control cells.

Reference: Bendidi I. et al. (2024) Benchmarking transcriptomics foundation models
for perturbation analysis: one PCA still rules them all. arXiv:2410.13956
(code: valence-labs/Tx-Evaluation; post-processing and recall from Recursion's EFAAR,
Celik S. et al. (2024) PLOS Comput Biol, doi:10.1371/journal.pcbi.1012463).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from czb.core.errors import NotApplicableError
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign

PostProcessing = Literal["none", "center", "center_scale", "tvn"]
POSTPROCESSINGS: tuple[str, ...] = ("none", "center", "center_scale", "tvn")
#: Ridge added to each batch's control covariance before TVN whitening (EFAAR's value).
TVN_REGULARIZATION = 0.5


def standard_scale_params(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation (ddof 0) per column; zero spread → 1 (as
    scikit-learn's ``StandardScaler``)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    return mean, std


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """``cov^(-1/2)`` of a symmetric positive-definite matrix, by eigendecomposition."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors / np.sqrt(values)) @ vectors.T


def postprocess(X: np.ndarray, design: ScreenDesign, method: str) -> np.ndarray:
    """One of the four post-processings of Bendidi et al. (2024), fitted on controls.

    ``none``
        The embedding as it is.
    ``center``
        Per batch, subtract the mean of that batch's controls.
    ``center_scale``
        Per batch, subtract the mean of that batch's controls and divide by their
        standard deviation (ddof 0; a constant dimension is left unscaled), i.e. a
        ``StandardScaler`` fitted on the batch's controls.
    ``tvn`` (typical variation normalisation, EFAAR)
        1. centre-scale every cell on all controls (one scaler, all batches);
        2. rotate onto the principal axes of the controls (PCA fitted on the
           controls, every component with non-zero variance, no whitening);
        3. centre-scale again on all controls;
        4. per batch, multiply by ``(C_b + 0.5 I)^(-1/2)``, where ``C_b`` is the
           covariance (ddof 1) of the batch's controls.

    Every step is fitted on all cells' controls, as in the reference code (controls
    carry no perturbation label, so this leaks nothing the tasks score).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    design
        Which cells are controls, and their batches.
    method
        ``none``, ``center``, ``center_scale`` or ``tvn``.

    Returns
    -------
    ``(n_cells, n_dims')`` float64 array (``n_dims' = n_dims`` except for TVN, which
    keeps the rank of the controls: fewer when controls are fewer than dimensions or
    constant along some).

    Raises
    ------
    NotApplicableError
        A batch without controls (centring needs them), or TVN with fewer than two
        controls in a batch.
    """
    if method not in POSTPROCESSINGS:
        msg = f"unknown post-processing {method!r}; known: {', '.join(POSTPROCESSINGS)}"
        raise ValueError(msg)
    X = np.asarray(X, dtype=np.float64)
    if method == "none":
        return X
    batches = design.batches
    controls = design.controls
    groups = {b: np.flatnonzero(batches == b) for b in np.unique(batches)}
    for b, rows in groups.items():
        n_ctrl = int(controls[rows].sum())
        if n_ctrl < (2 if method == "tvn" else 1):
            msg = f"batch {str(b)!r} has {n_ctrl} control cell(s); {method} post-processing needs controls in every batch"
            raise NotApplicableError(msg)
    if method in ("center", "center_scale"):
        out = np.empty_like(X)
        for rows in groups.values():
            ref = X[rows[controls[rows]]]
            mean, std = standard_scale_params(ref)
            out[rows] = X[rows] - mean
            if method == "center_scale":
                out[rows] /= std
        return out

    mean, std = standard_scale_params(X[controls])
    out = (X - mean) / std
    ref = out[controls]
    ref_centered = ref - ref.mean(axis=0)
    _, singular, vt = np.linalg.svd(ref_centered, full_matrices=False)
    # Axes without control variation (rank deficiency: a dimension constant among
    # controls, or fewer controls than dimensions) cannot be normalised on controls:
    # scaling them would divide by rounding noise, so they are dropped (the reference
    # keeps them and can emit values around 1e15).
    rank = int(np.sum(singular > singular[0] * max(ref.shape) * np.finfo(np.float64).eps)) if singular[0] > 0 else 0
    if rank == 0:
        msg = "every control cell has the same embedding: TVN has no control variation to normalise by"
        raise NotApplicableError(msg)
    out = (out - ref.mean(axis=0)) @ vt[:rank].T
    mean, std = standard_scale_params(out[controls])
    out = (out - mean) / std
    eye = np.eye(out.shape[1])
    for rows in groups.values():
        ref = out[rows[controls[rows]]]
        cov = np.cov(ref, rowvar=False, ddof=1).reshape(out.shape[1], out.shape[1])
        out[rows] = out[rows] @ _inverse_sqrt(cov + TVN_REGULARIZATION * eye)
    return out
