"""Embedding quality: are cells of one label closer to each other than to other labels?"""

from __future__ import annotations

from czb.evaluation.applicability import require_groups
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import silhouette as m
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue, Task


@register_task
class Embedding(Task):
    """Label silhouette, rescaled to [0, 1] (cz-benchmarks' ``silhouette_score``)."""

    info = TaskInfo(
        name="embedding",
        description="Silhouette of cell labels in the embedding, rescaled to [0, 1].",
        metrics=(m.SILHOUETTE_SCORE.name,),
        requires=("labels",),
        stochastic=False,
        reference="doi:10.1038/s41592-021-01336-8",
    )

    def check(self, context: EvaluationContext) -> None:
        super().check(context)
        require_groups(context.require("labels"), what="label", task=self.info.name,
                       metrics="label silhouettes")

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        estimate = context.silhouette("silhouette_label", context.require("labels"))
        return [MetricValue.from_estimate(m.SILHOUETTE_SCORE.name, estimate)]
