"""What the six tasks of the perturbation-analysis hierarchy share.

Each task scores an embedding of a perturbation screen (roles ``labels`` = perturbed
gene, ``control`` = control flag, ``batch``) under every requested post-processing
(:func:`~czb.evaluation.perturbation.hierarchy.postprocessing.postprocess`) and tags each value with
``params.postprocessing``, so the report can show every variant and the best one.
The design, the seeded split and the post-processed embeddings are computed once
per embedding and shared by the tasks through the context's memo.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field

from czb.core.errors import NotApplicableError
from czb.evaluation.applicability import topk_problem
from czb.evaluation.context import EvaluationContext
from czb.evaluation.perturbation.hierarchy.design import ScreenDesign, ScreenSplit, split_screen
from czb.evaluation.perturbation.hierarchy.postprocessing import POSTPROCESSINGS, postprocess
from czb.evaluation.task import MetricValue, Task, TaskParams

#: The post-processed embeddings of one context are all kept while together they stay
#: under this size; beyond it only the latest is kept (and others are recomputed).
POSTPROCESS_CACHE_BYTES = 2 * 2**30

SCREEN_ROLES = ("labels", "control", "batch")


class ScreenParams(TaskParams):
    #: Post-processings to score, each reported separately (``params.postprocessing``).
    postprocessing: tuple[Literal["none", "center", "center_scale", "tvn"], ...] = POSTPROCESSINGS
    #: Share of batches and of perturbations in train (split tasks only).
    train_fraction: float = Field(0.7, gt=0.0, lt=1.0)


def screen_design(context: EvaluationContext) -> ScreenDesign:
    """The screen's design from the context's roles (memoised)."""
    return context.memo(("screen_design",), lambda: ScreenDesign.from_roles(
        context.require("labels"), context.require("control"), context.require("batch")))


def screen_split(context: EvaluationContext, train_fraction: float, seed: int) -> ScreenSplit:
    """The seeded split (memoised per fraction and seed, so all tasks see the same one)."""
    return context.memo(("screen_split", float(train_fraction), seed),
                        lambda: split_screen(screen_design(context), train_fraction, seed=seed))


def postprocessed(context: EvaluationContext, method: str) -> np.ndarray:
    """The context's embedding after ``method``, cached within :data:`POSTPROCESS_CACHE_BYTES`."""
    cache: dict[str, np.ndarray] = context.memo(("postprocessed",), dict)
    if method not in cache:
        X = postprocess(context.X, screen_design(context), method).astype(np.float32)
        if sum(v.nbytes for v in cache.values()) + X.nbytes > POSTPROCESS_CACHE_BYTES:
            cache.clear()
        cache[method] = X
    return cache[method]


def topk_accuracies(ranks: np.ndarray, n_classes: int, top1: str, top5: str, context: EvaluationContext,
                    *, cells: str) -> list[MetricValue]:
    """Top-1 and top-5 accuracy of ``(n_queries,)`` true-class ``ranks`` (0 = first);
    top-5 is left out, with the reason, when ``cells`` hold 5 classes or fewer
    (:func:`~czb.evaluation.applicability.topk_problem`)."""
    out = [MetricValue(top1, float(np.mean(ranks < 1)))]
    problem = topk_problem(n_classes, 5)
    if problem is None:
        out.append(MetricValue(top5, float(np.mean(ranks < 5))))
    else:
        context.skip_metric(top5, f"{cells} hold {problem}")
    return out


class ScreenTask(Task):
    """Base of the hierarchy's tasks: subclasses implement :meth:`score` for one
    post-processed embedding."""

    Params: ClassVar[type[TaskParams]] = ScreenParams
    #: Whether the task reads the train/test1/test2 split (else it scores all cells).
    uses_split: ClassVar[bool] = True

    def check(self, context: EvaluationContext) -> None:
        try:
            super().check(context)
        except NotApplicableError as e:
            msg = f"{e} (a screen declares label_key, batch_key and control_key or control_label)"
            raise NotApplicableError(msg) from None

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        design = screen_design(context)
        split = screen_split(context, self.params.train_fraction, seed) if self.uses_split else None
        out = []
        for method in self.params.postprocessing:
            X = postprocessed(context, method)
            for value in self.score(X, design, split, context, seed=seed):
                value.params = {"postprocessing": method, **value.params}
                out.append(value)
        return out

    @abstractmethod
    def score(self, X: np.ndarray, design: ScreenDesign, split: ScreenSplit | None,
              context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        """Metrics of one post-processed embedding ``X`` (``(n_cells, n_dims)``)."""
