"""czb and cz-benchmarks 0.15.1 side by side on atlas-sized embeddings.

Usage::

    # once: cz-benchmarks in its own virtual environment (it pulls torch)
    python -m venv /tmp/czbref && /tmp/czbref/bin/pip install torch==2.13.0 cz-benchmarks==0.15.1
    python benchmarks/atlas_scale.py --czbench-python /tmp/czbref/bin/python \\
        [--sizes 10000 50000 200000 1000000] [--czbench-max-cells 200000] [--timeout 1800]

For each size, an embedding is drawn and saved once: by default the held-out one of
``benchmarks/heldout_data.py`` (30 Zipf-sized types in 8 lineages, 6 batches that act
per lineage, heavy-tailed anisotropic spread; not czb's generator), or with
``--data planted`` the planted atlas of :func:`planted_atlas` (24 types, 8 batches with
one shift each, 10 time points along a shared axis). Then every cell-level task runs in a fresh
process, with czb and (up to ``--czbench-max-cells``) with cz-benchmarks on the same
arrays and the same seed. A process's wall time includes its imports and any JIT
compilation, which is what a user waits for. Finally czb runs the four cell-level
tasks (clustering, embedding, label prediction, batch integration) together in one
process, sharing one neighbour graph, as ``czb run`` does.

Prints one table: per task and metric, both values and their difference, both
wall times and their ratio, both peak resident memories (and, for the four-task
process, the peak of it and its worker processes together); then how czb computed its
neighbour graph (exact, or approximate with the measured recall) and silhouettes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CELL_TASKS = ("clustering", "embedding", "label_prediction", "batch_integration", "sequential_organization")
TOGETHER = ("clustering", "embedding", "label_prediction", "batch_integration")
SEED = 42


def planted_atlas(n_cells: int, *, dims: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    """A planted embedding with the structure of an integrated atlas.

    24 cell types (Dirichlet-distributed sizes, none under 0.5%) with centres in a
    16-dimensional latent space and anisotropic spread that overlaps neighbouring
    types; 8 batches, each a random shift; 10 time points moving cells along one
    shared direction; mapped into ``dims`` dimensions by a random orthonormal map
    plus isotropic noise (so the intrinsic dimension is ~16, as in real embeddings).

    Returns
    -------
    ``X`` (float32, ``(n_cells, dims)``), ``labels``, ``batches`` (strings) and
    ``time_points`` (int).
    """
    rng = np.random.default_rng(seed)
    n_types, n_batches, n_times, latent = 24, 8, 10, 16
    share = np.maximum(rng.dirichlet(np.full(n_types, 2.0)), 0.005)
    types = rng.choice(n_types, size=n_cells, p=share / share.sum())
    centres = rng.normal(0.0, 0.7, size=(n_types, latent))
    spread = rng.uniform(0.6, 1.4, size=(n_types, latent)) * np.linspace(1.0, 0.3, latent)
    batches = rng.integers(0, n_batches, size=n_cells)
    batch_shift = rng.normal(0.0, 0.6, size=(n_batches, latent))
    times = rng.integers(0, n_times, size=n_cells)
    axis = rng.normal(size=latent)
    axis /= np.linalg.norm(axis)
    Z = (
        centres[types]
        + rng.standard_normal((n_cells, latent)) * spread[types]
        + batch_shift[batches]
        + np.outer(0.3 * times, axis)
    )
    basis, _ = np.linalg.qr(rng.normal(size=(dims, latent)))
    X = (Z @ basis.T + rng.normal(0.0, 0.2, size=(n_cells, dims))).astype(np.float32)
    return {
        "X": X,
        "labels": np.char.add("type", types.astype(str)),
        "batches": np.char.add("batch", batches.astype(str)),
        "time_points": times,
    }


# --------------------------------------------------------------------------- workers


def heldout_arrays(n_cells: int) -> dict[str, np.ndarray]:
    """benchmarks/heldout_data.py's embedding and annotations (seed 0), without counts."""
    sys.path.insert(0, str(Path(__file__).parent))
    from heldout_data import embedding_arrays

    return embedding_arrays(n_cells)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _czb_worker(task: str, data: dict[str, np.ndarray], seed: int) -> dict:
    from czb.evaluation.runner import evaluate

    tasks = TOGETHER if task == "together" else (task,)
    results = evaluate(
        data["X"],
        labels=data["labels"],
        batches=data["batches"],
        roles={"time_point": data["time_points"]},
        tasks=tasks,
        seeds=(seed,),
        n_jobs=len(os.sched_getaffinity(0)),
    )
    metrics, cis, computation, errors, seconds = {}, {}, {}, {}, {}
    for r in results:
        seconds[r.task] = round(r.runtime_s, 1)
        if r.status != "ok":
            errors[r.task] = r.error
        for m in r.metrics:
            key = m.name + (f"[{m.params['classifier']}]" if "classifier" in m.params else "")
            metrics[f"{r.task}:{key}"] = m.value
            if m.ci95 is not None:
                cis[f"{r.task}:{key}"] = [float(x) for x in m.ci95]
        computation.update(r.computation)
    return {"metrics": metrics, "ci95": cis, "computation": computation, "errors": errors, "task_seconds": seconds}


