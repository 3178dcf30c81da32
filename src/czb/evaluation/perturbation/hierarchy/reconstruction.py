"""Level 6 of the perturbation-analysis hierarchy: can expression be read back from the embedding?"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.expression import Expression
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign, ScreenSplit
from czb.evaluation.perturbation.hierarchy.reconstruction_metrics import (
    RECONSTRUCTION_SPEARMAN,
    STRUCTURAL_INTEGRITY,
    centred_distance_terms,
    per_gene_spearman,
    structural_integrity,
)
from czb.evaluation.perturbation.hierarchy.screen_task import ScreenParams, ScreenTask
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue


class ReconstructionParams(ScreenParams):
    #: Ridge penalty of the decoder, on standardised embedding dimensions.
    alpha: float = Field(1.0, ge=0.0)
    #: Genes per block when scoring test2 (bounds memory at #test2 cells x block).
    gene_block: int = Field(512, ge=1)


class RidgeDecoder:
    """Ridge regression from an embedding to log-normalised expression, fitted by
    streaming the training rows (normal equations), so neither the training
    expression nor its prediction is ever held dense in full.

    ``fit`` solves ``(Z'Z + alpha I) W = Z'(Y - mean Y)`` with ``Z`` the embedding
    standardised on the training rows; the intercept is the training mean of ``Y``.
    """

    def __init__(self, alpha: float):
        self.alpha = alpha

    def fit(self, X: np.ndarray, rows: np.ndarray, expression: Expression) -> RidgeDecoder:
        Z = np.asarray(X[rows], dtype=np.float64)
        self.mean_ = Z.mean(axis=0)
        std = Z.std(axis=0)
        self.scale_ = np.where(std > 0, std, 1.0)
        Z = (Z - self.mean_) / self.scale_
        ZtY = np.zeros((Z.shape[1], expression.n_genes))
        y_sum = np.zeros(expression.n_genes)
        offset = 0
        for chunk, Y in expression.iter_rows(rows):
            Zc = Z[offset:offset + len(chunk)]
            ZtY += np.asarray((Y.T @ Zc).T)
            y_sum += np.asarray(Y.sum(axis=0)).ravel()
            offset += len(chunk)
        self.intercept_ = y_sum / len(rows)
        # Z is centred, so Z'(Y - mean Y) = Z'Y.
        gram = Z.T @ Z + self.alpha * np.eye(Z.shape[1])
        self.coef_ = np.linalg.solve(gram, ZtY)
        return self

    def predict(self, X: np.ndarray, genes: slice | np.ndarray = slice(None)) -> np.ndarray:
        Z = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        return Z @ self.coef_[:, genes] + self.intercept_[genes]


@register_task
class PerturbationReconstruction(ScreenTask):
    """Reconstruction and structural integrity (Bendidi et al. 2024, task 6).

    A ridge decoder (linear; the reference trains a 3-hidden-layer MLP) maps the
    frozen embedding to log-normalised expression (log1p of counts per 10k, every
    gene), fitted on train cells (controls included) and evaluated on all test2 cells
    (held-out batches and perturbations, controls included; no subsampling):

    - ``reconstruction_spearman``: mean over genes of the Spearman correlation across
      test2 cells; genes constant in test2 (truth or prediction) are left out
      rather than poisoning the mean with NaN;
    - ``structural_integrity``: ``1 - mean_b(||P_b - T_b||_F / n_b) / (2 mean_b(||T_b||_F / n_b))``
      over test2 batches, prediction and truth each centred on the batch's own control
      cells (n_b counts the batch's test2 cells, controls included).
    """

    info = TaskInfo(
        name="perturbation_reconstruction",
        description="Spearman of decoded vs true expression on test2, and structural integrity of "
        "control-centred profiles.",
        metrics=(RECONSTRUCTION_SPEARMAN.name, STRUCTURAL_INTEGRITY.name),
        requires=("labels", "control", "batch", "expression"),
        stochastic=True,
        reference="arXiv:2410.13956",
    )
    Params = ReconstructionParams

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        expression: Expression = context.expression
        test = split.test2
        if len(test) < 3:
            msg = f"test2 has {len(test)} cells; reconstruction needs at least 3"
            raise NotApplicableError(msg)
        decoder = RidgeDecoder(self.params.alpha).fit(X, split.train, expression)
        truth_all = sp.csc_matrix(expression.rows(test))  # sparse: never densified
        Z_test = X[test]
        batches = design.batches[test]
        is_control = design.controls[test]
        groups = [np.flatnonzero(batches == b) for b in np.unique(batches)]
        groups = [(g, g[is_control[g]]) for g in groups if is_control[g].any()]
        diff_sq = np.zeros(len(groups))
        truth_sq = np.zeros(len(groups))
        rhos = []
        for start in range(0, expression.n_genes, self.params.gene_block):
            genes = slice(start, min(start + self.params.gene_block, expression.n_genes))
            pred = decoder.predict(Z_test, genes)
            truth = truth_all[:, genes]
            rhos.append(per_gene_spearman(pred, truth))
            truth = truth.tocsr()
            for i, (rows, ctrl) in enumerate(groups):
                d, t = centred_distance_terms(pred, truth, rows, ctrl)
                diff_sq[i] += d
                truth_sq[i] += t
        rho = np.concatenate(rhos)
        sizes = np.array([len(rows) for rows, _ in groups], dtype=np.float64)
        integrity = structural_integrity(np.sqrt(np.maximum(diff_sq, 0.0)) / sizes, np.sqrt(truth_sq) / sizes)
        finite = np.isfinite(rho)
        spearman = float(rho[finite].mean()) if finite.any() else float("nan")
        return [MetricValue(RECONSTRUCTION_SPEARMAN.name, spearman),
                MetricValue(STRUCTURAL_INTEGRITY.name, integrity)]
