"""Host-side evaluation: metrics and tasks, usable from Python without the CLI.

>>> from czb.evaluation import evaluate
>>> results = evaluate(X, labels=cell_types, batches=batches, tasks=["clustering"])

Needs only numpy, scipy, scikit-learn, pandas, igraph and leidenalg (no torch, no jax).
"""

from czb.evaluation.context import EvaluationContext
from czb.evaluation.registry import METRICS, TASKS, MetricInfo, TaskInfo
from czb.evaluation.runner import evaluate

__all__ = ["METRICS", "TASKS", "EvaluationContext", "MetricInfo", "TaskInfo", "evaluate"]