def _czbench_worker(task: str, data: dict[str, np.ndarray], seed: int) -> dict:
    import logging
    import warnings

    import pandas as pd

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    X, labels, batches, times = data["X"], data["labels"], data["batches"], data["time_points"]
    if task == "clustering":
        from czbenchmarks.tasks.clustering import ClusteringTask, ClusteringTaskInput

        run = ClusteringTask(random_seed=seed).run(
            X, ClusteringTaskInput(obs=pd.DataFrame({"label": labels}), input_labels=labels)
        )
    elif task == "embedding":
        from czbenchmarks.tasks.embedding import EmbeddingTask, EmbeddingTaskInput

        run = EmbeddingTask(random_seed=seed).run(X, EmbeddingTaskInput(input_labels=labels))
    elif task == "label_prediction":
        from czbenchmarks.tasks.label_prediction import (
            MetadataLabelPredictionTask,
            MetadataLabelPredictionTaskInput,
        )

        run = MetadataLabelPredictionTask(random_seed=seed).run(
            X, MetadataLabelPredictionTaskInput(labels=pd.Series(labels))
        )
    elif task == "batch_integration":
        from czbenchmarks.tasks.integration import BatchIntegrationTask, BatchIntegrationTaskInput

        run = BatchIntegrationTask(random_seed=seed).run(
            X, BatchIntegrationTaskInput(batch_labels=batches, labels=labels)
        )
    elif task == "sequential_organization":
        from czbenchmarks.tasks.sequential import (
            SequentialOrganizationTask,
            SequentialOrganizationTaskInput,
        )

        run = SequentialOrganizationTask(random_seed=seed).run(
            X, SequentialOrganizationTaskInput(obs=pd.DataFrame({"t": times}), input_labels=times)
        )
    else:
        msg = f"cz-benchmarks has no task {task!r} here"
        raise ValueError(msg)
    metrics = {}
    for r in run:
        key = r.metric_type.value + (f"[{r.params['classifier']}]" if "classifier" in (r.params or {}) else "")
        metrics[f"{task}:{key}"] = float(r.value)
    return {"metrics": metrics}


