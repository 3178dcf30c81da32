"""Reference label-prediction values from cz-benchmarks 0.15.1, for tests/fixtures.

Run in a separate virtual environment (cz-benchmarks pulls torch)::

    python -m venv /tmp/czbref && /tmp/czbref/bin/pip install torch==2.13.0 cz-benchmarks==0.15.1
    /tmp/czbref/bin/python benchmarks/reference_label_prediction.py > tests/fixtures/cz_benchmarks_0.15.1_label_prediction_pbmc68k.json
"""

import json

import numpy as np
import scanpy as sc
from czbenchmarks.tasks.label_prediction import (
    MetadataLabelPredictionTask,
    MetadataLabelPredictionTaskInput,
)

adata = sc.datasets.pbmc68k_reduced()
task = MetadataLabelPredictionTask(random_seed=42)
results = task.run(
    cell_representation=np.asarray(adata.obsm["X_pca"]),
    task_input=MetadataLabelPredictionTaskInput(labels=adata.obs["bulk_labels"]),
)
print(json.dumps({
    "_source": "cz-benchmarks 0.15.1 MetadataLabelPredictionTask(random_seed=42) on scanpy's "
    "pbmc68k_reduced obsm['X_pca'] with labels obs['bulk_labels']",
    "metrics": [
        {"metric": r.metric_type.value, "classifier": r.params.get("classifier"), "value": float(r.value)}
        for r in results
    ],
}, indent=1))
