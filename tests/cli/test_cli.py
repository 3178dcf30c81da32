"""Tests of the ``czb`` command line (czb.cli), end to end on the offline fixtures.

Runs use ``synthetic_cells_tiny`` (300 cells), one seed and one job wherever the
behaviour under test allows, so the whole file takes seconds.

With click >= 8.2, ``CliRunner`` always keeps stdout and stderr apart
(``result.stdout`` / ``result.stderr``; ``result.output`` interleaves both), so
``--format json`` output is checked to parse from stdout alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, invoke

import czb
from czb.core.errors import EmbeddingError
from czb.core.records import read_result

TINY = ["--dataset", "synthetic_cells_tiny", "--seeds", "0", "--n-jobs", "1"]
TINY_CELLS = 300

SCHEMA_FIELDS = {
    "schema_version", "czb_version", "created_at", "command", "host", "dataset", "model", "task",
    "seeds", "status", "error", "metrics", "runtime_s", "embedding_runtime_s", "peak_memory_mb", "computation",
    "embedding_sample",
}


def json_stdout(result):
    """The JSON printed on stdout; fails with the whole output if it does not parse."""
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError as e:
        pytest.fail(f"stdout is not JSON ({e}):\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")


def results_in(folder: Path) -> list:
    return [read_result(p) for p in sorted((folder / "results").glob("*.json"))]


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception


def write_spec(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- version, lazy imports

HEAVY = ("scanpy", "sklearn", "anndata", "scipy", "pandas", "numpy", "czb.pipeline.run")


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"czb {czb.__version__}\n"
    assert czb.__version__ == "0.1.0"
    assert result.stdout == "czb 0.1.0\n"


def test_cli_import_and_version_are_lazy():
    code = (
        "import json, sys\n"
        "import czb.cli\n"
        "after_import = sorted(m for m in sys.modules if m in HEAVY)\n"
        "sys.argv = ['czb', '--version']\n"
        "try:\n"
        "    czb.cli.main()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print(json.dumps([after_import, sorted(m for m in sys.modules if m in HEAVY), code]))\n"
    ).replace("HEAVY", repr(HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    after_import, after_version, exit_code = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after_import == [], f"import czb.cli pulled in {after_import}"
    assert after_version == [], f"czb --version pulled in {after_version}"
    assert exit_code in (0, None)
    assert "czb 0.1.0" in proc.stdout


def test_python_m_czb_version():
    proc = subprocess.run([sys.executable, "-m", "czb", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "czb 0.1.0\n"


def test_no_arguments_shows_help():
    result = invoke()
    assert result.exit_code in (0, 2)  # click's no_args_is_help exit code changed across versions
    assert "Usage" in result.output and "run" in result.output


# ----------------------------------------------------------------------------- list

FIXTURES = {"pbmc68k_reduced", "synthetic_cells", "synthetic_cells_tiny",
            "synthetic_cells_no_batch_effect", "synthetic_cells_strong_batch"}


def test_list_datasets_json():
    result = invoke("list", "datasets", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json_stdout(result)
    names = [r["name"] for r in rows]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert FIXTURES <= set(names)
    assert {"tsv2_blood", "tsv2_bladder", "tsv2_lung", "human_spermatogenesis",
            "allen_soundlife_immune_variation", "replogle_k562_essential_perturbpredict"} <= set(names)
    cz = [r for r in rows if "fixture" not in r["tags"]]
    assert len(cz) >= 38, [r["name"] for r in cz]
    assert len(rows) >= 38 + len(FIXTURES)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name["tsv2_blood"]) == {"name", "organism", "label_key", "batch_key", "uri", "tags",
                                          "description"}
    assert by_name["tsv2_blood"]["uri"].startswith("s3://cz-benchmarks-data/")
    assert by_name["pbmc68k_reduced"]["batch_key"] is None
    assert by_name["synthetic_cells_tiny"]["batch_key"] == "batch"


def test_list_datasets_table():
    result = invoke("list", "datasets")
    assert result.exit_code == 0, result.output
    assert "datasets" in result.stdout and "pbmc68k" in result.stdout


def test_list_models():
    result = invoke("list", "models", "--format", "json")
    assert result.exit_code == 0, result.output
    models = {r["name"]: r for r in json_stdout(result)}
    assert {"pca", "pca_raw", "random"} <= set(models)
    assert models["pca"]["kind"] == "baseline" and models["pca"]["output_dim"] == 50
    table = invoke("list", "models")
    assert table.exit_code == 0 and "pca_raw" in table.stdout


def test_list_tasks_json_lists_metrics():
    result = invoke("list", "tasks", "--format", "json")
    assert result.exit_code == 0, result.output
    tasks = {r["name"]: r for r in json_stdout(result)}
    assert {"clustering", "embedding", "label_prediction", "batch_integration"} <= set(tasks)
    for name, row in tasks.items():
        assert row["metrics"], f"task {name} lists no metrics"
        assert all(isinstance(m, str) and m for m in row["metrics"])
    assert {"adjusted_rand_index", "normalized_mutual_info"} <= set(tasks["clustering"]["metrics"])
    assert "batch" in tasks["batch_integration"]["requires"]
    assert tasks["clustering"]["parameters"]["n_neighbors"] == 15
    # Every metric with the reference whose definition it follows.
    for name, row in tasks.items():
        assert set(row["references"]) == set(row["metrics"]) and all(row["references"].values()), name
    # What a task computes beyond the benchmark it follows is said with its cost.
    assert "Leiden" in tasks["clustering"]["cost"] and "seed" in tasks["label_prediction"]["cost"]
    assert tasks["embedding"]["cost"] == ""
    table = invoke("list", "tasks")
    assert "cost: scIB's resolution sweep" in " ".join(table.output.split())
    assert tasks["batch_integration"]["references"]["kbet_per_label"].startswith("doi:")


def test_list_unknown_kind_exits_2():
    result = invoke("list", "modles")
    assert result.exit_code == 2
    assert "modles" in result.output


# ----------------------------------------------------------------------------- run: acceptance


def test_acceptance_pca_clustering_pbmc68k(tmp_path, monkeypatch):
    out = tmp_path / "OUT"
    args = ["run", "--model", "pca", "--task", "clustering", "--dataset", "pbmc68k_reduced",
            "--output-dir", str(out), "--offline"]
    monkeypatch.setattr(sys, "argv", ["czb", *args])  # what the console script would see
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert_no_traceback(result)
    assert f"results written to {out / 'results'}" in result.stderr.replace("\n", "")

    (path,) = (out / "results").glob("*.json")
    data = json.loads(path.read_text())
    assert set(data) == SCHEMA_FIELDS
    assert data["schema_version"] == 1
    assert data["czb_version"] == "0.1.0"
    assert data["created_at"].endswith("+00:00")
    assert data["command"] == "czb " + " ".join(args)
    assert set(data["host"]) == {"python", "platform", "n_threads"}
    assert data["status"] == "ok" and data["error"] is None
    assert data["seeds"] == [0, 1, 2]
    ds = data["dataset"]
    assert ds["name"] == "pbmc68k_reduced"
    assert len(ds["sha256"]) == 64 and int(ds["sha256"], 16) >= 0
    assert (ds["n_cells"], ds["n_genes"]) == (700, 765)
    assert data["model"]["name"] == "pca"
    assert data["model"]["kind"] == "in-process"
    assert data["model"]["image_digest"] == "in-process"
    assert data["task"]["name"] == "clustering" and data["task"]["implementation"] == "clustering"
    assert data["runtime_s"] > 0 and data["embedding_runtime_s"] > 0
    assert data["peak_memory_mb"] >= 0
    metrics = {m["name"]: m for m in data["metrics"]}
    for name in ("adjusted_rand_index", "normalized_mutual_info"):
        m = metrics[name]
        assert len(m["values_raw"]) == 3
        assert all(isinstance(v, float) and -1 <= v <= 1 for v in m["values_raw"])
        assert m["value"] == pytest.approx(float(np.mean(m["values_raw"])))
        assert m["value_std_dev"] == pytest.approx(float(np.std(m["values_raw"], ddof=1)), abs=1e-12)
        assert m["value"] > 0.3  # PCA recovers the sorted PBMC types far better than chance
    assert read_result(path).status == "ok"


# ----------------------------------------------------------------------------- run: json, baseline


def test_run_json_adds_pca_baseline(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", "random", "--task", "embedding", *TINY,
                    "--output-dir", out, "--format", "json")
    assert result.exit_code == 0, result.output
    records = json_stdout(result)  # stdout alone; progress and warnings went to stderr
    assert [(r["model"]["name"], r["task"]["name"], r["status"]) for r in records] == [
        ("random", "embedding", "ok"), ("pca", "embedding", "ok"),
    ]
    assert all(r["dataset"]["n_cells"] == TINY_CELLS and r["seeds"] == [0] for r in records)
    assert all(set(r) == SCHEMA_FIELDS for r in records)
    on_disk = results_in(out)
    assert sorted(r.model.name for r in on_disk) == ["pca", "random"]
    assert {r.model.name: r.model_dump(mode="json") for r in on_disk} == {
        r["model"]["name"]: r for r in records
    }


def test_run_no_baseline(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", "random", "--task", "embedding", *TINY,
                    "--output-dir", out, "--format", "json", "--no-baseline")
    assert result.exit_code == 0, result.output
    assert [r["model"]["name"] for r in json_stdout(result)] == ["random"]
    assert [r.model.name for r in results_in(out)] == ["random"]


def test_run_table_shows_difference_to_pca(tmp_path):
    result = invoke("run", "--model", "random", "--task", "embedding", *TINY, "--output-dir", tmp_path)
    assert result.exit_code == 0, result.output
    assert "Δ = model - pca" in result.stdout
    assert "random" in result.stdout and "pca" in result.stdout
    assert "-0." in result.stdout  # random's silhouette is below PCA's on planted types


def test_run_output_dir_defaults_to_czb_output_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CZB_OUTPUT_DIR", str(tmp_path / "from-env"))
    result = invoke("run", "--model", "random", "--task", "embedding", *TINY, "--no-baseline")
    assert result.exit_code == 0, result.output
    assert [r.model.name for r in results_in(tmp_path / "from-env")] == ["random"]


# ----------------------------------------------------------------------------- unknown names, bad usage


@pytest.mark.parametrize(
    ("option", "name", "kind", "suggestion"),
    [
        ("--model", "pcaa", "model", "pca"),
        ("--dataset", "pbmc68k_reduce", "dataset", "pbmc68k_reduced"),
        ("--task", "clusterng", "task", "clustering"),
    ],
)
def test_run_unknown_name_exits_2_with_suggestion(tmp_path, option, name, kind, suggestion):
    args = {"--model": "random", "--task": "embedding", "--dataset": "synthetic_cells_tiny"}
    args[option] = name
    flat = [x for pair in args.items() for x in pair]
    result = invoke("run", *flat, "--seeds", "0", "--output-dir", tmp_path / "out")
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert f"unknown {kind} {name!r}" in line
    assert repr(suggestion) in line
    assert_no_traceback(result)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_run_unknown_name_without_close_match_points_to_list():
    result = invoke("run", "--model", "zzzzzzzz", "--task", "embedding", *TINY)
    assert result.exit_code == 2
    assert "czb list models" in error_line(result)


def test_run_bad_seeds_is_one_line_error():
    result = invoke("run", "--model", "random", "--task", "embedding", "--dataset",
                    "synthetic_cells_tiny", "--seeds", "zero")
    assert result.exit_code == 2  # bad usage
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error:") and "--seeds" in ln]
    assert_no_traceback(result)


def test_run_without_task_is_an_error():
    result = invoke("run", "--model", "random", "--dataset", "synthetic_cells_tiny")
    assert result.exit_code != 0
    assert "--task" in error_line(result)


# ----------------------------------------------------------------------------- bring your own embedding


def _npy(tmp_path: Path, name: str, values: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, values)
    return path


def test_run_own_embedding(tmp_path):
    emb = _npy(tmp_path, "mine.npy", np.random.default_rng(0).normal(size=(TINY_CELLS, 8)))
    out = tmp_path / "out"
    result = invoke("run", "--embedding", emb, "--task", "embedding", *TINY, "--output-dir", out,
                    "--format", "json")
    assert result.exit_code == 0, result.output
    records = json_stdout(result)
    assert [(r["model"]["name"], r["status"]) for r in records] == [("file:mine.npy", "ok"), ("pca", "ok")]
    assert records[0]["model"]["kind"] == "file"
    assert records[0]["model"]["image_digest"] == "in-process"
    assert len(results_in(out)) == 2


def test_run_own_embedding_with_nan_fails(tmp_path):
    values = np.random.default_rng(0).normal(size=(TINY_CELLS, 8))
    values[7, 3] = np.nan
    emb = _npy(tmp_path, "nan.npy", values)
    out = tmp_path / "out"
    result = invoke("run", "--embedding", emb, "--task", "embedding", *TINY, "--no-baseline",
                    "--output-dir", out)
    assert result.exit_code == 1, result.output
    assert_no_traceback(result)
    (record,) = results_in(out)  # recorded as failed, not dropped
    assert record.status == "failed"
    assert "NaN" in record.error and "row indices 7" in record.error and str(emb) in record.error


def _nan_file_case(tmp_path: Path) -> tuple[list, str]:
    values = np.random.default_rng(0).normal(size=(TINY_CELLS, 8))
    values[7, 3] = np.nan
    emb = _npy(tmp_path, "nan.npy", values)
    return ["--embedding", emb], f"{emb}: 1 of {TINY_CELLS} rows have NaN or infinite values"


def _broken_model_case(tmp_path: Path) -> tuple[list, str]:
    write_spec(tmp_path / "cfg", "models.yaml",
               "models:\n  broken_pca: {kind: baseline, implementation: pca, parameters: {n_top_genes: 1}}\n")
    return (["--model", "broken_pca", "--config-dir", tmp_path / "cfg"],
            f"broken_pca: PCA needs at least 2 cells and 2 genes, got {TINY_CELLS} × 1")


@pytest.mark.parametrize("case", [_nan_file_case, _broken_model_case], ids=["nan-file", "broken-model"])
def test_failed_record_error_is_shown_on_one_line(tmp_path, case):
    args, message = case(tmp_path)
    result = invoke("run", *args, "--task", "embedding", *TINY, "--no-baseline",
                    "--output-dir", tmp_path / "out")
    assert result.exit_code == 1
    assert any(message in line for line in result.output.splitlines()), result.output


def test_run_own_embedding_wrong_row_count(tmp_path):
    emb = _npy(tmp_path, "short.npy", np.random.default_rng(0).normal(size=(TINY_CELLS - 1, 8)))
    result = invoke("run", "--embedding", emb, "--task", "embedding", *TINY, "--no-baseline",
                    "--output-dir", tmp_path / "out", "--format", "json")
    assert result.exit_code == 1, result.output
    (record,) = json_stdout(result)
    assert record["status"] == "failed"
    assert f"{TINY_CELLS - 1} rows" in record["error"] and f"has {TINY_CELLS} cells" in record["error"]
    assert_no_traceback(result)


def test_run_missing_embedding_file_is_one_line_error(tmp_path):
    result = invoke("run", "--embedding", tmp_path / "nope.npy", "--task", "embedding", *TINY)
    assert result.exit_code == 1
    assert "embedding file not found" in error_line(result)
    assert_no_traceback(result)


def test_debug_lets_the_exception_propagate(tmp_path):
    result = invoke("--debug", "run", "--embedding", tmp_path / "nope.npy", "--task", "embedding", *TINY)
    assert result.exit_code == 1
    assert isinstance(result.exception, EmbeddingError)
    assert result.exc_info is not None and result.exc_info[2] is not None  # a traceback
    # --debug does not stick to later invocations.
    again = invoke("run", "--embedding", tmp_path / "nope.npy", "--task", "embedding", *TINY)
    assert again.exit_code == 1 and not isinstance(again.exception, EmbeddingError)


def test_debug_propagates_unknown_name_too():
    result = invoke("--debug", "run", "--model", "pcaa", "--task", "embedding", *TINY)
    assert result.exception is not None and "pcaa" in str(result.exception)


def test_debug_shows_embedding_failure_traceback(tmp_path):
    values = np.zeros((TINY_CELLS, 4))
    values[0, 0] = np.nan
    emb = _npy(tmp_path, "nan.npy", values)
    result = invoke("--debug", "run", "--embedding", emb, "--task", "embedding", *TINY,
                    "--no-baseline", "--output-dir", tmp_path / "out")
    assert isinstance(result.exception, EmbeddingError) or "Traceback" in result.output


# ----------------------------------------------------------------------------- not applicable


def test_batch_integration_without_batch_key_is_not_applicable(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", "pca", "--task", "batch_integration", "--dataset", "pbmc68k_reduced",
                    "--seeds", "0", "--n-jobs", "1", "--offline", "--output-dir", out, "--format", "json")
    assert result.exit_code == 0, result.output
    (record,) = json_stdout(result)
    assert record["status"] == "not_applicable"
    assert "batch" in record["error"]
    assert record["metrics"] == []
    (on_disk,) = results_in(out)
    assert on_disk.status == "not_applicable" and on_disk.error == record["error"]
    assert on_disk.task.name == "batch_integration"


# ----------------------------------------------------------------------------- spec folders

OVERRIDE_PBMC = """\
datasets:
  pbmc68k_reduced:
    description: "my own pbmc68k"
    uri: builtin:scanpy/pbmc68k_reduced
    organism: human
    label_key: bulk_labels
    layer: raw
    expression: log_normalized
    gene_id_type: symbol
