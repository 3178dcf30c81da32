"""Early checks of outputs and inputs, and a bench store that heals (issue 17).

A run with nowhere to write, or with an embedding file that does not fit its dataset,
fails at once with one line naming the folder or file, before any heavy work (spies
prove the dataset is never loaded, or the PCA baseline never runs). A bench store
whose outputs were damaged (a truncated ``embedding.npz``, a cut ``scores/*.json``...)
names the file, deletes it and redoes its unit. A failing task is a ``failed`` record.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_exit, error_line, invoke

from czb.core.records import read_result

TINY = ["--dataset", "synthetic_cells_tiny", "--seeds", "0", "--n-jobs", "1"]
TINY_CELLS = 300
PBMC = ["--dataset", "pbmc68k_reduced", "--offline", "--seeds", "0", "--n-jobs", "1"]


def records_in(folder: Path) -> list:
    return [read_result(p) for p in sorted((Path(folder) / "results").glob("*.json"))]


@pytest.fixture(scope="module", autouse=True)
def _warm():
    """Import what a run imports once, so the timings below measure work, not imports."""
    import czb.data.reading
    import czb.pipeline.run
    from czb.evaluation.registry import load_all

    load_all()
    assert czb.pipeline.run.run_benchmark and czb.data.reading.load_dataset


@pytest.fixture
def spies(monkeypatch):
    """Count dataset loads and PCA baseline runs."""
    from czb.data import reading
    from czb.models import baselines
    calls = {"load": 0, "pca": 0}
    load, pca = reading.load_dataset, baselines.PCABaseline.embed

    def counted_load(*args, **kwargs):
        calls["load"] += 1
        return load(*args, **kwargs)

    def counted_pca(self, *args, **kwargs):
        calls["pca"] += 1
        return pca(self, *args, **kwargs)

    monkeypatch.setattr(reading, "load_dataset", counted_load)
    monkeypatch.setattr(baselines.PCABaseline, "embed", counted_pca)
    return calls


# ----------------------------------------------------------------------------- --output-dir


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("keep me\n")
    return path


@pytest.mark.parametrize(("where", "message"), [
    (lambda tmp: _a_file(tmp), "output folder {} exists and is not a folder"),
    (lambda tmp: _a_file(tmp) / "sub", "cannot create output folder {}: Not a directory"),
])
def test_output_dir_that_cannot_be_used_fails_before_any_work(tmp_path, spies, where, message):
    folder = where(tmp_path)
    start = time.perf_counter()
    result = invoke("run", "--model", "pca", "--task", "clustering", *TINY, "--output-dir", folder)
    elapsed = time.perf_counter() - start
    assert_clean_exit(result, 1)
    assert error_line(result) == "error: " + message.format(folder)
    assert spies == {"load": 0, "pca": 0}
    assert elapsed < 1.0, elapsed
    assert (tmp_path / "results.txt").read_text() == "keep me\n"  # the file is left alone


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_dir_fails_before_any_work(tmp_path, spies):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = invoke("run", "--model", "pca", "--task", "clustering", *TINY, "--output-dir", folder)
    finally:
        folder.chmod(0o755)
    assert_clean_exit(result, 1)
    assert error_line(result) == f"error: output folder {folder} is not writable: Permission denied"
    assert spies == {"load": 0, "pca": 0}


def test_output_dir_probe_leaves_nothing_behind(tmp_path):
    from czb.pipeline.store import check_output_dir
    folder = tmp_path / "a" / "b"
    assert check_output_dir(folder) == folder
    assert folder.is_dir() and list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- --embedding checked first


def _bad_embeddings() -> dict[str, tuple[np.ndarray, str]]:
    rng = np.random.default_rng(0)
    nan = rng.normal(size=(700, 4))
    nan[3, 1] = np.nan
    return {
        "short.npy": (rng.normal(size=(699, 4)), "699 rows but dataset pbmc68k_reduced has 700 cells"),
        "flat.npy": (rng.normal(size=700), "must be 2-D"),
        "nan.npy": (nan, "1 of 700 rows have NaN or infinite values"),
        "zeros.npy": (np.zeros((700, 4)), "same vector"),
    }


@pytest.mark.parametrize("name", list(_bad_embeddings()))
def test_bad_embedding_file_stops_the_run_before_the_pca_baseline(tmp_path, spies, name):
    values, reason = _bad_embeddings()[name]
    path = tmp_path / name
    np.save(path, values)
    out = tmp_path / "out"
    start = time.perf_counter()
    result = invoke("run", "--embedding", path, "--task", "clustering", "--task", "embedding", *PBMC,
                    "--output-dir", out)
    elapsed = time.perf_counter() - start
    assert_clean_exit(result, 1)
    assert spies == {"load": 1, "pca": 0}
    assert elapsed < 10, elapsed  # the dataset loads; nothing is scored
    records = records_in(out)
    assert len(records) == 2 and {r.model.name for r in records} == {f"file:{name}"}
    assert all(r.status == "failed" and reason in r.error and str(path) in r.error for r in records)
    assert f"failed: pbmc68k_reduced/file:{name}: embedding failed: {path}" in result.stderr


def test_good_embedding_file_still_gets_its_baseline(tmp_path, spies):
    import scanpy as sc

    path = tmp_path / "pca.npy"
    np.save(path, sc.datasets.pbmc68k_reduced().obsm["X_pca"])
    out = tmp_path / "out"
    result = invoke("run", "--embedding", path, "--task", "embedding", *PBMC, "--output-dir", out)
    assert_clean_exit(result, 0)
    assert spies["pca"] == 1
    assert {(r.model.name, r.status) for r in records_in(out)} == {("file:pca.npy", "ok"), ("pca", "ok")}


# ----------------------------------------------------------------------------- failing tasks


def test_a_failing_task_is_a_failed_record_and_the_others_are_kept(tmp_path, monkeypatch):
    from czb.evaluation.tasks.embedding import Embedding

    def crash(self, context, *, seed):
        raise RuntimeError("task blew up")

    monkeypatch.setattr(Embedding, "run", crash)
    out = tmp_path / "out"
    result = invoke("run", "--model", "random", "--no-baseline", "--task", "embedding", "--task", "clustering",
                    *TINY, "--output-dir", out)
    assert_clean_exit(result, 1)
    by_task = {r.task.name: r for r in records_in(out)}
    assert by_task["embedding"].status == "failed" and by_task["embedding"].error == "RuntimeError: task blew up"
    assert by_task["clustering"].status == "ok"
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]  # written atomically


# ----------------------------------------------------------------------------- bench store


SUITE = """\
suites:
  tiny:
    models: [random]
    datasets: [synthetic_cells_tiny]
    tasks: [embedding, clustering]
    seeds: [0]
