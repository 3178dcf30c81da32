"""``czb run`` and ``czb list`` at 80 columns: every line fits, nothing is cut.

Typer's ``CliRunner`` is not a terminal, so these runs print plain text (what ``| cat``
shows); ``TTY_COMPATIBLE`` (read by rich) makes them print as on a terminal. Each
record's model, dataset, task, headline value, Δ and status must be readable whole.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import invoke
from rich.cells import cell_len

from czb.core import records as R
from czb.evaluation.registry import get_task
from czb.pipeline.baselines import baseline_differences
from czb.report.tables import metric_label

TINY = ["-m", "random", "-t", "clustering", "-t", "embedding", "-d", "synthetic_cells_tiny",
        "--seeds", "0,1", "--n-jobs", "1"]
SPECIES = ["-m", "random", "-t", "cross_species_integration", "-t", "cross_species_label_prediction",
           "-d", "synthetic_species_human", "-d", "synthetic_species_mouse", "--seeds", "0", "--n-jobs", "1"]
PIPED = {"COLUMNS": "80", "TTY_COMPATIBLE": "0"}
TERMINAL = {"COLUMNS": "80", "TTY_COMPATIBLE": "1", "NO_COLOR": None}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def fits(text: str, width: int = 80) -> list[str]:
    """The lines of ``text`` without colour codes, after checking each fits and none is cut."""
    lines = ANSI.sub("", text).splitlines()
    assert all(cell_len(line) <= width for line in lines), "\n".join(ln for ln in lines if cell_len(ln) > width)
    assert "…" not in text
    return lines


def sections(lines: list[str]) -> dict[tuple[str, str], list[str]]:
    """``czb run``'s output as ``{(dataset, task header): lines below it}``: datasets
    start at column 0, tasks at 2, table rows at 4, reasons at 6."""
    out: dict[tuple[str, str], list[str]] = {}
    dataset = task = ""
    for line in lines[2:]:  # after the two title lines
        indent = len(line) - len(line.lstrip())
        if line.strip() and indent == 0:
            dataset = line.strip()
        elif indent == 2:
            task = line.strip()
            out[(dataset, task)] = []
        elif line.strip():
            out[(dataset, task)].append(line)
    return out


def value(m: R.MetricRecord) -> str:
    return f"{m.value:.4f}" + ("" if m.value_std_dev is None else f" ± {m.value_std_dev:.4f}")


def stored(folder) -> list[R.ResultRecord]:
    return [R.read_result(p) for p in sorted((folder / "results").glob("*.json"))]


def assert_rows(lines: list[str], records: list[R.ResultRecord], *, wide: bool = False) -> None:
    """Each record's row (each metric's with ``wide``) under its dataset and task, with
    model, value, Δ and status whole on one line."""
    diffs = baseline_differences(records)
    found = sections(lines)
    for r in records:
        first = get_task(r.task.implementation).info.headline_metric
        metrics = r.metrics if wide else [next(m for m in r.metrics if m.name == first)]
        for m in metrics:
            label = metric_label(m.name, m.params)
            task = r.task.name if wide else f"{r.task.name}: {label}"
            rows = found[(r.dataset.name, task)]
            key = (r.dataset.name, r.task.name, m.name, tuple(sorted((k, str(v)) for k, v in m.params.items())),
                   r.model.name)
            delta = f"{diffs[key]:+.4f}" if key in diffs else ""
            parts = [label] if wide else []
            cells = [re.escape(c) for c in (r.model.name, *parts, value(m))]
            if delta:  # a significance mark may follow the difference
                cells.append(re.escape(delta) + "(?: [▲▼])?")
            pattern = r"\s+".join([*cells, re.escape(r.status)])
            assert any(re.fullmatch(rf"\s*{pattern}\s*", row) for row in rows), (r.model.name, label, rows)


def test_run_prints_each_tasks_headline_metric_within_80_columns(tmp_path):
    result = invoke("run", *TINY, "--output-dir", tmp_path, env=PIPED)
    assert result.exit_code == 0, result.output
    lines = fits(result.stdout)
    records = stored(tmp_path)
    assert {r.model.name for r in records} == {"random", "pca"}
    assert_rows(lines, records)
    assert "normalized_mutual_info" not in result.stdout  # only the headline metric
    assert "\x1b[" not in result.stdout  # piped: plain text


def test_run_wide_prints_every_metric_within_80_columns(tmp_path):
    result = invoke("run", *TINY, "--output-dir", tmp_path, "--wide", env=PIPED)
    assert result.exit_code == 0, result.output
    records = stored(tmp_path)
    assert sum(len(r.metrics) for r in records) > len(records)
    assert_rows(fits(result.stdout), records, wide=True)


def test_cross_species_run_fits_80_columns(tmp_path):
    result = invoke("run", *SPECIES, "--output-dir", tmp_path, env=PIPED)
    assert result.exit_code == 0, result.output
    lines = fits(result.stdout)
    records = stored(tmp_path)
    assert {r.dataset.name for r in records} == {"synthetic_species_human+synthetic_species_mouse"}
    assert_rows(lines, records)
    assert "  cross_species_label_prediction: accuracy [human→mouse, MEAN(knn,lr,rf)]" in lines


def test_run_on_a_terminal_fits_80_columns_too(tmp_path):
    result = invoke("run", *TINY, "--output-dir", tmp_path, env=TERMINAL)
    assert result.exit_code == 0, result.output
    assert "\x1b[" in result.stdout  # styled as on a terminal
    assert_rows(fits(result.stdout), stored(tmp_path))


def test_run_prints_why_a_record_did_not_score(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "models.yaml").write_text(
        "models:\n  broken_pca:\n    kind: baseline\n    implementation: pca\n"
        "    parameters: {n_top_genes: 1, n_comps: 5}\n")
    result = invoke("run", "-m", "broken_pca", "-t", "embedding", "-d", "synthetic_cells_tiny", "--seeds", "0",
                    "--n-jobs", "1", "--config-dir", tmp_path / "cfg", "--output-dir", tmp_path / "out", env=PIPED)
    assert result.exit_code == 1, result.output
    lines = fits(result.stdout)
    (broken,) = [r for r in stored(tmp_path / "out") if r.status == "failed"]
    rows = sections(lines)[("synthetic_cells_tiny", "embedding: silhouette_score")]
    assert any(re.fullmatch(r"\s*broken_pca\s+failed", row) for row in rows), rows
    reason = " ".join(row.strip() for row in rows if row.startswith(" " * 6))
    assert reason == f"broken_pca failed: {broken.error}"
    assert any(line.startswith("failed: synthetic_cells_tiny/broken_pca") for line in result.stderr.splitlines())


def hierarchy_record(model: str, value: float) -> R.ResultRecord:
    metrics = [R.MetricRecord(name="knn_top1", value=value + 0.01 * i, params={"postprocessing": pp})
               for i, pp in enumerate(("none", "center", "center_scale", "tvn"))]
    return R.ResultRecord(
        czb_version="0.test", created_at="2026-01-01T00:00:00+00:00", command="czb run",
        host=R.HostRecord(python="3.11", platform="linux", n_threads=2),
        dataset=R.DatasetRecord(name="screen", uri="file:///s.h5ad", sha256=None, n_cells=10, n_genes=5),
        model=R.ModelRecord(name=model, kind="docker", image_digest="in-process"),
        task=R.TaskRecord(name="perturbation_knn", implementation="perturbation_knn"), seeds=[0], status="ok",
        metrics=metrics)


def test_hierarchy_table_is_split_to_fit_80_columns(monkeypatch, capsys):
    from czb.cli.tables import print_hierarchy

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    models = ["pca", "random", "scgpt_whole_human", "geneformer_gf-12L-95M", "transcriptformer_sapiens", "uce"]
    print_hierarchy([hierarchy_record(m, 0.1 * i) for i, m in enumerate(models)])
    lines = fits(capsys.readouterr().out)
    headers = [line.split() for line in lines if line.split()[:1] == ["metric"]]
    assert len(headers) > 1  # split into several tables
    assert [m for header in headers for m in header[1:]] == models
    for i, model in enumerate(models):
        best = " *" if model == models[-1] else ""
        assert any(f"{0.1 * i + 0.03:.3f} (tvn){best}" in line for line in lines), model


def test_list_datasets_groups_families_within_80_columns():
    result = invoke("list", "datasets", env=PIPED)
    assert result.exit_code == 0, result.output
    lines = fits(result.stdout)
    assert len(lines) < 80
    names = [row["name"] for row in json.loads(invoke("list", "datasets", "--format", "json").stdout)]
    tissues = [n.removeprefix("tsv2_") for n in names if n.startswith("tsv2_")]
    assert len(tissues) >= 20
    words = set(re.findall(r"[\w-]+", result.stdout))
    assert set(tissues) <= words
    assert not any(ln.split()[0].startswith("tsv2_") and ln.split()[0] in names for ln in lines)  # one family row
    # Datasets of a prefix with different tags stay on rows of their own.
    assert {"synthetic_cells_tiny", "synthetic_species_mouse", "pbmc68k_reduced"} <= {ln.split()[0] for ln in lines}


def test_list_datasets_wide_lists_every_dataset():
    result = invoke("list", "datasets", "--wide", env=PIPED)
    assert result.exit_code == 0, result.output
    lines = fits(result.stdout)
    rows = json.loads(invoke("list", "datasets", "--format", "json").stdout)
    assert {row["name"] for row in rows} <= {ln.strip() for ln in lines}
    words = set(result.stdout.split())
    for row in rows:
        assert set(row["description"].split()) <= words, row["name"]


@pytest.mark.parametrize("env", [PIPED, TERMINAL], ids=["piped", "terminal"])
def test_list_models_and_tasks_fit_80_columns(env):
    for kind in ("models", "tasks"):
        result = invoke("list", kind, env=env)
        assert result.exit_code == 0, result.output
        lines = fits(result.stdout)
        rows = json.loads(invoke("list", kind, "--format", "json").stdout)
        assert {row["name"] for row in rows} <= {ln.split()[0] for ln in lines if ln.strip()}
        if kind == "tasks":  # descriptions wrap at spaces: every word whole
            words = set(ANSI.sub("", result.stdout).split())
            for row in rows:
                assert set(row["description"].split()) <= words, row["name"]


def test_column_widths_fit_without_folding_a_word():
    from rich.text import Text

    from czb.cli.tables import fit_widths

    rows = [[Text("model_a"), Text("word " * 40), Text("0.1234 ± 0.0001")]]
    widths = fit_widths(["name", "description", "value"], rows, whole=["value"], room=80)
    assert widths == [7, 80 - 2 * 2 - 7 - 15, 15]  # the long column takes what is left
    assert fit_widths(["name", "description", "value"], rows, whole=["value"], room=25) is None