"""


def _descriptions(result) -> dict[str, str]:
    assert result.exit_code == 0, result.output
    return {r["name"]: r["description"] for r in json_stdout(result)}


def test_config_dir_overrides_bundled_entry(tmp_path):
    bundled = _descriptions(invoke("list", "datasets", "--format", "json"))
    write_spec(tmp_path / "cfg", "mine.yaml", OVERRIDE_PBMC)
    mine = _descriptions(invoke("list", "datasets", "--format", "json", "--config-dir", tmp_path / "cfg"))
    assert mine["pbmc68k_reduced"] == "my own pbmc68k" != bundled["pbmc68k_reduced"]
    assert set(mine) == set(bundled)  # replaced, nothing lost


def test_config_dir_entry_is_used_by_run(tmp_path):
    write_spec(tmp_path / "cfg", "tiny.yml", """\
datasets:
  synthetic_cells_tiny:
    uri: synthetic:planted_cells
    params: {n_cells: 120, n_genes: 200, n_cell_types: 3, n_batches: 2, seed: 1}
    organism: human
    label_key: cell_type
    batch_key: batch
""")
    result = invoke("run", "--model", "random", "--task", "embedding", *TINY, "--no-baseline",
                    "--config-dir", tmp_path / "cfg", "--output-dir", tmp_path / "out", "--format", "json")
    assert result.exit_code == 0, result.output
    (record,) = json_stdout(result)
    assert (record["dataset"]["n_cells"], record["dataset"]["n_genes"]) == (120, 200)


def test_czb_config_path_env(tmp_path, monkeypatch):
    write_spec(tmp_path / "env", "mine.yaml", OVERRIDE_PBMC)
    write_spec(tmp_path / "cli", "mine.yaml", OVERRIDE_PBMC.replace("my own pbmc68k", "from --config-dir"))
    monkeypatch.setenv("CZB_CONFIG_PATH", str(tmp_path / "env"))
    assert _descriptions(invoke("list", "datasets", "--format", "json"))["pbmc68k_reduced"] == "my own pbmc68k"
    # --config-dir is read after CZB_CONFIG_PATH, so it wins.
    both = invoke("list", "datasets", "--format", "json", "--config-dir", tmp_path / "cli")
    assert _descriptions(both)["pbmc68k_reduced"] == "from --config-dir"


def test_broken_yaml_in_config_dir(tmp_path):
    write_spec(tmp_path / "cfg", "broken.yaml", "datasets: [unclosed\n  foo: {\n")
    result = invoke("list", "datasets", "--config-dir", tmp_path / "cfg")
    assert result.exit_code == 1
    assert "broken.yaml" in result.stderr and "not valid YAML" in result.stderr
    assert_no_traceback(result)


def test_broken_yaml_error_is_one_line(tmp_path):
    write_spec(tmp_path / "cfg", "broken.yaml", "datasets: [unclosed\n  foo: {\n")
    result = invoke("list", "datasets", "--config-dir", tmp_path / "cfg")
    assert "broken.yaml" in error_line(result)
    assert result.stderr.strip() == error_line(result)


def test_invalid_spec_entry_and_missing_config_dir(tmp_path):
    write_spec(tmp_path / "cfg", "bad.yaml", "datasets:\n  x:\n    uri: a.h5ad\n    organism: martian\n"
                                             "    label_key: c\n")
    result = invoke("list", "datasets", "--config-dir", tmp_path / "cfg")
    assert result.exit_code == 1
    assert "bad.yaml" in error_line(result) and "martian" in error_line(result)
    missing = invoke("list", "datasets", "--config-dir", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "nowhere" in error_line(missing)


# ----------------------------------------------------------------------------- failing models


def test_model_that_fails_to_embed_is_recorded_as_failed(tmp_path):
    # Valid parameters, but one highly variable gene leaves PCA nothing to decompose.
    write_spec(tmp_path / "cfg", "models.yaml", """\
