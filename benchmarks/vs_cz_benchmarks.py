"""czb vs cz-benchmarks 0.15.1 on held-out data, per task, idle and oversubscribed (issue 22).

Usage::

    # once: cz-benchmarks in its own virtual environment (pulls torch; not committed)
    # (pynndescent 0.7 returns sparse arrays, which scanpy 1.11's neighbors cannot read)
    python3 -m venv .venvs/czbenchmarks && .venvs/czbenchmarks/bin/pip install cz-benchmarks==0.15.1 "pynndescent<0.6"
    .venv/bin/python benchmarks/vs_cz_benchmarks.py --czbenchmarks-python .venvs/czbenchmarks/bin/python \\
        [--sizes 10000 50000 200000] [--conditions idle loaded] [--load 2] \\
        [--data-dir heldout-data] [--out vs-cz-benchmarks.json] \\
        [--tools czb czbenchmarks] [--reuse earlier.json ...]

For each size, held-out data are generated once by ``benchmarks/heldout_data.py`` (30
Zipf-sized types in 8 lineages, 6 batches, heavy-tailed anisotropic 50-d embedding, raw
counts; not czb's generator). Then, for each load condition and each cell-level task czb
runs by default (clustering, embedding, label_prediction, batch_integration,
sequential_organization), one fresh process per tool and task runs
``benchmarks/_workers.py``: czb through its public API (``czb.evaluate``, default task
parameters, seeds 0,1,2 and all cores as ``czb run``), cz-benchmarks through its task
classes (default parameters and seed). Its wall time is measured here, around
``subprocess.run``, so it includes interpreter start, imports and data loading (the
worker also reports how much of it went to each). Finally czb's four ``czb run`` default
tasks run in one process (shared graph) and are compared with the sum of cz-benchmarks'
four per-task processes under the same load.

Load conditions: ``idle`` (nothing started by this script) and ``loaded`` (``--load``
busy-looping processes, started before each measured process and stopped after it, for
both tools alike). The 1-minute load average before each run is recorded, since an
"idle" run on a shared machine is only as idle as the machine.

cz-benchmarks' side does not change when czb does: ``--tools czb --reuse earlier.json``
measures czb only and takes cz-benchmarks' measurements (same size, condition, task,
data seed and load) from earlier output files, so a table can be rebuilt after a czb
change without hours of cz-benchmarks runs. Reused rows say so (``reused_from``).

Values: every metric the two tools both report is matched by name (:data:`METRIC_MAP`,
printed first) and compared: czb's mean over its seeds against cz-benchmarks' value at
its seed, within the tolerance of the metric's kind (:data:`TOLERANCE`). czb's values
in the four-task process are also compared with its one-task processes (a task's value
must not depend on which tasks run beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from heldout_data import write_heldout

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_workers.py"
CELL_TASKS = ("clustering", "embedding", "label_prediction", "batch_integration", "sequential_organization")
#: ``czb run``'s default tasks (czb.api.DEFAULT_TASKS), run together in one process.
TOGETHER = ("clustering", "embedding", "label_prediction", "batch_integration")
#: ``czb run``'s default seeds.
CZB_SEEDS = (0, 1, 2)

#: Tolerance of each kind of metric (issue 22): deterministic values must agree to 1e-3;
#: values from a kNN graph or Leiden partition (ARI, NMI, entropy, sequential alignment)
#: within 0.05; cross-validated scores depend on the fold split, which each tool draws from
#: its own seed (czb: 0,1,2; cz-benchmarks: 42), so they get the graph tolerance too.
TOLERANCE = {"deterministic": 1e-3, "graph": 0.05, "cross-validated": 0.05}

_CLASSIFIERS = ("lr", "knn", "rf", "MEAN(knn,lr,rf)")
_SCORES = ("accuracy", "f1", "precision", "recall", "auroc")
#: czb's metric key -> (cz-benchmarks' metric key, kind). Keys are ``task:metric`` with
#: ``[classifier]`` for label prediction (see _workers.metric_key). czb's extra metrics
#: (scIB sweep, iLISI, cLISI, kBET, ...) have no cz-benchmarks counterpart and are not compared.
METRIC_MAP: dict[str, tuple[str, str]] = {
    "clustering:adjusted_rand_index": ("clustering:adjusted_rand_index", "graph"),
    "clustering:normalized_mutual_info": ("clustering:normalized_mutual_info", "graph"),
    "embedding:silhouette_score": ("embedding:silhouette_score", "deterministic"),
    **{
        f"label_prediction:mean_fold_{s}[{c}]": (f"label_prediction:mean_fold_{s}[{c}]", "cross-validated")
        for s in _SCORES
        for c in _CLASSIFIERS
    },
    "batch_integration:entropy_per_cell": ("batch_integration:entropy_per_cell", "graph"),
    "batch_integration:batch_silhouette": ("batch_integration:batch_silhouette", "deterministic"),
    "sequential_organization:silhouette_score": ("sequential_organization:silhouette_score", "deterministic"),
    "sequential_organization:sequential_alignment": ("sequential_organization:sequential_alignment", "graph"),
}


# --------------------------------------------------------------------------- measuring


class Load:
    """``n`` busy-looping processes while the ``with`` block runs (none for ``n = 0``)."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> Load:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        if self.procs:
            time.sleep(1.0)  # let them reach the CPU before the measured process starts
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs = []


