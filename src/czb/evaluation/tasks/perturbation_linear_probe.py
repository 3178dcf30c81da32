"""Level 2 of the perturbation-analysis hierarchy: is the perturbation linearly readable?"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from czb.errors import NotApplicableError
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import perturbation_analysis as pa
from czb.evaluation.perturbation_analysis import ScreenDesign, ScreenSplit
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.tasks.base import MetricValue
from czb.evaluation.tasks.screen_task import ScreenParams, ScreenTask


class LinearProbeParams(ScreenParams):
    #: Inverse L2 regularisation strength of the logistic regression.
    C: float = Field(1.0, gt=0.0)
    max_iter: int = Field(1000, ge=1)


@register_task
class PerturbationLinearProbe(ScreenTask):
    """Linear probe of the perturbed gene (Bendidi et al. 2024, task 2).

    A multinomial logistic regression (scikit-learn, lbfgs, L2 with ``C``, inputs
    standardised on train) is fitted on train cells without controls and scored on
    test1 without controls: top-1 and top-5 accuracy. The reference trains the same
    linear model with AdamW for 250 epochs; here it is fitted to convergence instead.
    """

    info = TaskInfo(
        name="perturbation_linear_probe",
        description="Top-1/top-5 accuracy on test1 of a logistic regression of the perturbation trained on train.",
        metrics=(pa.LINEAR_PROBE_TOP1.name, pa.LINEAR_PROBE_TOP5.name),
        requires=("labels", "control", "batch"),
        stochastic=True,
        reference="arXiv:2410.13956",
    )
    Params = LinearProbeParams

    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        train = split.train[~design.controls[split.train]]
        test = split.test1[~design.controls[split.test1]]
        if len(train) == 0 or len(test) == 0:
            msg = f"the split left {len(train)} train and {len(test)} test1 perturbed cells; nothing to probe"
            raise NotApplicableError(msg)
        scaler = StandardScaler().fit(X[train])
        model = LogisticRegression(C=self.params.C, max_iter=self.params.max_iter, random_state=seed)
        model.fit(scaler.transform(X[train]), design.perturbations[train])
        codes = pa.class_codes(model.classes_, design.perturbations[test])
        top1 = top5 = 0
        for start in range(0, len(test), 4096):
            rows = test[start:start + 4096]
            proba = model.predict_proba(scaler.transform(X[rows]))
            top1 += int(pa.topk_hits(proba, codes[start:start + 4096], 1).sum())
            top5 += int(pa.topk_hits(proba, codes[start:start + 4096], 5).sum())
        n = max(len(test), 1)
        return [MetricValue(pa.LINEAR_PROBE_TOP1.name, top1 / n), MetricValue(pa.LINEAR_PROBE_TOP5.name, top5 / n)]
