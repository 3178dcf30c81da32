"""Level 2 of the perturbation-analysis hierarchy: is the perturbation linearly readable?"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.evaluation.applicability import topk_problem
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign, ScreenSplit, unique_codes
from czb.evaluation.perturbation.hierarchy.mixing_probe_metrics import (
    LINEAR_PROBE_TOP1,
    LINEAR_PROBE_TOP5,
    SoftmaxRegression,
)
from czb.evaluation.perturbation.hierarchy.postprocessing import standard_scale_params
from czb.evaluation.perturbation.hierarchy.ranking import class_codes, topk_ranks
from czb.evaluation.perturbation.hierarchy.screen_task import (
    ScreenParams,
    ScreenTask,
    topk_accuracies,
)
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue


class LinearProbeParams(ScreenParams):
    #: Inverse L2 regularisation strength of the logistic regression.
    C: float = Field(1.0, gt=0.0)
    max_iter: int = Field(1000, ge=1)
    #: L-BFGS stops when every entry of the mean objective's gradient is at most this
    #: (scikit-learn's ``tol``).
    tol: float = Field(1e-4, gt=0.0)


@register_task
class PerturbationLinearProbe(ScreenTask):
    """Linear probe of the perturbed gene (Bendidi et al. 2024, task 2).

    A multinomial logistic regression (L2 with ``C``, inputs standardised on train) is
    fitted on train cells without controls and scored on test1 without controls: top-1
    and top-5 accuracy. The model, objective and stopping rule are scikit-learn's
    ``LogisticRegression(solver="lbfgs")``; the fit is
    :class:`~czb.evaluation.perturbation.hierarchy.mixing_probe_metrics.SoftmaxRegression`, which
    computes the same L-BFGS steps in float32 row chunks on all cores (a million
    cells and ten thousand perturbations in minutes). The reference trains the same
    linear model with AdamW for 250 epochs; here it is fitted to scikit-learn's
    convergence criterion instead.
    """

    info = TaskInfo(
        name="perturbation_linear_probe",
        description="Top-1/top-5 accuracy on test1 of a logistic regression of the perturbation trained on train.",
        metrics=(LINEAR_PROBE_TOP1.name, LINEAR_PROBE_TOP5.name),
        requires=("labels", "control", "batch"),
        stochastic=True,
        reference="arXiv:2410.13956",
    )
    Params = LinearProbeParams

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        train = split.train[~design.controls[split.train]]
        test = split.test1[~design.controls[split.test1]]
        if len(train) == 0 or len(test) == 0:
            msg = f"the split left {len(train)} train and {len(test)} test1 perturbed cells; nothing to probe"
            raise NotApplicableError(msg)
        classes, codes = unique_codes(design.perturbations[train])
        top1_problem = topk_problem(len(classes), 1)
        if top1_problem is not None:
            raise NotApplicableError(f"the train cells hold {top1_problem}")
        X_train = np.asarray(X[train], dtype=np.float64)
        mean, scale = standard_scale_params(X_train)
        X_train = ((X_train - mean) / scale).astype(np.float32)
        model = SoftmaxRegression(self.params.C, max_iter=self.params.max_iter, tol=self.params.tol)
        model.fit(X_train, codes, len(classes))
        del X_train
        test_codes = class_codes(classes, design.perturbations[test])
        ranks = np.empty(len(test))
        step = 4096
        for start in range(0, len(test), step):
            rows = test[start:start + step]
            logits = model.decision_function(((X[rows] - mean) / scale).astype(np.float32))
            ranks[start:start + step] = topk_ranks(logits, test_codes[start:start + step])
        return topk_accuracies(ranks, len(classes), LINEAR_PROBE_TOP1.name, LINEAR_PROBE_TOP5.name,
                               context, cells="the train cells")