def run_worker(python: str, tool: str, task: str, data: tuple[Path, Path], *, seeds: tuple[int, ...], load: int,
               timeout: float, labels_as: str = "obs") -> dict:
    """One measured process: wall seconds (from here, imports included) and what it reported."""
    cmd = [python, str(WORKER), tool, task, str(data[0].resolve()), str(data[1].resolve()), ",".join(map(str, seeds)),
           labels_as]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with Load(load):
        before = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
        except subprocess.TimeoutExpired:
            return {"seconds": None, "timeout": timeout, "loadavg_before": before, "metrics": {}}
        seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"seconds": seconds, "error": " | ".join(tail), "loadavg_before": before, "metrics": {}}
    return {"seconds": seconds, "loadavg_before": before, **json.loads(lines[-1].removeprefix("RESULT "))}


def measure(python: str, tool: str, task: str, data: tuple[Path, Path], *, repeats: int, **kw) -> dict:
    """``repeats`` runs; the median wall time, the values of the first run, every time kept."""
    runs = [run_worker(python, tool, task, data, **kw) for _ in range(repeats)]
    first = dict(runs[0])
    times = [r["seconds"] for r in runs]
    first["all_seconds"] = times
    first["seconds"] = None if None in times else statistics.median(times)
    return first


def reusable(files: list[Path], *, data_seed: int, load: int) -> dict[tuple, dict]:
    """Measurements in earlier output files, by (tool, cells, condition, task); later files win.

    Only runs on the same held-out data (data seed) and, for the loaded condition, the same
    number of busy processes are taken.
    """
    found: dict[tuple, dict] = {}
    for path in files:
        earlier = json.loads(path.read_text())
        config = earlier.get("config", {})
        if config.get("data_seed") != data_seed:
            continue
        for row in earlier.get("rows", []):
            if row["condition"] == "loaded" and row.get("load_processes") != load:
                continue
            task = "together" if row["task"].startswith("four tasks") else row["task"]
            for tool in ("czb", "czbenchmarks"):
                measured = row.get(tool)
                if measured and (tool, task) != ("czbenchmarks", "together"):  # theirs is a sum there
                    origin = measured.get("reused_from", str(path))
                    found[(tool, row["cells"], row["condition"], task)] = {**measured, "reused_from": origin}
    return found


# --------------------------------------------------------------------------- comparing


def mean_value(per_seed: dict[str, float]) -> float:
    return sum(per_seed.values()) / len(per_seed)


def agreement(czb: dict, theirs: dict) -> list[dict]:
    """Each metric both report: czb's seed mean, spread and cz-benchmarks' value, |diff|, within tolerance."""
    out = []
    for ours_key, (their_key, kind) in METRIC_MAP.items():
        a, b = czb.get("metrics", {}).get(ours_key), theirs.get("metrics", {}).get(their_key)
        if a is None or b is None:
            continue
        ours, value = mean_value(a), mean_value(b)
        diff = abs(ours - value)
        out.append({"czb_metric": ours_key, "czbenchmarks_metric": their_key, "kind": kind, "czb": ours,
                    "czb_seed_range": [min(a.values()), max(a.values())], "czbenchmarks": value, "abs_diff": diff,
                    "tolerance": TOLERANCE[kind], "within": diff <= TOLERANCE[kind]})
    return out