"""


@pytest.fixture
def suite_file(tmp_path) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return path


def bench(suite_file: Path, store: Path):
    return invoke("bench", suite_file, "--store", store, "--n-jobs", "1", "--cpus", "1")


def store_records(store: Path) -> list:
    return records_in(store)


def test_bench_store_that_is_a_file_fails_before_planning(tmp_path, suite_file, monkeypatch):
    from czb.pipeline import plan
    planned = []
    monkeypatch.setattr(plan, "plan_suite", lambda *a, **k: planned.append(1))
    store = _a_file(tmp_path)
    start = time.perf_counter()
    result = bench(suite_file, store)
    assert_clean_exit(result, 1)
    assert error_line(result) == f"error: store folder {store} exists and is not a folder"
    assert planned == [] and time.perf_counter() - start < 1.0
    assert store.read_text() == "keep me\n"


def test_local_store_checks_its_folder(tmp_path):
    from czb.pipeline.store import StoreError, open_store

    with pytest.raises(StoreError, match="cannot create store folder .*: Not a directory"):
        open_store(_a_file(tmp_path) / "store")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x00\xff" * 10)
    elif how == "flip":  # the zip directory survives; the data do not
        damaged = bytearray(data)
        for i in range(120, 400):
            damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))
    elif how == "wrong_json":
        path.write_text('["not", "an", "output"]')


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_unreadable_embedding_in_the_store_is_named_and_redone(tmp_path, suite_file, how):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    (npz,) = [p for p in store.glob("embeddings/*/embedding.npz")
              if json.loads((p.parent / "unit.json").read_text())["model"]["name"] == "random"]
    _damage(npz, how)
    result = bench(suite_file, store)
    assert_clean_exit(result, 0)
    assert f"warning: {npz} is not a readable .npz" in " ".join(result.stderr.split())
    assert "BadZipFile" not in result.stderr.replace("(BadZipFile)", "")
    assert "1 units ran" in result.stderr.replace("\n", " ")  # only the damaged unit
    with np.load(npz) as f:  # made again, whole
        assert f["values"].shape[0] == TINY_CELLS
    assert {r.status for r in store_records(store)} == {"ok"}


def test_dry_run_names_a_damaged_output_and_leaves_it(tmp_path, suite_file):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    score = min(store.glob("scores/*.json"))
    _damage(score, "truncate")
    damaged = score.read_bytes()
    result = invoke("bench", suite_file, "--store", store, "--dry-run")
    assert_clean_exit(result, 0)
    assert f"warning: {score} is not valid JSON; its unit runs again" in " ".join(result.stderr.split())
    assert f"todo  {score.stem[:12]}" in result.stdout
    assert score.read_bytes() == damaged  # a dry run changes nothing


def test_embedding_damaged_inside_is_redone_when_a_unit_reads_it(tmp_path, suite_file):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    (npz,) = [p for p in store.glob("embeddings/*/embedding.npz")
              if json.loads((p.parent / "unit.json").read_text())["model"]["name"] == "random"]
    key = npz.parent.name
    _damage(npz, "flip")
    for score in store.glob("scores/*.json"):  # its score units must read it again
        if key in json.dumps(json.loads(score.read_text())["parts"]):
            score.unlink()
    result = bench(suite_file, store)
    assert_clean_exit(result, 0)
    with np.load(npz) as f:
        assert f["values"].shape[0] == TINY_CELLS
    records = store_records(store)
    assert records and {r.status for r in records} == {"ok"}


@pytest.mark.parametrize("how", ["truncate", "garbage", "wrong_json"])
def test_unreadable_score_output_is_named_and_redone(tmp_path, suite_file, how):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    score = min(store.glob("scores/*.json"))
    _damage(score, how)
    result = bench(suite_file, store)
    assert_clean_exit(result, 0)
    assert f"warning: {score}" in " ".join(result.stderr.split())
    assert "1 units ran" in result.stderr.replace("\n", " ")
    assert json.loads(score.read_text())["status"] in ("ok", "not_applicable")
    assert {r.status for r in store_records(store)} == {"ok"}


def test_unreadable_unit_json_is_redone(tmp_path, suite_file):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    meta = min(store.glob("embeddings/*/unit.json"))
    _damage(meta, "truncate")
    result = bench(suite_file, store)
    assert_clean_exit(result, 0)
    assert f"warning: {meta} is not valid JSON" in " ".join(result.stderr.split())
    assert json.loads(meta.read_text())["status"] == "ok"


def test_unreadable_failure_record_does_not_break_assembly(tmp_path):
    """A damaged ``failures/<key>.json`` is named, deleted, and the record still says failed."""
    from czb.pipeline.assemble import assemble_records
    from czb.pipeline.plan import plan_suite
    from czb.pipeline.store import StoreWarning, open_store
    from czb.specs.catalog import Catalog

    (tmp_path / "suite.yaml").write_text(SUITE)
    plan = plan_suite(Catalog.load(extra_files=[tmp_path / "suite.yaml"]), "tiny")
    store = open_store(tmp_path / "store")
    key = next(iter(plan.embeds))
    store.write_bytes(f"failures/{key}.json", b'{"error": "cut sh')
    with pytest.warns(StoreWarning, match=rf"failures/{key}.json is not valid JSON; its unit runs again"):
        records, _ = assemble_records(plan, store)
    assert {r.status for r in records} == {"failed"}
    assert not (tmp_path / "store" / "failures" / f"{key}.json").exists()


@pytest.mark.network
def test_s3_store_finds_a_truncated_embedding_from_its_end(s3, monkeypatch):
    import io

    from conftest import S3_TEST_BUCKET

    from czb.pipeline.store import StoreError, StoreWarning, open_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_store(f"s3://{S3_TEST_BUCKET}/trust")
    store.write_arrays("embeddings/k/embedding.npz", values=np.arange(12, dtype=np.float32).reshape(4, 3))
    assert store.arrays_problem("embeddings/k/embedding.npz") is None
    buffer = io.BytesIO()
    np.savez(buffer, values=np.arange(12, dtype=np.float32).reshape(4, 3))
    store.write_bytes("embeddings/k/embedding.npz", buffer.getvalue()[:-30])
    assert "cut short" in store.arrays_problem("embeddings/k/embedding.npz")
    with pytest.raises(StoreError, match=r"trust/embeddings/k/embedding.npz is not a readable .npz \("):
        store.read_arrays("embeddings/k/embedding.npz")
    store.write_bytes("embeddings/k/unit.json", b'{"status": "ok", "dataset": {}, "model": {}}')
    with pytest.warns(StoreWarning, match="embedding.npz is not a readable .npz"):
        assert not store.readable_embedding("k")
    assert not store.exists("embeddings/k/unit.json") and not store.exists("embeddings/k/embedding.npz")


# ----------------------------------------------------------------------------- names as long as the name rule allows


LONG_SPEC = """\
datasets:
  {dataset}:
    uri: synthetic:planted_cells
    params: {{n_cells: 120, n_genes: 200, n_cell_types: 3, n_batches: 2, seed: 1}}
    organism: human
    label_key: cell_type
    batch_key: batch
    gene_id_type: ensembl
    expression: raw_counts
