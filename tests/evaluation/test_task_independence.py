"""A task's values do not depend on the other tasks of its run.

Tasks of one run share work (the neighbour graph, built for the largest ``k`` any of
them reads; sampled neighbourhoods; silhouettes; Leiden partitions). Sharing is only
allowed where the shared result is identical to what the task computes alone: here every
cell-level task is run alone and with all the others, on the exact and on the
approximate (atlas-scale) paths, and every value must be the same.
"""

import numpy as np
import pytest
from conftest import planted_embedding

from czb.evaluation.runner import evaluate

#: Every task that scores a cell embedding from per-cell annotations.
CELL_TASKS = (
    "clustering",
    "embedding",
    "label_prediction",
    "batch_integration",
    "sequential_organization",
    "cross_species_integration",
    "cross_species_label_prediction",
)


@pytest.fixture(scope="module")
def annotated():
    # Weakly separated types, so Leiden's partition moves if its graph does.
    X, labels, batches = planted_embedding(600, n_types=6, n_batches=3, dim=16, separation=0.5,
                                           batch_shift=0.6, seed=21)
    X = np.round(X)  # on a lattice: many cells tie at the k-th neighbour, as with a coarse model
    rng = np.random.default_rng(21)
    roles = {
        "species": np.where(rng.random(len(X)) < 0.5, "human", "mouse"),
        "time_point": np.array([int(label[-1]) % 4 for label in labels]),
    }
    return X, labels, batches, roles


def _values(result):
    assert result.status == "ok", (result.task, result.error)
    return {(m.name, tuple(sorted(m.params.items()))): m.values_raw for m in result.metrics}


@pytest.mark.parametrize("exact", [None, False], ids=["exact_paths", "atlas_paths"])
def test_every_task_alone_equals_the_same_task_with_all_the_others(annotated, exact):
    X, labels, batches, roles = annotated
    kwargs = dict(labels=labels, batches=batches, roles=roles, seeds=(0, 1), exact=exact)
    together = {r.task: _values(r) for r in evaluate(X, tasks=CELL_TASKS, **kwargs)}
    for task in CELL_TASKS:
        (alone,) = evaluate(X, tasks=(task,), **kwargs)
        assert _values(alone) == together[task], task
