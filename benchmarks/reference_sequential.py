"""Reference sequential-organization values from cz-benchmarks 0.15.1, for tests/fixtures.

Run in the cz-benchmarks virtual environment (see reference_label_prediction.py)::

    /tmp/czbref/bin/python benchmarks/reference_sequential.py > tests/fixtures/cz_benchmarks_0.15.1_sequential.json

cz-benchmarks draws the random baseline of ``sequential_alignment`` from numpy's
global random state without seeding it, so the normalised score differs call by
call. Recorded per case: the deterministic part (``normalize=False``, the mean time
distance to the k nearest neighbours), ``REPEATS`` normalised scores and baselines
from repeated calls (their spread sets the test tolerance), and the exact
expectation of the baseline (mean |t_i - t_j| over all pairs i != j, brute force).
The cases come from ``sequential_cases.make_cases``, which the test imports too; the
checksums let the test confirm it has the same data.
"""

import json

import numpy as np
import pandas as pd
from czbenchmarks.metrics.utils import _compute_random_baseline, sequential_alignment
from czbenchmarks.tasks.sequential import (
    SequentialOrganizationTask,
    SequentialOrganizationTaskInput,
)
from sequential_cases import make_cases  # beside this script

REPEATS = 20


def exact_baseline(t):
    d = np.abs(t[:, None] - t[None, :])
    return float(d.sum() / (len(t) * (len(t) - 1)))


out = {
    "_source": "cz-benchmarks 0.15.1 czbenchmarks.metrics.utils.sequential_alignment and "
    "SequentialOrganizationTask (silhouette_score) on benchmarks/sequential_cases.py:make_cases()",
    "repeats": REPEATS,
    "cases": {},
}
for name, (X, labels) in make_cases().items():
    t = np.asarray(labels).astype(float)
    task = SequentialOrganizationTask(random_seed=42)
    results = task.run(
        cell_representation=X,
        task_input=SequentialOrganizationTaskInput(obs=pd.DataFrame({"t": labels}), input_labels=labels),
    )
    task_values = {r.metric_type.value: float(r.value) for r in results}
    variants = []
    for k, adaptive in ((5, False), (15, False), (15, True)):
        kw = dict(k=k, adaptive_k=adaptive)
        variants.append({
            "k": k,
            "adaptive_k": adaptive,
            "distance": float(sequential_alignment(X, labels, normalize=False, **kw)),
            "normalized": [float(sequential_alignment(X, labels, normalize=True, **kw)) for _ in range(REPEATS)],
            "baselines": [float(_compute_random_baseline(t, k)) for _ in range(REPEATS)],
        })
    out["cases"][name] = {
        "n_cells": len(t),
        "checksum_X": float(np.sum(X)),
        "checksum_t": float(np.sum(t)),
        "exact_baseline": exact_baseline(t),
        "silhouette_score": task_values["silhouette_score"],
        "task_sequential_alignment": task_values["sequential_alignment"],
        "variants": variants,
    }
print(json.dumps(out, indent=1))