models:
  {model}:
    kind: baseline
    implementation: pca
    input: any
    gene_id_type: any
    output_dim: 10
    parameters: {{n_top_genes: 100, n_comps: 10}}
"""


def _file_names(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*")]


def test_longest_valid_names_are_written_and_reported(tmp_path):
    dataset, model = "D" * 127 + "x", "M" * 127 + "y"
    twin = "M" * 127 + "z"  # shares the first 127 characters: its files must not collide
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    spec = LONG_SPEC.format(dataset=dataset, model=model)
    # The twin computes something else (the same parameters would share the twin's units).
    spec += spec[spec.index("  " + model):].replace(model, twin).replace("n_comps: 10", "n_comps: 9")
    (cfg / "long.yaml").write_text(spec)
    out = tmp_path / "out"
    result = invoke("run", "-m", model, "-m", twin, "-t", "embedding", "-t", "clustering", "-d", dataset,
                    "--seeds", "0", "--config-dir", cfg, "--output-dir", out, "--n-jobs", "1")
    assert_clean_exit(result, 0)
    names = _file_names(out)
    assert names and max(len(n.encode()) for n in names) < 255
    records = records_in(out)
    assert {(r.model.name, r.task.name) for r in records} >= {(model, "embedding"), (twin, "clustering")}
    assert len(records) == 6 and len({r.embedding_sample for r in records if r.model.name != "pca"}) == 2
    report = tmp_path / "r.html"
    assert_clean_exit(invoke("report", out, "-o", report), 0)
    assert "map skipped" not in report.read_text()


def test_long_embedding_file_name_is_written(tmp_path):
    emb = tmp_path / ("E" * 240 + ".npy")
    np.save(emb, np.random.default_rng(0).normal(size=(TINY_CELLS, 5)).astype(np.float32))
    out = tmp_path / "out"
    result = invoke("run", "--embedding", emb, "-t", "embedding", *TINY, "--no-baseline", "--offline",
                    "--output-dir", out)
    assert_clean_exit(result, 0)
    (record,) = records_in(out)
    assert record.model.name == f"file:{emb.name}" and record.status == "ok"
    assert max(len(n.encode()) for n in _file_names(out)) < 255


def test_slug_keeps_long_names_apart_and_short_names_as_they_were():
    from czb.core.records import MAX_SLUG, slug

    assert slug("pca") == "pca" and slug("file:my emb.npy") == "file-my-emb.npy"
    long_a, long_b = "a" * 128, "a" * 127 + "b"
    assert slug(long_a) != slug(long_b)
    assert len(slug(long_a)) <= MAX_SLUG and len(slug("\u00e9" * 500)) <= MAX_SLUG


def test_sample_that_cannot_be_written_does_not_cost_the_scores(tmp_path, monkeypatch):
    from czb.pipeline.store import LocalStore, StoreError

    write = LocalStore.write_bytes

    def full_for_samples(self, relative, data):
        if relative.startswith("results/embeddings/"):
            msg = f"{self.url}/{relative} cannot be written (No space left on device)"
            raise StoreError(msg)
        return write(self, relative, data)

    monkeypatch.setattr(LocalStore, "write_bytes", full_for_samples)
    out = tmp_path / "out"
    result = invoke("run", "-m", "random", "-t", "embedding", *TINY, "--no-baseline", "--offline",
                    "--output-dir", out)
    assert_clean_exit(result, 0)
    assert "reports will have no map of it" in " ".join(result.stderr.split())
    (record,) = records_in(out)
    assert record.status == "ok" and record.embedding_sample is None


def test_models_of_the_same_identity_share_units_and_keep_their_names(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.mkdir()
    (cfg / "alias.yaml").write_text(
        "models:\n  my_pca:\n    kind: baseline\n    implementation: pca\n"
        "    parameters: {n_top_genes: 3000, n_comps: 50}\n")  # what pca declares, by value
    out = tmp_path / "out"
    result = invoke("run", "-m", "my_pca", "-t", "embedding", *TINY, "--offline", "--config-dir", cfg,
                    "--output-dir", out)
    assert_clean_exit(result, 0)
    records = {r.model.name: r for r in records_in(out)}
    assert set(records) == {"my_pca", "pca"}  # one embedding computed, two records
    assert len(list(out.glob("embeddings/*/unit.json"))) == 1
    assert records["my_pca"].metrics == records["pca"].metrics


# ----------------------------------------------------------------------------- store entries that are not regular files


def test_store_whose_scores_folder_is_a_file_is_one_clean_error(tmp_path, suite_file):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    import shutil

    shutil.rmtree(store / "scores")
    (store / "scores").write_text("keep me\n")
    result = bench(suite_file, store)
    assert_clean_exit(result, 1)
    assert error_line(result) == (f"error: store {store.resolve()}: scores is a file, not a folder; "
                                  "move it away or use another store")
    assert (store / "scores").read_text() == "keep me\n"


@pytest.mark.parametrize("kind", ["folder", "fifo", "symlink-out", "dev-zero"])
def test_store_output_that_is_not_a_regular_file_is_named_and_redone(tmp_path, suite_file, kind):
    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    (npz,) = [p for p in store.glob("embeddings/*/embedding.npz")
              if json.loads((p.parent / "unit.json").read_text())["model"]["name"] == "random"]
    npz.unlink()
    outside = tmp_path / "outside.npz"
    outside.write_bytes(b"keep me")
    if kind == "folder":
        (npz / "sub").mkdir(parents=True)
    elif kind == "fifo":
        os.mkfifo(npz)
    elif kind == "symlink-out":
        npz.symlink_to(outside)
    else:
        npz.symlink_to("/dev/zero")
    result = bench(suite_file, store)
    assert_clean_exit(result, 0)
    assert f"warning: {npz.resolve() if kind == 'folder' else npz}" in " ".join(result.stderr.split())
    assert "1 units ran" in result.stderr.replace("\n", " ")
    assert npz.is_file() and not npz.is_symlink()
    with np.load(npz) as f:
        assert f["values"].shape[0] == TINY_CELLS
    assert outside.read_bytes() == b"keep me"
    assert {r.status for r in store_records(store)} == {"ok"}


def test_store_never_reads_or_writes_through_a_symlinked_unit_folder(tmp_path, suite_file):
    import shutil

    store = tmp_path / "store"
    assert_clean_exit(bench(suite_file, store), 0)
    unit = min(store.glob("embeddings/*"))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(unit, elsewhere)
    shutil.rmtree(unit)
    unit.symlink_to(elsewhere, target_is_directory=True)
    kept = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    score = min(store.glob("scores/*.json"))
    score.unlink()
    os.mkfifo(score)  # would block a reader
    result = bench(suite_file, store)
    assert_clean_exit(result, 0)
    assert unit.is_dir() and not unit.is_symlink()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir()} == kept  # untouched
    assert json.loads(score.read_text())["status"] in ("ok", "not_applicable")
    assert {r.status for r in store_records(store)} == {"ok"}


def test_local_store_entries_that_are_not_files(tmp_path):
    from czb.pipeline.store import StoreError, StoreWarning, open_store

    store = open_store(tmp_path / "store")
    root = tmp_path / "store"
    (root / "scores").mkdir()
    (root / "scores" / "dir.json").mkdir()
    os.mkfifo(root / "scores" / "fifo.json")
    (root / "scores" / "link.json").symlink_to("/dev/zero")
    (root / "scores" / "ok.json").write_text('{"status": "ok"}')
    assert store.files("scores") == ["scores/ok.json"]
    assert store.done_scores() == {"ok"}
    for name in ("dir", "fifo", "link"):
        relative = f"scores/{name}.json"
        assert not store.exists(relative)
        with pytest.raises(StoreError, match=f"scores/{name}.json (is a|cannot)"):
            store.read_bytes(relative)
        with pytest.warns(StoreWarning, match=f"scores/{name}.json"):
            assert store.read_output(relative) is None
        assert not os.path.lexists(root / relative)  # deleted: its unit runs again
    assert os.path.exists("/dev/zero")
