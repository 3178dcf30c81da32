"""One measured process of ``benchmarks/vs_cz_benchmarks.py``: one tool, one task (or czb's four).

Run as ``python benchmarks/_workers.py TOOL TASK H5AD NPY SEEDS LABELS`` (``TOOL``: ``czb``
or ``czbenchmarks``; ``SEEDS``: comma-separated, czb only; ``LABELS``: cz-benchmarks only,
``obs`` to pass obs columns as they are, categoricals, as its datasets do, or ``arrays``
to pass them as plain string arrays) with the tool's own interpreter.
It reads the cell annotations (``obs`` of the held-out .h5ad, not the counts) and the
embedding (.npy), runs the task through the tool's public API with default parameters,
and prints one line ``RESULT {json}``: every reported value, keyed
``"<task>:<metric>"`` (``"<task>:<metric>[<classifier>]"`` for label prediction), the
seconds spent importing, loading and computing, and the peak resident memory.

Only the standard library is imported at module level, so the parent's wall time of
this process is the tool's own imports plus its work.
"""

from __future__ import annotations

import json
import resource
import sys
import time

#: czb's default cell-level tasks run together by ``czb run`` (one process, shared graph).
TOGETHER = ("clustering", "embedding", "label_prediction", "batch_integration")
#: obs columns written by benchmarks/heldout_data.py.
LABEL, BATCH, TIME = "cell_type", "batch", "time"


def metric_key(task: str, metric: str, params: dict | None) -> str:
    """``task:metric``, with the classifier of label prediction's per-classifier values."""
    classifier = (params or {}).get("classifier")
    return f"{task}:{metric}" + (f"[{classifier}]" if classifier else "")


def load(h5ad: str, npy: str):
    """The obs table of ``h5ad`` (without reading its counts) and the embedding."""
    import h5py
    import numpy as np
    from anndata.io import read_elem

    with h5py.File(h5ad, "r") as f:
        obs = read_elem(f["obs"])
    return obs, np.load(npy)


def run_czb(task: str, obs, emb, seeds: list[int]) -> dict:
    """czb's public API, as ``czb run`` scores a dataset: seeds 0,1,2 unless given,
    every core (czb's ``n_jobs`` setting), exact-or-approximate chosen by size."""
    import anndata as ad

    import czb
    from czb.core.settings import get_settings

    tasks = list(TOGETHER) if task == "together" else [task]
    table = czb.evaluate(
        ad.AnnData(obs=obs),
        embedding={"heldout": emb},
        tasks=tasks,
        label_key=LABEL,
        batch_key=BATCH,
        extra_keys={"time_point": TIME},
        seeds=seeds,
        n_jobs=get_settings().n_jobs,
        key_added=None,
    )
    metrics: dict[str, dict[str, float]] = {}
    errors = {}
    for row in table.itertuples(index=False):
        if row.status != "ok":
            errors[row.task] = f"{row.status}: {row.error}"
            continue
        params = dict(p.split("=", 1) for p in row.params.split(", ")) if row.params else {}
        metrics.setdefault(metric_key(row.task, row.metric, params), {})[str(row.seed)] = float(row.value)
    return {"metrics": metrics, "errors": errors}


def run_czbenchmarks(task: str, obs, emb, labels_as: str = "obs") -> dict:
    """cz-benchmarks' task with its default parameters and default seed, called as its
    documented programmatic use does: ``Task().run(cell_representation, task_input)``.

    ``labels_as="obs"`` passes the obs columns themselves (categorical Series), as
    cz-benchmarks' own datasets do (``SingleCellLabeledDataset.labels = adata.obs[key]``);
    ``"arrays"`` passes plain string arrays. The two differ where a category is unused in
    a subset: scib-metrics' silhouette_batch then counts the unused batches as empty
    clusters, and cells of cell types missing a batch score 1.
    """
    import czbenchmarks.tasks as t

    if labels_as == "arrays":
        obs = obs.copy()
        for column in (LABEL, BATCH):
            obs[column] = obs[column].astype(str).to_numpy()
    labels = obs[LABEL] if labels_as == "obs" else obs[LABEL].to_numpy()
    if task == "clustering":
        runner, task_input = t.ClusteringTask(), t.ClusteringTaskInput(obs=obs, input_labels=labels)
    elif task == "embedding":
        runner, task_input = t.EmbeddingTask(), t.EmbeddingTaskInput(input_labels=labels)
    elif task == "label_prediction":
        runner, task_input = t.MetadataLabelPredictionTask(), t.MetadataLabelPredictionTaskInput(labels=labels)
    elif task == "batch_integration":
        runner = t.BatchIntegrationTask()
        batches = obs[BATCH] if labels_as == "obs" else obs[BATCH].to_numpy()
        task_input = t.BatchIntegrationTaskInput(batch_labels=batches, labels=labels)
    elif task == "sequential_organization":
        runner = t.SequentialOrganizationTask()
        task_input = t.SequentialOrganizationTaskInput(obs=obs, input_labels=obs[TIME])
    else:
        msg = f"cz-benchmarks: no task {task!r} here"
        raise ValueError(msg)
    results = runner.run(cell_representation=emb, task_input=task_input)
    seed = str(runner.random_seed)
    metrics = {metric_key(task, r.metric_type.value, r.params): {seed: float(r.value)} for r in results}
    return {"metrics": metrics, "errors": {}}


def main(tool: str, task: str, h5ad: str, npy: str, seeds: str, labels_as: str = "obs") -> None:
    start = time.perf_counter()
    if tool == "czb":
        import czb  # noqa: F401  (timed apart from the work)
    else:
        import czbenchmarks.tasks  # noqa: F401
    imported = time.perf_counter()
    obs, emb = load(h5ad, npy)
    loaded = time.perf_counter()
    if tool == "czb":
        out = run_czb(task, obs, emb, [int(s) for s in seeds.split(",")])
    else:
        out = run_czbenchmarks(task, obs, emb, labels_as)
    done = time.perf_counter()
    out["inside_s"] = {"import": imported - start, "load": loaded - imported, "compute": done - loaded}
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:7])
