"""Golden outputs: the values and statuses of a fixed set of runs, one per task family.

Recorded before the package was reorganised (issue 18) so that moving code cannot move a
number: every record's status, metrics, parameters, values and per-seed values must
come out as stored in ``tests/data/golden.json``. On the machine that recorded them they
are equal to the bit; they are compared to 1e-6 relative (1e-9 absolute) because the
float32 distance kernels move iLISI by ~1e-8 with the number of BLAS threads. (Logistic
regression stopped at scikit-learn's iteration cap moves by ~1e-5 with the thread count:
record and compare on machines with the same number of cores until its threads are
pinned.)

Regenerate only when a change of values is intended, and say so in the commit:
``CZB_WRITE_GOLDEN=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from czb.cli import app
from czb.runner.results import read_result

GOLDEN = Path(__file__).parent / "data" / "golden.json"
OFFLINE = ["--offline", "--n-jobs", "2"]

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
    result = CliRunner().invoke(app, [*args, *where, *OFFLINE[:1], *([] if args[0] == "bench" else OFFLINE[1:])])
    assert result.exit_code == 0, result.output
    folder = out / "results" if args[0] == "bench" else out
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