def worker(tool: str, task: str, path: str, seed: int) -> None:
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    out = (_czb_worker if tool == "czb" else _czbench_worker)(task, data, seed)
    out["peak_rss_gib"] = _peak_rss_gib()
    print("RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- driver

#: cz-benchmarks' metric names for czb's, where they measure the same thing.
SAME_METRIC = {
    "clustering:adjusted_rand_index": "clustering:adjusted_rand_index",
    "clustering:normalized_mutual_info": "clustering:normalized_mutual_info",
    "embedding:silhouette_score": "embedding:silhouette_score",
    "batch_integration:entropy_per_cell": "batch_integration:entropy_per_cell",
    "batch_integration:batch_silhouette": "batch_integration:batch_silhouette",
    "sequential_organization:silhouette_score": "sequential_organization:silhouette_score",
    "sequential_organization:sequential_alignment": "sequential_organization:sequential_alignment",
    **{
        f"label_prediction:mean_fold_{s}[{c}]": f"label_prediction:mean_fold_{s}[{c}]"
        for s in ("accuracy", "f1", "precision", "recall", "auroc")
        for c in ("lr", "knn", "rf", "MEAN(knn,lr,rf)")
    },
}


class TreeMemory:
    """Peak resident memory of a process and its descendants together (worker
    processes included, which the process's own ``ru_maxrss`` leaves out), sampled every
    ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.5):
        import threading

        self.peak_bytes = 0
        self._pid, self._interval = pid, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        try:
            root = psutil.Process(self._pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.wait(self._interval):
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    total += proc.memory_info().rss
            except psutil.Error:  # a process ended between the listing and the reading
                continue
            self.peak_bytes = max(self.peak_bytes, total)

    def stop(self) -> float:
        """Stop sampling; the peak in GiB."""
        self._stop.set()
        self._thread.join()
        return self.peak_bytes / 2**30


def run_worker(python: str, tool: str, task: str, path: Path, timeout: float) -> dict:
    cmd = [python, __file__, "worker", tool, task, str(path), str(SEED)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    memory = TreeMemory(proc.pid)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"seconds": None, "timeout": timeout, "tree_peak_rss_gib": memory.stop()}
    seconds = time.perf_counter() - start
    tree_peak = memory.stop()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"seconds": seconds, "error": " | ".join(tail), "tree_peak_rss_gib": tree_peak}
    return {"seconds": seconds, **json.loads(lines[-1].removeprefix("RESULT ")), "tree_peak_rss_gib": tree_peak}


def _fmt_time(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("seconds") is None:
        return f">{r['timeout']:.0f}"
    return f"{r['seconds']:.1f}"


def _fmt(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 50_000, 200_000, 1_000_000])
    parser.add_argument("--tasks", nargs="+", default=list(CELL_TASKS), choices=CELL_TASKS)
    parser.add_argument("--czbench-python", help="python of a virtual environment with cz-benchmarks 0.15.1")
    parser.add_argument("--czbench-max-cells", type=int, default=200_000)
    parser.add_argument("--per-task-max-cells", type=int, default=200_000,
                        help="above this size only the four-task process runs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per czb process")
    parser.add_argument("--czbench-timeout", type=float, default=900.0, help="seconds per cz-benchmarks process")
    parser.add_argument("--workdir", type=Path, default=Path("atlas-scale-data"))
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    parser.add_argument("--data", choices=["heldout", "planted"], default="heldout",
                        help="benchmarks/heldout_data.py's embedding [default] or planted_atlas()")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    rows, extra = [], []
    header = (f"{'cells':>8} {'task':<24} {'metric':<34} {'czb':>8} {'cz-bench':>8} {'|diff|':>14} "
              f"{'czb s':>7} {'cz s':>7} {'speed-up':>8} {'czb GiB':>7} {'cz GiB':>6}")
    print(header, flush=True)
    for n in args.sizes:
        path = args.workdir / f"{args.data}_{n}.npz"
        if not path.exists():
            np.savez(path, **(planted_atlas(n) if args.data == "planted" else heldout_arrays(n)))
        for task in args.tasks if n <= args.per_task_max_cells else ():
            ours = run_worker(sys.executable, "czb", task, path, args.timeout)
            theirs = None
            if args.czbench_python and n <= args.czbench_max_cells:
                theirs = run_worker(args.czbench_python, "czbench", task, path, args.czbench_timeout)
            rows.append({"cells": n, "task": task, "czb": ours, "czbench": theirs})
            _print_task(n, task, ours, theirs)
        together = run_worker(sys.executable, "czb", "together", path, args.timeout)
        extra.append({"cells": n, "together": together})
        print(f"{n:>8} {'four tasks, one process':<24} {'':<34} {'':>8} {'':>8} {'':>14} "
              f"{_fmt_time(together):>7} {'':>7} {'':>8} {_fmt(together.get('peak_rss_gib'), '.2f'):>7}",
              flush=True)
        print(f"{'':>8} peak memory with its worker processes: {_fmt(together.get('tree_peak_rss_gib'), '.2f')} GiB",
              flush=True)
        print(f"{'':>8} seconds per task: {together.get('task_seconds')}", flush=True)
        if together.get("error") or together.get("errors"):
            print(f"{'':>8} errors: {together.get('error') or together.get('errors')}", flush=True)
        how = together.get("computation", {})
        graph = how.get("neighbors", {})
        sil = how.get("silhouette_label", {})
        mixing = how.get("neighborhoods", {})
        graph_text = graph.get("method", "?") + "".join(
            f", recall@{j} {r:.4f}" for j, r in graph.get("recall", {}).items()
        ) + (f" (on {graph['recall_sample']} cells)" if graph.get("recall") else "")
        sil_text = sil.get("method", "?") + (
            f", n = {sil['n_sampled']}, 95% CI [{sil['ci95'][0]:.4f}, {sil['ci95'][1]:.4f}]" if "ci95" in sil else ""
        )
        mixing_text = (f"; entropy/iLISI: exact {mixing['k']}-neighbourhoods of {mixing['n_sampled']} sampled cells"
                       if mixing else "")
        print(f"{'':>8} neighbour graph: {graph_text}; label silhouette: {sil_text}{mixing_text}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"tasks": rows, "together": extra}, indent=1))


def _print_task(n: int, task: str, ours: dict, theirs: dict | None) -> None:
    ratio = None
    if theirs is not None and ours.get("seconds"):
        t = theirs.get("seconds") or theirs.get("timeout")
        ratio = f"{'>' if theirs.get('seconds') is None else ''}{t / ours['seconds']:.1f}x"
    names = [k for k in ours.get("metrics", {}) if k in SAME_METRIC] or [None]
    if ours.get("error") or ours.get("errors"):
        print(f"{n:>8} {task:<24} czb error: {ours.get('error') or ours.get('errors')}", flush=True)
    if theirs and theirs.get("error"):
        print(f"{n:>8} {task:<24} cz-benchmarks error: {theirs['error']}", flush=True)
    for i, name in enumerate(names):
        a = ours.get("metrics", {}).get(name) if name else None
        b = (theirs or {}).get("metrics", {}).get(SAME_METRIC.get(name, "")) if name else None
        diff = abs(a - b) if a is not None and b is not None else None
        ci = ours.get("ci95", {}).get(name) if name else None
        # An estimated value: does cz-benchmarks' (exact) value fall inside czb's 95% CI?
        in_ci = "" if ci is None or b is None else (" in CI" if ci[0] <= b <= ci[1] else " out CI")
        first = i == 0
        label = name.split(":", 1)[1] if name else ""
        print(
            f"{n:>8} {task:<24} {label:<34} {_fmt(a):>8} {_fmt(b):>8} {_fmt(diff, '.1e') + in_ci:>14} "
            f"{_fmt_time(ours) if first else '':>7} {_fmt_time(theirs) if first else '':>7} "
            f"{(ratio or '-') if first else '':>8} "
            f"{_fmt(ours.get('peak_rss_gib'), '.2f') if first else '':>7} "
            f"{_fmt((theirs or {}).get('peak_rss_gib'), '.2f') if first else '':>6}",
            flush=True,
        )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(*sys.argv[2:5], int(sys.argv[5]))
    else:
        main()
