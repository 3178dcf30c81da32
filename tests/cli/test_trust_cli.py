"""No Python traceback for user input (issue 17): every failure of the command line ends in
one ``error:`` line and exit code 1 or 2, options and settings that make no sense are
refused before any work, and ``--debug`` still shows the traceback.
"""

from __future__ import annotations

import subprocess
import sys

import conftest
import pytest
from conftest import invoke, write_text

from czb.specs.catalog import Catalog

SECRET = "s3cr3t-content-42"


write = write_text


def error_line(result) -> str:
    return conftest.error_line(result, usage=True)


def assert_clean_failure(result, codes=(1, 2)) -> str:
    """Exit 1 or 2 (or ``codes``), and its one error line (click's ``Error:`` counts)."""
    return conftest.assert_clean_failure(result, codes, usage=True)


# ----------------------------------------------------------------------------- the last-resort handler


@pytest.mark.parametrize("error", [
    TypeError(f"unsupported operand '{SECRET}'"),
    RecursionError("maximum recursion depth exceeded"),
    MemoryError(),
    KeyError(SECRET),
    ValueError(f'could not convert string to float: "{SECRET}"\nsecond line'),
])
def test_unexpected_exception_is_one_line_exit_1(monkeypatch, error):
    def broken(cls, *args, **kwargs):
        raise error

    monkeypatch.setattr(Catalog, "load", classmethod(broken))
    result = invoke("list", "tasks")
    line = assert_clean_failure(result, codes=(1,))
    assert line.startswith(f"error: internal error ({type(error).__name__}")
    assert "rerun with --debug" in line and SECRET not in result.output


def test_debug_still_shows_the_unexpected_exception(monkeypatch):
    def broken(cls, *args, **kwargs):
        raise RecursionError("deep")

    monkeypatch.setattr(Catalog, "load", classmethod(broken))
    result = invoke("--debug", "list", "tasks")
    assert isinstance(result.exception, RecursionError)


