"""Metrics of levels 1-2 of the perturbation-analysis hierarchy (Bendidi et al. 2024,
arXiv:2410.13956): batch mixing (iLISI) and the linear probe of the perturbed gene
(a multinomial logistic regression computed in chunks, for many cells and classes).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.evaluation.distances import default_n_jobs, map_row_blocks
from czb.evaluation.metrics.mixing import lisi
from czb.evaluation.neighbors import knn_search
from czb.evaluation.registry import MetricInfo, register_metric

_PAPER = "arXiv:2410.13956"

ILISI_MEAN = register_metric(MetricInfo(
    name="ilisi_mean",
    description="Mean over test1 cells (controls included) of Harmony's LISI of batch labels: the "
    "inverse Simpson index of a perplexity-calibrated Gaussian kernel over each cell's neighbours; "
    "1 = one batch around every cell, #batches = perfectly mixed (the value the reference code logs "
    "as 'normalised').",
    reference="doi:10.1038/s41592-019-0619-0", range=(1.0, None),
))
ILISI_MEAN_NORMALIZED = register_metric(MetricInfo(
    name="ilisi_mean_normalized",
    description="1 + (ilisi_mean - 1) / (#batches - 1): the mean iLISI on the paper's normalised scale, "
    "1 (no mixing) to 2 (perfect mixing), comparable across numbers of batches.",
    reference=_PAPER, range=(1.0, 2.0),
))
LINEAR_PROBE_TOP1 = register_metric(MetricInfo(
    name="linear_probe_top1",
    description="Top-1 accuracy on test1 (held-out batches, train perturbations; no controls) of a "
    "multinomial logistic regression of the perturbed gene trained on train; chance = 1/#perturbations.",
    reference=_PAPER,
))
LINEAR_PROBE_TOP5 = register_metric(MetricInfo(
    name="linear_probe_top5",
    description="Top-5 accuracy of the linear probe on test1 (the true perturbation among the 5 most "
    "probable); chance = 5/#perturbations.",
    reference=_PAPER,
))


def ilisi(X: np.ndarray, batches: np.ndarray, *, perplexity: float,
          exact: bool | None = True) -> tuple[float, float]:
    """Mean iLISI and its normalised value ``1 + (mean - 1) / (B - 1)``.

    Neighbours: the ``3 * perplexity`` nearest other cells (Euclidean), as Harmony's
    ``compute_lisi``; kernel ``exp(-beta * distance)`` calibrated per cell to ``perplexity``
    (:func:`czb.evaluation.metrics.mixing.lisi`, in row chunks).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    batches
        ``(n_cells,)`` batch labels.
    perplexity
        Effective number of neighbours.
    exact
        Neighbour search (:func:`czb.evaluation.neighbors.knn_search`): ``True`` exact,
        ``False`` approximate, ``None`` exact up to its size threshold.

    Returns
    -------
    ``(mean, normalised)``; NaN for both with fewer than two batches.
    """
    n_batches = len(pd.unique(np.asarray(batches)))
    if n_batches < 2 or len(X) < 2:
        return float("nan"), float("nan")
    k = int(min(3 * perplexity + 1, len(X)))  # +1: the cell itself, ignored by lisi()
    idx, dist = knn_search(X, None, k, exact=exact)
    values = lisi(idx, dist, batches, perplexity=min(perplexity, (k - 1) / 3))
    mean = float(np.nanmean(values))
    return mean, 1.0 + (mean - 1.0) / (n_batches - 1)


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty: scikit-learn's
    ``LogisticRegression(C=C, solver="lbfgs")`` objective and stopping rule, computed
    for many cells and classes.

    Minimises ``mean_i(-log p_i[y_i]) + ||W||^2 / (2 C n)`` (the intercept is not
    penalised) with scipy's L-BFGS-B from zeros, ``gtol=tol``, ``maxls=50`` and
    ``ftol=64 eps`` as scikit-learn does, so it takes the same steps. The loss and
    gradient are computed in float32 over row chunks in parallel threads (one BLAS
    thread each), so memory is O(chunk × classes) per thread and the cells × classes
    probability matrix never exists. Per chunk: one GEMM for the logits (the intercept
    as a column of ones), ``exp`` and a row sum, and one GEMM accumulating
    ``exp(Z)^T (X / rowsum)`` in place; the one-hot part of the gradient (per-class
    sums of ``X``) is computed once. The logits are shifted by their row maximum only
    when a norm bound says ``exp`` could overflow.

    Attributes (after :meth:`fit`)
    ------------------------------
    coef_
        ``(n_classes, n_dims)`` float32.
    intercept_
        ``(n_classes,)`` float32.
    n_iter_
        L-BFGS iterations.
    converged_
        Whether L-BFGS met its tolerance before ``max_iter``.
    """

    #: Logits within +-this are exponentiated unshifted (float32 exp overflows at 88).
    _SAFE_LOGIT = 60.0

    def __init__(self, C: float = 1.0, *, max_iter: int = 100, tol: float = 1e-4, chunk_rows: int = 256,
                 n_jobs: int | None = None):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.chunk_rows = chunk_rows
        self.n_jobs = n_jobs

    def _loss_grad(self, theta: np.ndarray, Xa: np.ndarray, codes: np.ndarray, class_sums: np.ndarray,
                   row_norms: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective and gradient at ``theta`` (``(K, d + 1)`` raveled: weights, intercept)
        for ``Xa = [X, 1]`` (float32)."""
        from scipy.linalg.blas import sgemm

        n, d1 = Xa.shape
        n_classes = class_sums.shape[0]
        Wb = theta.reshape(n_classes, d1)
        Wt = np.ascontiguousarray(Wb.T, dtype=np.float32)  # (d + 1, K)
        w_norm = float(np.sqrt(np.einsum("ij,ij->i", Wb, Wb).max()))
        starts = range(0, n, self.chunk_rows)
        n_jobs = max(1, min(self.n_jobs or default_n_jobs(), len(starts)))

        def work(worker: int) -> tuple[float, np.ndarray]:
            G = np.zeros((n_classes, d1), dtype=np.float32, order="F")  # += exp(Z)^T (X / s)
            Z = np.empty((self.chunk_rows, n_classes), dtype=np.float32)
            loss = 0.0
            for start in starts[worker::n_jobs]:
                Xc = Xa[start:start + self.chunk_rows]
                m = len(Xc)
                z = np.matmul(Xc, Wt, out=Z[:m])
                z_true = z[np.arange(m), codes[start:start + m]].astype(np.float64)
                if row_norms[start:start + m].max() * w_norm > self._SAFE_LOGIT:
                    shift = z.max(axis=1, keepdims=True)
                    z -= shift
                    loss += float(shift.sum(dtype=np.float64))
                np.exp(z, out=z)
                s = z.sum(axis=1)
                loss += float(np.log(s.astype(np.float64)).sum() - z_true.sum())
                Xs = Xc / s[:, None]
                # G += z^T Xs in place (Fortran views: no copies).
                sgemm(1.0, z.T, Xs.T, beta=1.0, c=G, trans_b=1, overwrite_c=1)
            return loss, G

        parts: list = [None] * n_jobs

        def run(workers: np.ndarray) -> None:
            parts[workers[0]] = work(int(workers[0]))

        map_row_blocks(run, np.arange(n_jobs), n_jobs=n_jobs, block=1)
        loss = sum(p[0] for p in parts) / n
        G = (sum(p[1].astype(np.float64) for p in parts) - class_sums) / n
        l2 = 1.0 / (self.C * n)
        W = Wb[:, :-1]
        loss += 0.5 * l2 * float(np.sum(W * W))
        G[:, :-1] += l2 * W
        return loss, G.ravel()

    def fit(self, X: np.ndarray, codes: np.ndarray, n_classes: int) -> SoftmaxRegression:
        """Fit on ``X`` ``(n, d)`` with integer classes ``codes`` in ``[0, n_classes)``."""
        from scipy import optimize

        n, d = X.shape
        Xa = np.empty((n, d + 1), dtype=np.float32)
        Xa[:, :d] = X
        Xa[:, d] = 1.0
        codes = np.asarray(codes, dtype=np.int64)
        one_hot = sp.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(n_classes, n))
        class_sums = np.asarray(one_hot @ Xa.astype(np.float64))
        row_norms = np.sqrt(np.einsum("ij,ij->i", Xa, Xa, dtype=np.float64))
        result = optimize.minimize(
            self._loss_grad, np.zeros(n_classes * (d + 1)), args=(Xa, codes, class_sums, row_norms),
            method="L-BFGS-B", jac=True,
            options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol, "ftol": 64 * np.finfo(float).eps},
        )
        Wb = result.x.reshape(n_classes, d + 1)
        self.coef_ = Wb[:, :d].astype(np.float32)
        self.intercept_ = Wb[:, d].astype(np.float32)
        self.n_iter_ = int(result.nit)
        self.n_evaluations_ = int(result.nfev)
        self.converged_ = bool(result.success)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` float32 logits (ranked like the probabilities)."""
        Z = np.asarray(X, dtype=np.float32) @ self.coef_.T
        Z += self.intercept_
        return Z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` softmax probabilities (float64)."""
        Z = self.decision_function(X).astype(np.float64)
        Z -= Z.max(axis=1, keepdims=True)
        np.exp(Z, out=Z)
        Z /= Z.sum(axis=1, keepdims=True)
        return Z
