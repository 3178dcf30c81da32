"""Label prediction: how well do simple classifiers predict labels from the embedding?"""

from __future__ import annotations

from typing import Literal

from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import classification as m
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task, TaskParams


class LabelPredictionParams(TaskParams):
    n_folds: int = 5
    min_class_size: int = 10
    classifiers: tuple[Literal["lr", "knn", "rf"], ...] = m.CLASSIFIERS


@register_task
class LabelPrediction(Task):
    """cz-benchmarks' protocol: drop classes under 10 cells, StratifiedKFold(5, shuffled,
    seeded), logistic regression / kNN (k=5) / random forest (100 trees); fold means per
    classifier (``params.classifier``) and over all of them (``MEAN(knn,lr,rf)``).

    Logistic regression keeps scikit-learn's 100-iteration cap, as cz-benchmarks does;
    fits that stop before meeting their tolerance (scikit-learn's ``ConvergenceWarning``:
    at the cap, or in a failed line search) are counted over the run's seeds in
    ``computation["lr_not_converged"]``, absent when every fit converged."""

    info = TaskInfo(
        name="label_prediction",
        description="Cross-validated prediction of cell labels (accuracy, F1, precision, recall, AUROC).",
        metrics=tuple(m.FOLD_SCORES.values()),
        requires=("labels",),
        stochastic=True,
        reference="https://github.com/chanzuckerberg/cz-benchmarks",
        cost="cz-benchmarks' 15 fits once per seed (3 seeds by default, cz-benchmarks runs 1), in parallel "
        "over cores; the random forest takes ~90% (36 s of a fold's 40 s at 50,000 cells on one core)",
    )
    Params = LabelPredictionParams

    def check(self, context: EvaluationContext) -> None:
        super().check(context)
        m.require_classes(context.require("labels"), self.params.min_class_size)

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        p = self.params
        cv = m.cross_validate_classifiers(
            context.X,
            context.require("labels"),
            seed=seed,
            n_folds=p.n_folds,
            min_class_size=p.min_class_size,
            classifiers=p.classifiers,
            n_jobs=context.n_jobs,
            exact=context.exact,
        )
        _note_convergence(context, seed, *cv.lr_not_converged())
        context.note("label_prediction", {
            "protocol": "atlas_scale" if cv.atlas_scale else "cz-benchmarks",
            **({"lr": "czb multinomial L-BFGS", "lr_max_samples": m.LR_MAX_SAMPLES, "knn": "czb neighbour search",
                "rf_max_samples": m.RF_MAX_SAMPLES} if cv.atlas_scale else {}),
        })
        mean_name = f"MEAN({','.join(sorted(p.classifiers))})"
        extra = {"n_cells_used": cv.n_cells, "dropped_labels": ",".join(cv.dropped_labels)}
        out = []
        for score, metric in m.FOLD_SCORES.items():
            out.append(MetricValue(metric, float(cv.folds[score].mean()), {"classifier": mean_name, **extra}))
            per_classifier = cv.folds.groupby("classifier", sort=False)[score].mean()
            out += [MetricValue(metric, float(v), {"classifier": c, **extra}) for c, v in per_classifier.items()]
        return out


def _note_convergence(context: EvaluationContext, seed: int, stalled: int, fits: int) -> None:
    """Note ``lr_not_converged`` ``{folds, of, max_iter}`` when some logistic-regression fit
    did not converge. ``run`` is called once per seed but the notes belong to the whole
    run (the runner starts each run with a new ``notes`` dict), so counts are kept per
    seed for the current notes and summed."""
    held = context.memo(("label_prediction", "lr_convergence"), lambda: [None, {}])
    if held[0] is not context.notes:  # a new run
        held[:] = [context.notes, {}]
    held[1][seed] = (stalled, fits)
    stalled = sum(s for s, _ in held[1].values())
    if stalled:
        context.note("lr_not_converged", {"folds": stalled, "of": sum(f for _, f in held[1].values()),
                                          "max_iter": m.LR_MAX_ITER})