def test_bad_synthetic_parameter_is_one_line(tmp_path):
    cfg = write(tmp_path / "cfg", "d.yaml", """\
    datasets:
      lots:
        uri: synthetic:planted_cells
        params: {n_cells: 300, n_genes: "lots", n_cell_types: 6, seed: 0}
        organism: human
        label_key: cell_type
    """)
    result = invoke("run", "--model", "pca", "--task", "clustering", "--dataset", "lots", "--seeds", "0",
                    "--n-jobs", "1", "--output-dir", tmp_path / "out", "--config-dir", cfg.parent)
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_deeply_nested_result_in_a_subprocess_is_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("{\"a\":" * 100_000 + "1" + "}" * 100_000)
    done = subprocess.run([sys.executable, "-m", "czb", "report", str(deep), "--format", "md"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("error:") and "deep.json" in done.stderr


@pytest.mark.parametrize("name", ["[/x]", "[bold]x[/bold]", "[link=file:///etc/passwd]x"])
def test_names_that_look_like_markup_are_printed_verbatim(name):
    result = invoke("run", "--dataset", name, "--task", "clustering", "--model", "pca")
    line = assert_clean_failure(result, codes=(2,))
    assert repr(name) in line


def test_spec_text_that_looks_like_markup_does_not_break_list(tmp_path):
    cfg = write(tmp_path / "cfg", "t.yaml", """\
    tasks:
      odd:
        implementation: clustering
        description: "[/closing] tag and [red]colour"
    """)
    result = invoke("list", "tasks", "--config-dir", cfg.parent, env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    assert "[/closing] tag and [red]colour" in result.stdout


# ----------------------------------------------------------------------------- numbers that make no sense


RUN = ["run", "--model", "pca", "--task", "clustering", "--dataset", "synthetic_cells_tiny", "--seeds", "0"]
BENCH = ["bench", "smoke", "--dry-run"]


@pytest.mark.parametrize("args, option", [
    ([*RUN, "--n-jobs", "0"], "--n-jobs"),
    ([*RUN, "--n-jobs", "-2"], "--n-jobs"),
    ([*RUN, "--memory-gb", "0"], "--memory-gb"),
    ([*RUN, "--memory-gb", "-1.5"], "--memory-gb"),
    ([*RUN, "--shm-gb", "0"], "--shm-gb"),
    ([*RUN, "--timeout-s", "0"], "--timeout-s"),
    ([*RUN, "--timeout-s", "-5"], "--timeout-s"),
    ([*RUN, "--batch-size", "0"], "--batch-size"),
    ([*BENCH, "--n-jobs", "0"], "--n-jobs"),
    ([*BENCH, "--n-jobs", "-1"], "--n-jobs"),
    ([*BENCH, "--retries", "-1"], "--retries"),
    ([*BENCH, "--cpus", "0"], "--cpus"),
    ([*BENCH, "--memory-gb", "0"], "--memory-gb"),
    (["report", "nowhere", "--map-cells", "0"], "--map-cells"),
    (["report", "nowhere", "--map-cells", "-10"], "--map-cells"),
])
def test_options_at_or_below_zero_are_refused(tmp_path, args, option):
    result = invoke(*args, "--output-dir" if args[0] == "run" else "--offline" if args[0] == "bench" else "--no-maps",
                    *([tmp_path / "out"] if args[0] == "run" else []))
    line = assert_clean_failure(result, codes=(2,))
    assert option in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variable, value", [
    ("CZB_N_JOBS", "0"), ("CZB_N_JOBS", "-4"), ("CZB_N_JOBS", "many"),
    ("CZB_MAX_SPEC_MB", "0"), ("CZB_MAX_UNPACK_RATIO", "-1"), ("CZB_MAX_UNPACK_FILES", "0"),
])
def test_settings_that_make_no_sense_are_one_line_exit_2(monkeypatch, tmp_path, variable, value):
    monkeypatch.setenv(variable, value)
    for args in (["list", "tasks"], [*RUN, "--output-dir", tmp_path / "out"]):
        result = invoke(*args)
        line = assert_clean_failure(result, codes=(2,))
        assert variable in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- bad seeds and usage: exit 2, no work


@pytest.mark.parametrize("seeds, named", [
    ("3,3,3", "repeated: 3"),
    ("0,1,0,2,1", "repeated: 0, 1"),
    ("0 0", "repeated: 0"),
    ("-1", "-1"),
    ("1.5", "1.5"),
    ("abc", "abc"),
    ("", "one or more"),
    (" , ", "one or more"),
    ("99999999999999999999", "99999999999999999999"),
    ("4294967296", "4294967296"),
    ("9" * 5000, "9999999999"),  # more digits than int() converts
    ("\u0663", "\u0663"),  # a digit, but not an ASCII one
    ("1,\x1b[2J", "\\x1b[2J"),
])
def test_bad_seeds_are_bad_usage_before_any_work(tmp_path, seeds, named):
    out = tmp_path / "out"
    result = invoke(*RUN[:-2], "--seeds", seeds, "--output-dir", out)
    line = assert_clean_failure(result, codes=(2,))
    assert "--seeds" in line and named in line, line
    assert "\x1b" not in result.output
    assert not out.exists()


def test_distinct_seeds_in_any_order_are_accepted():
    from czb.cli.common import _parse_seeds

    assert _parse_seeds("2, 0 1") == [2, 0, 1]
    assert _parse_seeds(str(2**32 - 1)) == [2**32 - 1]


@pytest.mark.parametrize("args, named", [
    (["--task", "clustering", "--dataset", "synthetic_cells_tiny"], "give --model or --embedding"),
    (["--task", "clustering", "--dataset", "synthetic_cells_tiny", "--no-baseline"], "give --model or --embedding"),
    ([*RUN[1:], "--gpus", "x"], "--gpus"),
    ([*RUN[1:], "--gpus", "-1"], "--gpus"),
])
def test_run_bad_usage_is_exit_2(tmp_path, args, named):
    out = tmp_path / "out"
    result = invoke("run", *args, "--output-dir", out)
    line = assert_clean_failure(result, codes=(2,))
    assert named in line
    assert not out.exists()


# ----------------------------------------------------------------------------- no escape sequence reaches the terminal


RAW_CONTROLS = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066", "\x00")


def assert_printable(text: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in text, (repr(char), text)


def test_spec_keys_with_escape_sequences_are_printed_escaped(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "m.yaml").write_text("models:\n  m1:\n    kind: baseline\n    implementation: pca\n"
                                "    \"bogus\\e[2J\\e]0;PWNED\\a\\u202e\": 1\n")
    for kind in ("models", "datasets"):
        result = invoke("list", kind, "--config-dir", cfg)
        line = assert_clean_failure(result)
        assert_printable(result.output)
        assert "bogus\\x1b[2J\\x1b]0;PWNED\\x07\\u202e" in line


def test_file_names_with_escape_sequences_are_printed_escaped(tmp_path):
    missing = tmp_path / "emb\x1b[2J\x1b]0;PWNED\x07\u202e.npy"
    result = invoke(*RUN[:3], "--task", "clustering", "--dataset", "synthetic_cells_tiny", "--seeds", "0",
                    "--embedding", missing, "--no-baseline", "--offline")
    assert_clean_failure(result)
    assert_printable(result.output)
    assert "emb\\x1b[2J\\x1b]0;PWNED\\x07\\u202e.npy" in result.output


def test_run_table_and_failure_lines_show_names_escaped(tmp_path):
    import numpy as np

    bad = tmp_path / "e\x1b[2J\u202e.npy"
    np.save(bad, np.ones((10, 3), dtype=np.float32))  # 10 rows for 300 cells: a failed record
    result = invoke("run", "--embedding", bad, "--task", "clustering", "--dataset", "synthetic_cells_tiny",
                    "--seeds", "0", "--no-baseline", "--offline", "--output-dir", tmp_path / "out",
                    env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    failed = [ln for ln in result.stderr.splitlines() if ln.startswith("failed:")]
    assert failed and "e\\x1b[2J\\u202e.npy" in failed[0]
    assert "e\\x1b[2J\\u202e.npy" in result.stdout  # the table cell
    assert_printable(result.output)
