"""What a newcomer types: ``-t all``, exit codes of bad usage, ``--debug`` anywhere,
``czb report`` with no argument, help texts that say the truth."""

from __future__ import annotations

import pytest
from conftest import assert_clean_exit, assert_clean_failure, invoke

from czb.core.records import read_result

TINY = ["--dataset", "synthetic_cells_tiny", "--seeds", "0", "--n-jobs", "1"]


def test_tasks_all_on_one_dataset_skips_what_needs_two_and_says_so_once(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "-m", "random", "-t", "all", *TINY, "--no-baseline", "--output-dir", out)
    assert_clean_exit(result, 0)
    said = [line for line in result.stderr.splitlines() if line.startswith("warning: tasks 'all'")]
    assert len(said) == 1, result.stderr
    assert "cross_species_integration" in said[0] and "two or more datasets" in " ".join(result.stderr.split())
    tasks = {read_result(p).task.name for p in (out / "results").glob("*.json")}
    assert {"clustering", "embedding", "label_prediction", "batch_integration"} <= tasks
    assert not {t for t in tasks if t.startswith(("cross_species", "perturbation_expression", "perturbation_masked"))}


@pytest.mark.parametrize("args", [
    ["run", "-m", "random", "-t", "cross_species_integration", *TINY],  # a task over datasets, one given
    ["run", "-t", "clustering", *TINY],  # nothing to score
    ["run", "-m", "random", "-t", "clustering", *TINY[:2], "--seeds", "abc"],
    ["run", "-m", "random", "-t", "clustering", "-d", "synthetic_cells_tiny", "-d", "pbmc68k_reduced",
     "--embedding", "x.npy"],  # one file, two datasets
])
def test_bad_usage_exits_2(tmp_path, args):
    (tmp_path / "x.npy").write_bytes(b"")
    args = [tmp_path / "x.npy" if a == "x.npy" else a for a in args]
    assert_clean_failure(invoke(*args, "--output-dir", tmp_path / "out"), 2, usage=True)


@pytest.mark.parametrize("command", [
    ["run", "-m", "no_such_model", "-t", "clustering", *TINY],
    ["list", "no_such_kind"],
    ["report", "no/such/folder"],
    ["datasets", "fetch", "no_such_dataset"],
    ["bench", "no_such_suite"],
    ["models", "fetch-weights", "no_such_model"],
])
def test_debug_is_accepted_after_the_command(tmp_path, command):
    result = invoke(*command, "--debug")
    assert "No such option" not in result.output
    assert result.exit_code != 0


def test_debug_after_the_command_shows_the_traceback():
    result = invoke("run", "-m", "no_such_model", "-t", "clustering", *TINY, "--debug")
    assert result.exception is not None and not isinstance(result.exception, SystemExit)


def test_report_without_arguments_reads_the_default_output_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CZB_OUTPUT_DIR")  # the default, as a newcomer has it
    assert_clean_exit(invoke("run", "-m", "random", "-t", "embedding", *TINY, "--no-baseline"), 0)
    assert list((tmp_path / "czb-results" / "results").glob("*.json"))
    result = invoke("report", "--format", "table")
    assert_clean_exit(result, 0)
    assert "random" in result.stdout


def test_run_help_states_the_exact_size_rules_czb_uses():
    from czb.evaluation import neighbors
    from czb.evaluation.metrics import silhouette

    text = " ".join(invoke("run", "--help", env={"COLUMNS": "200"}).stdout.split())
    assert f"{neighbors.EXACT_MAX_CELLS // 1000}k cells (graph)" in text
    assert f"{silhouette.EXACT_MAX_CELLS // 1000}k cells (silhouettes)" in text
    assert "./czb-results" in text


def test_bench_dry_run_plans_from_the_specs_alone(tmp_path):
    """A dataset not downloaded yet is not fetched by a dry run: its units are shown as
    to be resolved (the URL below refuses connections, so a fetch would fail)."""
    spec = tmp_path / "suite.yaml"
    spec.write_text(
        "datasets:\n  far_away:\n    uri: http://127.0.0.1:9/cells.h5ad\n    organism: human\n"
        "    label_key: cell_type\n"
        "suites:\n  remote:\n    models: [random]\n    datasets: [far_away, synthetic_cells_tiny]\n"
        "    tasks: [embedding]\n    seeds: [0]\n")
    result = invoke("bench", spec, "--store", tmp_path / "store", "--dry-run")
    assert_clean_exit(result, 0)
    lines = result.stdout.splitlines()
    assert any("far_away/random: embedding" in line and line.endswith("(to be resolved)") for line in lines)
    assert any(line.startswith("todo") and "synthetic_cells_tiny/random: embedding" in line
               and "to be resolved" not in line for line in lines)