def together_vs_alone(together: dict, alone: dict[str, dict]) -> list[dict]:
    """czb's values in the four-task process against its one-task processes, per seed."""
    out = []
    for key, per_seed in together.get("metrics", {}).items():
        single = alone.get(key.split(":", 1)[0], {}).get("metrics", {}).get(key)
        if single is None:
            continue
        diff = max(abs(per_seed[s] - single[s]) for s in per_seed if s in single)
        out.append({"metric": key, "max_abs_diff": diff})
    return out


# --------------------------------------------------------------------------- printing


def _s(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _time(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("seconds") is None:
        return f">{r['timeout']:.0f}" if "timeout" in r else "-"
    return f"{r['seconds']:.1f}" + ("!" if r.get("error") or r.get("errors") else "")


def _speedup(ours: dict | None, theirs: dict | None) -> str:
    if not ours or not theirs or not ours.get("seconds"):
        return "-"
    if theirs.get("seconds") is None:
        return f">{theirs['timeout'] / ours['seconds']:.1f}x" if "timeout" in theirs else "-"
    return f"{theirs['seconds'] / ours['seconds']:.1f}x"


def _agreement_text(rows: list[dict]) -> str:
    if not rows:
        return "-"
    worst = max(rows, key=lambda r: r["abs_diff"] / r["tolerance"])
    bad = [r for r in rows if not r["within"]]
    name = worst["czb_metric"].split(":", 1)[1]
    verdict = "ok" if not bad else f"{len(bad)}/{len(rows)} OUT"
    return f"{verdict}; worst {name} {worst['abs_diff']:.1e} (tol {worst['tolerance']:g})"


HEADER = ("| cells | task | czb s | cz-benchmarks s | speed-up | load condition | loadavg | value agreement |\n"
          "|---|---|---|---|---|---|---|---|")


def print_mapping() -> None:
    print("Metric mapping (czb -> cz-benchmarks, kind, tolerance); label prediction: every score x classifier")
    print("| czb | cz-benchmarks | kind | tolerance |\n|---|---|---|---|")
    generic = "label_prediction:mean_fold_<score>[<classifier>]"
    shown = set()
    for ours, (theirs, kind) in METRIC_MAP.items():
        if ours.startswith("label_prediction:"):
            ours = theirs = generic
        if ours not in shown:
            shown.add(ours)
            print(f"| {ours} | {theirs} | {kind} | {TOLERANCE[kind]:g} |")
    print(f"(<score>: {', '.join(_SCORES)}; <classifier>: {', '.join(_CLASSIFIERS)})\n", flush=True)


def print_row(row: dict) -> None:
    ours, theirs = row.get("czb"), row.get("czbenchmarks")
    print(f"| {row['cells']} | {row['task']} | {_time(ours)} | {_time(theirs)} | {_speedup(ours, theirs)} | "
          f"{row['condition']} | {_s((ours or theirs or {}).get('loadavg_before'))} | {_agreement_text(row['agreement'])} |",
          flush=True)
    for who, r in (("czb", ours), ("cz-benchmarks", theirs)):
        if r and (r.get("error") or r.get("errors")):
            print(f"|  |  | {who} error: {r.get('error') or r.get('errors')} |", flush=True)


def print_details(rows: list[dict]) -> None:
    print("\nValues (czb: mean over seeds, [min, max]; cz-benchmarks: its seed)")
    print("| cells | load condition | metric | czb | czb seeds | cz-benchmarks | abs diff | tol | within |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for a in row["agreement"]:
            lo, hi = a["czb_seed_range"]
            print(f"| {row['cells']} | {row['condition']} | {a['czb_metric']} | {a['czb']:.4f} | [{lo:.4f}, {hi:.4f}] "
                  f"| {a['czbenchmarks']:.4f} | {a['abs_diff']:.1e} | {a['tolerance']:g} | "
                  f"{'yes' if a['within'] else 'NO'} |")


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 50_000, 200_000])
    parser.add_argument("--tasks", nargs="+", default=list(CELL_TASKS), choices=CELL_TASKS)
    parser.add_argument("--conditions", nargs="+", default=["idle", "loaded"], choices=["idle", "loaded"])
    parser.add_argument("--load", type=int, default=2, help="busy processes of the 'loaded' condition")
    parser.add_argument("--czbenchmarks-python",
                        help="python of a virtual environment with cz-benchmarks 0.15.1")
    parser.add_argument("--czb-python", default=sys.executable, help="python with czb installed [this one]")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(CZB_SEEDS), help="czb's seeds [czb run's]")
    parser.add_argument("--czbenchmarks-labels", choices=["obs", "arrays"], default="obs",
                        help="pass cz-benchmarks the obs columns (categoricals, as its datasets do) "
                        "or plain string arrays")
    parser.add_argument("--no-together", action="store_true", help="skip czb's four tasks in one process")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement (median time)")
    parser.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per process")
    parser.add_argument("--data-dir", type=Path, default=Path("heldout-data"))
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("vs-cz-benchmarks.json"))
    parser.add_argument("--tools", nargs="+", default=["czb", "czbenchmarks"], choices=["czb", "czbenchmarks"],
                        help="tools to measure now; the other's measurements come from --reuse")
    parser.add_argument("--reuse", nargs="*", type=Path, default=[],
                        help="earlier output files whose measurements of the tools not in --tools are reused")
    args = parser.parse_args()
    if args.czbenchmarks_python is None and "czbenchmarks" in args.tools:
        parser.error("--czbenchmarks-python is needed to measure cz-benchmarks")
    earlier = reusable(args.reuse, data_seed=args.data_seed, load=args.load)

    config = {**json.loads(json.dumps(vars(args), default=str)),
              "cpus": os.cpu_count(), "platform": platform.platform()}
    print_mapping()
    print(HEADER, flush=True)
    rows: list[dict] = []
    result = {"config": config, "metric_map": METRIC_MAP, "tolerance": TOLERANCE, "rows": rows}

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1))

    for n in args.sizes:
        data = write_heldout(n, args.data_dir, seed=args.data_seed)
        for condition in args.conditions:
            kw = {"seeds": tuple(args.seeds), "load": args.load if condition == "loaded" else 0,
                  "timeout": args.timeout, "repeats": args.repeats, "labels_as": args.czbenchmarks_labels}
            alone: dict[str, dict] = {}
            theirs_by_task: dict[str, dict] = {}
            def get(tool: str, task: str) -> dict | None:
                if tool in args.tools:
                    python = args.czb_python if tool == "czb" else args.czbenchmarks_python
                    return measure(python, tool, task, data, **kw)
                return earlier.get((tool, n, condition, task))

            for task in args.tasks:
                ours, theirs = get("czb", task), get("czbenchmarks", task)
                alone[task], theirs_by_task[task] = ours, theirs
                row = {"cells": n, "task": task, "condition": condition, "load_processes": kw["load"],
                       "czb": ours, "czbenchmarks": theirs, "agreement": agreement(ours or {}, theirs or {})}
                rows.append(row)
                print_row(row)
                save()
            if args.no_together:
                continue
            together = get("czb", "together")
            parts = [theirs_by_task.get(t) for t in TOGETHER]
            summed = None
            if all(p is not None for p in parts):
                if all(p.get("seconds") is not None for p in parts):
                    summed = {"seconds": sum(p["seconds"] for p in parts)}
                else:  # a timed-out part: the sum is at least the parts' limits
                    summed = {"seconds": None, "timeout": sum(p.get("seconds") or p["timeout"] for p in parts)}
            merged = {"metrics": {k: v for p in parts if p for k, v in p.get("metrics", {}).items()}}
            row = {"cells": n, "task": "four tasks, one process (vs sum of four)", "condition": condition,
                   "load_processes": kw["load"], "czb": together, "czbenchmarks": summed,
                   "agreement": agreement(together or {}, merged),
                   "together_vs_alone": together_vs_alone(together or {}, alone)}
            rows.append(row)
            print_row(row)
            moved = [d for d in row["together_vs_alone"] if d["max_abs_diff"] > 0]
            if moved:
                worst = max(moved, key=lambda d: d["max_abs_diff"])
                print(f"|  |  | czb together vs alone: {len(moved)} values differ; worst {worst['metric']} "
                      f"{worst['max_abs_diff']:.2e} |", flush=True)
            save()
    print_details(rows)
    save()
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