models:
  broken_pca:
    kind: baseline
    implementation: pca
    parameters: {n_top_genes: 1, n_comps: 5}
""")
    out = tmp_path / "out"
    result = invoke("run", "--model", "broken_pca", "--task", "embedding", *TINY,
                    "--config-dir", tmp_path / "cfg", "--output-dir", out, "--format", "json")
    assert result.exit_code == 1, result.output
    records = json_stdout(result)
    assert [(r["model"]["name"], r["status"]) for r in records] == [("broken_pca", "failed"), ("pca", "ok")]
    assert records[0]["error"].startswith("embedding failed: broken_pca:")
    assert records[0]["metrics"] == []
    on_disk = {r.model.name: r for r in results_in(out)}
    assert set(on_disk) == {"broken_pca", "pca"}
    assert on_disk["broken_pca"].status == "failed"
    assert on_disk["broken_pca"].error == records[0]["error"]
    assert_no_traceback(result)


def test_model_that_fails_table_format_exit_1(tmp_path):
    write_spec(tmp_path / "cfg", "models.yaml",
               "models:\n  broken_pca: {kind: baseline, implementation: pca, parameters: {n_top_genes: 1}}\n")
    result = invoke("run", "--model", "broken_pca", "--task", "embedding", *TINY, "--no-baseline",
                    "--config-dir", tmp_path / "cfg", "--output-dir", tmp_path / "out")
    assert result.exit_code == 1
    assert "czb results" in result.stdout
    assert_no_traceback(result)


def test_invalid_model_parameter_is_rejected_before_anything_runs(tmp_path):
    write_spec(tmp_path / "cfg", "models.yaml", """\
models:
  pca:
    kind: baseline
    implementation: pca
    parameters: {n_comps: -5}
""")
    out = tmp_path / "out"
    result = invoke("run", "--model", "random", "--task", "embedding", *TINY,
                    "--config-dir", tmp_path / "cfg", "--output-dir", out)
    assert result.exit_code == 1
    line = error_line(result)
    assert "n_comps" in line and "-5" in line
    assert_no_traceback(result)
    assert not out.exists() or not list(out.iterdir())
