"""Golden outputs: the values and statuses of a fixed set of runs, one per task family.

Recorded before the package was reorganised (issue 18) so that moving code cannot move a
number: every record's status, metrics, parameters, values and per-seed values must
come out as stored in ``tests/fixtures/golden.json``.

Floating point differs between CPUs: OpenBLAS and numpy pick kernels by instruction set
(AVX2, AVX-512) and thread count, and a last-bit change in a PCA coordinate can move a
random-forest split or a near-tied DE-gene rank. Each run therefore goes through ``czb`` in
a subprocess with the numerics pinned (:data:`PINNED_NUMERICS`: OpenBLAS's Haswell kernels
on one thread, numpy's dispatch capped at AVX2, faiss's AVX2 build), which every x86-64-v3
CPU computes alike. Values are compared to 1e-6 relative (1e-9 absolute).

Regenerate only when a change of values is intended, and say so in the commit:
``CZB_WRITE_GOLDEN=1 python -m pytest tests/pipeline/test_golden.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from czb.core.records import read_result

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden.json"
OFFLINE = ["--offline", "--n-jobs", "2"]

#: Environment that makes the runs' floating point the same on every x86-64-v3 CPU.
PINNED_NUMERICS = {
    "OPENBLAS_CORETYPE": "Haswell",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "FAISS_OPT_LEVEL": "avx2",
}

#: name -> the command line of one run (``czb run`` gets ``--output-dir``; ``czb bench`` a store).
RUNS: dict[str, list[str]] = {
    "cell_tasks_pbmc68k": [
        "run", "-m", "pca", "-m", "random", "-t", "clustering", "-t", "embedding",
        "-t", "label_prediction", "-t", "batch_integration", "-d", "pbmc68k_reduced",
        "--seeds", "0,1", "--no-baseline",
    ],
    "cell_tasks_synthetic": [
        "run", "-m", "random", "-t", "clustering", "-t", "embedding", "-t", "label_prediction",
        "-t", "batch_integration", "-t", "sequential_organization", "-d", "synthetic_cells_tiny",
        "--seeds", "0,1",
    ],
    "cross_species": [
        "run", "-m", "random", "-t", "cross_species_integration", "-t", "cross_species_label_prediction",
        "-d", "synthetic_species_human", "-d", "synthetic_species_mouse", "--seeds", "0",
    ],
    "perturbation_prediction": [
        "run", "-m", "additive_linear", "-t", "perturbation_expression_shift",
        "-t", "perturbation_masked_gene", "-d", "synthetic_perturbations", "--seeds", "0",
    ],
    "perturbation_hierarchy": [
        "run", "-m", "pca", "-m", "random", "-t", "perturbation_hierarchy", "-d", "synthetic_screen_tiny",
        "--seeds", "0", "--no-baseline",
    ],
    "bench_smoke": ["bench", "smoke"],
}


def _summary(record) -> dict:
    """What must not change: identity, status, and every metric with its values."""
    return {
        "dataset": record.dataset.name,
        "model": record.model.name,
        "task": record.task.name,
        "status": record.status,
        "seeds": list(record.seeds),
        "metrics": sorted(
            (
                {
                    "name": m.name,
                    "params": json.loads(json.dumps(m.params, sort_keys=True, default=str)),
                    "value": m.value,
                    "values_raw": list(m.values_raw),
                }
                for m in record.metrics
            ),
            key=lambda m: (m["name"], json.dumps(m["params"], sort_keys=True)),
        ),
    }


def _run(name: str, tmp_path: Path) -> list[dict]:
    args = RUNS[name]
    out = tmp_path / name
    where = ["--store", str(out)] if args[0] == "bench" else ["--output-dir", str(out)]
    command = [sys.executable, "-m", "czb", *args, *where, *OFFLINE[:1], *([] if args[0] == "bench" else OFFLINE[1:])]
    env = {**os.environ, **PINNED_NUMERICS}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = out / "results"
    records = [_summary(read_result(p)) for p in sorted(folder.glob("*.json"))]
    assert records, f"{name}: no records"
    return sorted(records, key=lambda r: (r["dataset"], r["model"], r["task"]))


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _compare(name: str, got: list[dict], want: list[dict]) -> None:
    keys = lambda rs: [(r["dataset"], r["model"], r["task"]) for r in rs]  # noqa: E731
    assert keys(got) == keys(want), f"{name}: other records"
    for g, w in zip(got, want):
        where = f"{name}: {g['dataset']}/{g['model']}/{g['task']}"
        assert (g["status"], g["seeds"]) == (w["status"], w["seeds"]), where
        assert [(m["name"], m["params"]) for m in g["metrics"]] == [
            (m["name"], m["params"]) for m in w["metrics"]
        ], f"{where}: other metrics"
        for gm, wm in zip(g["metrics"], w["metrics"]):
            label = f"{where}: {gm['name']} {gm['params']}"
            assert _close(gm["value"], wm["value"]), (label, gm["value"], wm["value"])
            assert len(gm["values_raw"]) == len(wm["values_raw"]), label
            assert all(_close(x, y) for x, y in zip(gm["values_raw"], wm["values_raw"])), label


@pytest.fixture(scope="module")
def golden() -> dict:
    if os.environ.get("CZB_WRITE_GOLDEN"):
        return {}
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_runs_reproduce_their_golden_outputs(name, golden, tmp_path):
    got = _run(name, tmp_path)
    if os.environ.get("CZB_WRITE_GOLDEN"):
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        stored[name] = got
        GOLDEN.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote the golden outputs of {name}")
    _compare(name, got, golden[name])
