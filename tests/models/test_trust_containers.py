"""A model image is hostile: nothing it leaves in ``/output`` may reach the host.

A container cannot see host paths, but it can make ``/output/meta.json`` (or any name czb
reads or writes there) a symbolic link whose target is a host path: czb, resolving it on
the host, would read a host file into the result and the cache, or overwrite one. It can
also leave hard links, FIFOs (a reader blocks), devices, folders, sparse terabyte files,
deeply nested JSON, a lying ``.npy`` header, terminal escapes in ``reason.json`` and HDF5
files that point at other files.

Most tests here run ``czb run`` through the CLI with ``docker_engine`` replaced by an
in-process "container" that plants such files into the output folder the host mounts
(the same folder a real container writes); the effects are checked: run recorded as
failed with one line naming the file, the host's secret file unchanged (content and
mtime) and absent from stdout, stderr, every result file and the cache. The tests marked
``docker`` do the same with a real image built from ``czb-base:bookworm``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import docker_engine_or_skip
from typer.testing import CliRunner

from czb.cli import app
from czb.core.errors import EmbeddingError
from czb.models.docker import engine as docker_engine
from czb.models.docker.cache import EmbeddingCache
from czb.models.docker.contract import (
    MAX_JSON_DEPTH,
    MAX_REASON_CHARS,
    OutputLimits,
    read_output,
    read_predictions,
    read_reason,
)
from czb.models.docker.output_files import collect_output

TINY_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_model"
BASE_IMAGE = os.environ.get("CZB_TEST_BASE_IMAGE", "czb-base:bookworm")
DATASET = "synthetic_cells_tiny"  # 300 cells × 500 genes
SECRET = "TOPSECRET-7f3a9c-host-only"
EXPECTED = {"meta.json": 4 << 20, "cell_ids.json": 4 << 20, "embeddings.npy": 1 << 30}


@pytest.fixture
def secret(tmp_path):
    """A host file the container must never read or write, with an old mtime to compare."""
    path = tmp_path / "host" / "secret.json"
    path.parent.mkdir()
    # Valid JSON (an object, and a list for cell_ids): a reader that followed the link
    # would accept it and copy the secret into the result.
    path.write_text(json.dumps({"secret": SECRET, "ids": [SECRET]}))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    return path


def _untouched(secret: Path) -> None:
    assert json.loads(secret.read_text())["secret"] == SECRET
    assert secret.stat().st_mtime == 1_000_000_000


def _files_under(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for item in [*dirs, *files]:
                path = Path(folder) / item
                if path.is_symlink() or path.is_file():
                    found.append(path)
    return found


def _assert_secret_absent(*roots: Path, texts: tuple[str, ...] = ()) -> None:
    for text in texts:
        assert SECRET not in text
    for path in _files_under(*roots):
        assert not path.is_symlink(), f"czb left a symbolic link: {path}"
        assert SECRET.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- crafted folders


def _valid_output(folder: Path, n: int = 4, *, meta: dict | None = None) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"cell{i}" for i in range(n)]
    np.save(folder / "embeddings.npy", np.arange(n * 3, dtype=np.float32).reshape(n, 3))
    (folder / "cell_ids.json").write_text(json.dumps(ids))
    (folder / "meta.json").write_text(json.dumps(meta or {"model": "m"}))
    return ids


@pytest.mark.parametrize("file", ["meta.json", "cell_ids.json", "embeddings.npy"])
def test_symlink_to_a_host_file_is_refused_and_never_read(tmp_path, secret, file):
    out = tmp_path / "out"
    _valid_output(out)
    (out / file).unlink()
    (out / file).symlink_to(secret)
    dest = tmp_path / "accepted"
    dest.mkdir()
    with pytest.raises(EmbeddingError, match=rf"^m: output file {file} is a symbolic link; only regular files") as e:
        collect_output(out, dest, EXPECTED, name="m")
    assert "\n" not in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(EmbeddingError, match=rf"{file} is a symbolic link"):
        read_output(out, name="m")  # the reader itself refuses, wherever it is pointed
    _untouched(secret)
    _assert_secret_absent(dest)


def test_a_dangling_or_relative_symlink_is_refused_too(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    (out / "meta.json").unlink()
    (out / "meta.json").symlink_to("cell_ids.json")  # inside the folder: still refused
    with pytest.raises(EmbeddingError, match="meta.json is a symbolic link"):
        read_output(out, name="m")
    (out / "meta.json").unlink()
    (out / "meta.json").symlink_to("/nonexistent/host/path")
    with pytest.raises(EmbeddingError, match="meta.json is a symbolic link"):
        read_output(out, name="m")


def test_hard_link_is_refused(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    os.link(out / "meta.json", out / "other-name")
    with pytest.raises(EmbeddingError, match="m: output file meta.json has 2 hard links; only files with one link"):
        collect_output(out, tmp_path, EXPECTED, name="m")


def test_fifo_is_refused_without_blocking(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    (out / "embeddings.npy").unlink()
    os.mkfifo(out / "embeddings.npy")  # opening it for reading would block forever
    dest = tmp_path / "accepted"
    dest.mkdir()
    with pytest.raises(EmbeddingError, match=r"embeddings.npy is a named pipe \(FIFO\)"):
        collect_output(out, dest, EXPECTED, name="m")
    with pytest.raises(EmbeddingError, match=r"embeddings.npy is a named pipe"):
        read_output(out, name="m")


def test_device_file_is_refused(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    (out / "meta.json").unlink()
    try:
        os.mknod(out / "meta.json", 0o644 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device file here: {e}")
    with pytest.raises(EmbeddingError, match="meta.json is a character device"):
        collect_output(out, tmp_path, EXPECTED, name="m")


def test_folder_in_place_of_a_file_is_refused(tmp_path, secret):
    out = tmp_path / "out"
    _valid_output(out)
    (out / "cell_ids.json").unlink()
    (out / "cell_ids.json").mkdir()
    (out / "cell_ids.json" / "inner").symlink_to(secret)
    with pytest.raises(EmbeddingError, match="cell_ids.json is a folder; only regular files"):
        collect_output(out, tmp_path, EXPECTED, name="m")


def test_unexpected_entries_are_ignored_never_read_or_copied(tmp_path, secret):
    out = tmp_path / "out"
    ids = _valid_output(out)
    (out / "key.json").symlink_to(secret)
    (out / "container.log").symlink_to(secret)
    os.mkfifo(out / "pipe")
    (out / "sub").mkdir()
    (out / "sub" / "link").symlink_to(secret)
    for i in range(2000):
        (out / f"junk{i}").write_bytes(b"")
    dest = tmp_path / "accepted"
    dest.mkdir()
    copied = collect_output(out, dest, EXPECTED, name="m")
    assert sorted(copied) == ["cell_ids.json", "embeddings.npy", "meta.json"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(copied)
    assert all(p.is_file() and not p.is_symlink() for p in dest.iterdir())
    assert list(read_output(dest, name="m").cell_ids) == ids
    _untouched(secret)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("meta.json", b" " * ((4 << 20) + 1), r"meta.json is 4194305 bytes, over its limit of 4194304 bytes"),
        ("meta.json", b"[" * 100_000 + b"]" * 100_000, rf"meta.json is refused \(nested more than {MAX_JSON_DEPTH} levels deep\)"),
        ("meta.json", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, r"meta.json is refused \(nested more than"),
        ("meta.json", b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), r"meta.json is refused \(nested more than"),
        ("meta.json", b"\xff\xfe garbage", r"meta.json is refused \((not UTF-8|invalid JSON|not valid JSON)"),
        ("meta.json", b'{"secret": "' + SECRET.encode() + b'"', r"meta.json is refused \(invalid JSON at line 1 column \d+: Expecting"),
        ("meta.json", b"9" * 5000, r"meta.json is refused \(not valid JSON"),
        ("cell_ids.json", b"[" * 100_000, r"cell_ids.json is refused \(nested more than"),
    ],
    ids=["oversize", "deep-list", "deep-object", "just-too-deep", "not-utf8", "truncated", "huge-int", "deep-ids"],
)
def test_bad_json_is_one_clean_line_that_never_quotes_the_file(tmp_path, file, content, message):
    out = tmp_path / "out"
    _valid_output(out)
    (out / file).write_bytes(content)
    with pytest.raises(EmbeddingError, match=message) as e:
        read_output(out, name="m", limits=OutputLimits(meta_bytes=4 << 20))
    assert "\n" not in str(e.value) and SECRET not in str(e.value)
    assert len(str(e.value)) < 300


def test_json_nested_to_the_limit_is_accepted(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    nested: object = 1
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = [nested]
    (out / "meta.json").write_text(json.dumps({"deep": nested, "nan": float("nan"), "big": 1e308}))
    meta = read_output(out, name="m").meta
    assert meta["nan"] is None and meta["big"] == 1e308  # NaN becomes null: results stay JSON
    assert json.loads(json.dumps(meta, allow_nan=False)) == meta


def test_sparse_terabyte_npy_is_refused_by_size_before_reading(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    with open(out / "embeddings.npy", "r+b") as f:
        f.truncate(1 << 40)  # sparse: costs nothing on disk, a terabyte to read
    limits = OutputLimits.for_cells([f"cell{i}" for i in range(4)])
    with pytest.raises(EmbeddingError, match=r"embeddings.npy is 1099511627776 bytes, over its limit"):
        collect_output(out, tmp_path, limits.embedding_files(), name="m")
    with pytest.raises(EmbeddingError, match="over its limit"):
        read_output(out, name="m", limits=limits)


@pytest.mark.parametrize(
    ("header_shape", "data_rows", "message"),
    [
        ((4, 3), 2, r"embeddings.npy is \d+ bytes; its header describes \d+"),  # truncated data
        ((4, 3), 6, r"embeddings.npy is \d+ bytes; its header describes \d+"),  # trailing data
        ((4, 1 << 20), 0, r"embeddings.npy has 1048576 columns; at most 32768"),
        ((4, 3, 2), 4, r"has shape \(4, 3, 2\)"),
    ],
)
def test_npy_header_that_lies_is_refused_without_allocating(tmp_path, header_shape, data_rows, message):
    out = tmp_path / "out"
    _valid_output(out)
    header = {"descr": "<f4", "fortran_order": False, "shape": header_shape}
    with open(out / "embeddings.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(np.zeros((data_rows, 3), np.float32).tobytes())
    with pytest.raises(EmbeddingError, match=message):
        read_output(out, name="m")


def test_fortran_ordered_npy_is_read_right(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    values = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    np.save(out / "embeddings.npy", values)
    np.testing.assert_array_equal(read_output(out, name="m").values, values)


def test_cell_ids_not_sent_are_refused_without_echoing_them(tmp_path):
    out = tmp_path / "out"
    _valid_output(out)
    (out / "cell_ids.json").write_text(json.dumps(["cell0", "\x1b[31m" + SECRET, "cell2", "cell3"]))
    with pytest.raises(EmbeddingError, match="1 of 4 IDs in cell_ids.json are not cells of the dataset") as e:
        read_output(out, name="m", known_cells=pd.Index([f"cell{i}" for i in range(4)]))
    assert SECRET not in str(e.value) and "\x1b" not in str(e.value)
    (out / "cell_ids.json").write_text(json.dumps(["cell0"] * 4))
    with pytest.raises(EmbeddingError, match="cell_ids.json lists 3 duplicated cell IDs"):
        read_output(out, name="m", known_cells=pd.Index([f"cell{i}" for i in range(4)]))
    with pytest.raises(EmbeddingError, match="cell_ids.json lists 4 cells; the request sent 2"):
        read_output(out, name="m", limits=OutputLimits(max_rows=2))


def test_reason_is_one_clean_bounded_line(tmp_path, secret):
    out = tmp_path / "out"
    out.mkdir()
    (out / "reason.json").write_text(json.dumps(
        {"reason": "bad\x1b[2J\x1b]0;owned\x07 news\r\nline two\u202eevil\t" + "x" * 5000}))
    reason = read_reason(out, name="m")
    assert reason.startswith("bad [2J ]0;owned news line two evil x")
    assert len(reason) == MAX_REASON_CHARS and reason.endswith("\u2026")
    assert all(c.isprintable() for c in reason)
    (out / "reason.json").unlink()
    (out / "reason.json").symlink_to(secret)
    with pytest.raises(EmbeddingError, match="reason.json is a symbolic link"):
        read_reason(out, name="m")
    (out / "reason.json").unlink()
    (out / "reason.json").write_bytes(b'{"reason":' * 5_000)
    with pytest.raises(EmbeddingError, match=r"reason.json is refused \(nested more than"):
        read_reason(out, name="m")
    _untouched(secret)


def test_container_log_is_printable_and_bounded(tmp_path, monkeypatch):
    """The image's log reaches the terminal, the result and a host file: no terminal
    escapes, no unbounded line held in memory, no unbounded file."""
    import collections

    monkeypatch.setattr(docker_engine, "MAX_LOG_BYTES", 1 << 20)
    chunks = [b"hello \x1b[2J\x1b]0;title\x07 \xe2\x80\xae world\r\n", b"x" * (3 << 20), b"\nend\n"]
    container = SimpleNamespace(logs=lambda **_kw: iter(chunks))
    tail: collections.deque[str] = collections.deque(maxlen=docker_engine.LOG_TAIL_LINES)
    shown: list[str] = []
    log_file = tmp_path / "container.log"
    docker_engine._follow_logs(container, tail, shown.append, log_file)
    assert shown[0] == "hello ?[2J?]0;title? ? world"
    assert all(c.isprintable() for line in [*shown, *tail] for c in line)
    assert max(map(len, [*shown, *tail])) <= docker_engine.MAX_LOG_LINE_CHARS + 20
    assert shown[-1].startswith("[czb: the container's log passed 1 MiB")
    assert tail[-1] == "end"  # the last lines are kept for the failure message
    assert log_file.stat().st_size < (1 << 20) + 2 * docker_engine.MAX_LOG_LINE_CHARS * 4


def test_build_context_keeps_links_as_links(tmp_path, secret):
    """A link in a model's container folder never copies a host file into the image."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "Dockerfile").write_text("FROM scratch\nCOPY model/ /m/\n")
    (folder / "key").symlink_to(secret)
    seen = {}

    def build(*, path, **_kw):
        context = Path(path)
        seen["link"] = os.readlink(context / "model" / "key")
        seen["files"] = [p.read_bytes() for p in context.rglob("*") if p.is_file() and not p.is_symlink()]
        return iter([{"stream": "built\n"}])

    engine = SimpleNamespace(
        api=SimpleNamespace(build=build),
        images=SimpleNamespace(get=lambda tag: SimpleNamespace(id="sha256:" + "d" * 64, attrs={})))
    docker_engine.build_image(engine, context_parts={"model": folder}, dockerfile="model/Dockerfile",
                              tag="t:1", build_args={}, log=lambda _line: None)
    assert seen["link"] == str(secret)
    assert not any(SECRET.encode() in content for content in seen["files"])


# --------------------------------------------------------------------------- the cache


def test_cache_writes_its_own_files_only_as_new_files(tmp_path, secret):
    cache = EmbeddingCache(tmp_path / "cache")
    folder = tmp_path / "accepted"
    _valid_output(folder)
    (folder / "key.json").symlink_to(secret)  # a folder that is not czb's: refused whole
    with pytest.raises(EmbeddingError, match="holds key.json, which is not an accepted output file"):
        cache.put("k" * 64, folder, {"a": 1})
    _untouched(secret)
    (folder / "key.json").unlink()
    log = tmp_path / "container.log"
    log.write_text("a line\n")
    entry = cache.put("k" * 64, folder, {"a": 1}, log_file=log)
    assert sorted(p.name for p in entry.iterdir()) == [
        "cell_ids.json", "container.log", "embeddings.npy", "key.json", "meta.json"]
    assert (entry / "container.log").read_text() == "a line\n"


def test_cache_get_never_follows_a_link(tmp_path, secret):
    cache = EmbeddingCache(tmp_path / "cache")
    folder = tmp_path / "accepted"
    _valid_output(folder)
    entry = cache.put("k" * 64, folder, {"a": 1})
    (entry / "meta.json").unlink()
    (entry / "meta.json").symlink_to(secret)
    assert cache.get("k" * 64, name="m") is None  # damaged: dropped, never read
    assert not os.path.lexists(entry)
    _untouched(secret)
    # An entry that is itself a link is dropped (the link, not its target).
    target = tmp_path / "elsewhere"
    _valid_output(target)
    cache.path("j" * 64).symlink_to(target, target_is_directory=True)
    assert cache.get("j" * 64, name="m") is None
    assert not os.path.lexists(cache.path("j" * 64)) and (target / "meta.json").exists()


# --------------------------------------------------------------------------- predictions.h5ad


def _predictions(folder: Path, rows=("A", "B"), genes=("g1", "g2", "g3")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ad.AnnData(X=np.arange(len(rows) * len(genes), dtype=np.float32).reshape(len(rows), -1),
               obs=pd.DataFrame(index=list(rows)), var=pd.DataFrame(index=list(genes))).write_h5ad(
        folder / "predictions.h5ad")
    (folder / "meta.json").write_text("{}")


def test_predictions_symlink_is_refused(tmp_path):
    _predictions(tmp_path / "real")
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    (out / "predictions.h5ad").symlink_to(tmp_path / "real" / "predictions.h5ad")
    with pytest.raises(EmbeddingError, match="predictions.h5ad is a symbolic link"):
        read_predictions(out, name="m", rows=["A", "B"], genes=["g1", "g2", "g3"])


@pytest.mark.parametrize("how", ["external_link", "external_storage", "soft_link", "huge_fill"])
def test_predictions_that_point_outside_the_file_or_claim_too_much_are_refused(tmp_path, secret, how):
    host_h5 = tmp_path / "host" / "secret.h5"
    with h5py.File(host_h5, "w") as f:
        f["X"] = np.full((2, 3), 7.0, dtype=np.float32)
    out = tmp_path / "out"
    _predictions(out)
    with h5py.File(out / "predictions.h5ad", "a") as f:
        if how == "external_link":
            del f["X"]
            f["X"] = h5py.ExternalLink(str(host_h5), "/X")
        elif how == "external_storage":
            f.create_dataset("uns/stolen", shape=(16,), dtype="u1", external=[(str(secret), 0, 16)])
        elif how == "soft_link":
            f["uns/alias"] = h5py.SoftLink("/X")
        else:
            f.create_dataset("uns/huge", shape=(1 << 40,), dtype="f8", chunks=(1 << 16,))
    message = {"external_link": "links to another file", "external_storage": "HDF5 external storage",
               "soft_link": "is a soft link", "huge_fill": "claims 8.8 TB, over the limit"}[how]
    with pytest.raises(EmbeddingError, match=message) as e:
        read_predictions(out, name="m", rows=["A", "B"], genes=["g1", "g2", "g3"])
    assert SECRET not in str(e.value) and "\n" not in str(e.value)
    assert "predictions.h5ad" in str(e.value) and "czb-predictions-" not in str(e.value)


def test_predictions_with_a_corrupt_csr_fail_cleanly_in_a_fresh_process(tmp_path):
    """A CSR X with an out-of-range index or a broken indptr must not crash natively."""
    import scipy.sparse as sp

    for case in ("indices", "indptr"):
        out = tmp_path / case
        out.mkdir()
        ad.AnnData(X=sp.csr_matrix(np.eye(2, 3, dtype=np.float32)), obs=pd.DataFrame(index=["A", "B"]),
                   var=pd.DataFrame(index=["g1", "g2", "g3"])).write_h5ad(out / "predictions.h5ad")
        (out / "meta.json").write_text("{}")
        with h5py.File(out / "predictions.h5ad", "a") as f:
            if case == "indices":
                f["X/indices"][...] = np.array([5_000_000, 1], dtype=f["X/indices"].dtype)
            else:
                f["X/indptr"][...] = np.array([0, 2, 1], dtype=f["X/indptr"].dtype)
    script = (
        "import sys\nfrom pathlib import Path\nfrom czb.core.errors import EmbeddingError\n"
        "from czb.models.docker.contract import read_predictions\n"
        "for case in ('indices', 'indptr'):\n"
        "    try:\n"
        "        read_predictions(Path(sys.argv[1]) / case, name='m', rows=['A', 'B'], genes=['g1', 'g2', 'g3'])\n"
        "    except EmbeddingError as e:\n"
        "        print('refused:', e)\n"
        "    else:\n"
        "        print('accepted', case)\n"
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: m: predictions.h5ad") for line in lines), done.stdout
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- through the CLI, faked engine


def _config(tmp_path: Path, models: dict[str, dict]) -> Path:
    """A config folder with docker models sharing one image, each with its own parameters."""
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    lines = ["models:"]
    for name, parameters in models.items():
        lines += [
            f"  {name}:",
            "    kind: docker",
            f"    container: {TINY_DIR}",
            "    image: czb-test/hostile:1",
            "    gene_id_type: ensembl",
            "    input: raw_counts",
            "    organisms: [human]",
            "    resources: {gpu: false, memory_gb: 1, timeout_s: 120}",
            f"    parameters: {json.dumps(parameters)}",
        ]
    (config / "models.yaml").write_text("\n".join(lines) + "\n")
    return config


def _plant(out: Path, inp: Path, request: dict, weights: Path | None) -> int:
    """The faked container: valid outputs, then whatever ``parameters.mode`` asks for."""
    params = request["parameters"]
    mode, secret = params["mode"], params.get("secret", "/nonexistent")
    adata = ad.read_h5ad(inp / "dataset.h5ad")
    rng = np.random.default_rng(0)
    np.save(out / "embeddings.npy", rng.normal(size=(adata.n_obs, 8)).astype(np.float32))
    (out / "cell_ids.json").write_text(json.dumps(list(adata.obs_names)))
    meta = {"model": request["model"], "weights_checksum": params.get("weights_checksum")}
    if mode == "readme_checksum":  # sha256 of the one weights file, as the README allows
        (only,) = [p for p in weights.rglob("*") if p.is_file()]
        meta["weights_checksum"] = hashlib.sha256(only.read_bytes()).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta))
    if mode.startswith("link:"):
        file = mode.removeprefix("link:")
        (out / file).unlink(missing_ok=True)
        (out / file).symlink_to(secret)
    elif mode == "czb_files":
        for file in ("key.json", "container.log", "accepted", "reason.json"):
            (out / file).symlink_to(secret)
    elif mode == "hardlink":
        os.link(out / "meta.json", out / "meta-copy.json")
    elif mode == "fifo":
        (out / "embeddings.npy").unlink()
        os.mkfifo(out / "embeddings.npy")
    elif mode == "folder":
        (out / "cell_ids.json").unlink()
        (out / "cell_ids.json").mkdir()
        os.chmod(out / "cell_ids.json", 0)
    elif mode == "deep_json":
        (out / "meta.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    elif mode == "flood":
        for i in range(5000):
            (out / f"f{i}").write_bytes(b"")
    elif mode == "foreign_ids":
        ids = list(adata.obs_names)
        ids[0] = "\x1b[2J" + SECRET
        (out / "cell_ids.json").write_text(json.dumps(ids))
    elif mode in ("fail_reason_link", "na_reason_link"):
        (out / "meta.json").unlink()
        (out / "reason.json").symlink_to(secret)
        return 99 if mode.startswith("na") else 1
    elif mode == "fail_reason_escapes":
        (out / "meta.json").unlink()
        (out / "reason.json").write_text(json.dumps({"reason": "[/]\x1b[2Jboom\n" + "y" * 2000}))
        return 1
    elif mode == "surrogates":  # valid JSON that no UTF-8 writer can write back as it is
        (out / "meta.json").write_text(
            '{"model": "x", "s": "\\ud800\\udfff\\ud800", "k\\ud800": 1, "l": ["\\udc00", {"\\udbff": "\\ud800"}]}')
    elif mode == "fail_reason_surrogates":
        (out / "meta.json").unlink()
        (out / "reason.json").write_text('{"reason": "broke \\ud800 here"}')
        return 1
    elif mode == "deep_meta":  # as deep as meta.json may be
        inner = "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1)
        (out / "meta.json").write_text(f'{{"model": "x", "weights_checksum": null, "deep": {inner}}}')
    elif mode == "deep_dirs":  # a tree deeper than Python's recursion, with locked folders and a link out
        fd = os.open(out, os.O_RDONLY)
        for level in range(params["depth"]):
            os.mkdir("d", dir_fd=fd)
            if level % 1000 == 0:
                os.symlink(str(Path(secret).parent), "out", dir_fd=fd)
                os.mkdir("locked", dir_fd=fd)
                os.mkdir(f"locked/{level}", dir_fd=fd)
                os.chmod("locked", 0, dir_fd=fd)
            below = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(fd)
    return 0


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    """``docker_engine`` without Docker: :func:`_plant` writes into the host's output folder."""
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "cache"))

    def run_container(engine, image, *, mounts, limits, name, log=None, log_file=None, on_start=None,
                      environment=None):
        out, inp = mounts["/output"][0], mounts["/input"][0]
        weights = mounts["/weights"][0] if "/weights" in mounts else None
        request = json.loads((inp / "request.json").read_text())
        code = _plant(out, inp, request, weights)
        log_file.write_text("planted\n")
        return docker_engine.ContainerRun(exit_code=code, log_tail=["planted"], runtime_s=0.01)

    monkeypatch.setattr(docker_engine, "client", lambda: object())
    monkeypatch.setattr(docker_engine, "image_info",
                        lambda engine, tag, *, model: docker_engine.ImageInfo(tag=tag, id="sha256:" + "c" * 64))
    monkeypatch.setattr(docker_engine, "run_container", run_container)
    return SimpleNamespace(cache=tmp_path / "cache")


def _run_cli(tmp_path: Path, models: list[str], config: Path, *extra: str, out: Path | None = None):
    out = out or tmp_path / "results"
    result = CliRunner().invoke(app, [
        "run", *[a for m in models for a in ("-m", m)], "-t", "clustering", "-d", DATASET, "--seeds", "0",
        "--no-baseline", "--format", "json", "--output-dir", str(out), "--config-dir", str(config), *extra,
    ])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    records = {r["model"]["name"]: r for r in json.loads(result.stdout)} if result.stdout.strip() else {}
    return result, records, out


HOSTILE_FAILURES = {
    "link:meta.json": "output file meta.json is a symbolic link",
    "link:cell_ids.json": "output file cell_ids.json is a symbolic link",
    "link:embeddings.npy": "output file embeddings.npy is a symbolic link",
    "hardlink": "output file meta.json has 2 hard links",
    "fifo": r"output file embeddings.npy is a named pipe \(FIFO\)",
    "folder": "output file cell_ids.json is a folder",
    "deep_json": r"meta.json is refused \(nested more than 32 levels deep\)",
    "foreign_ids": "1 of 300 IDs in cell_ids.json are not cells of the dataset",
    "fail_reason_link": r"container failed \(exit code 1\); output file reason.json is a symbolic link",
    "na_reason_link": r"exited 99 \(not applicable\), but output file reason.json is a symbolic link",
}


def test_hostile_outputs_fail_one_line_through_the_cli(tmp_path, secret, fake_engine):
    names = {f"hostile{i}": mode for i, mode in enumerate(HOSTILE_FAILURES)}
    config = _config(tmp_path, {n: {"mode": m, "secret": str(secret)} for n, m in names.items()})
    result, records, out = _run_cli(tmp_path, list(names), config)
    assert result.exit_code == 1, result.output
    for model, mode in names.items():
        record = records[model]
        assert record["status"] == "failed", (mode, record["error"])
        assert "\n" not in record["error"].split("; last log lines:")[0]
        assert re.search(HOSTILE_FAILURES[mode], record["error"]), (mode, record["error"])
        assert record["model"]["image_digest"] != "unresolved"  # the failed run knew its image
    _untouched(secret)
    _assert_secret_absent(out, fake_engine.cache, texts=(result.stdout, result.stderr))
    assert not list((fake_engine.cache / "embeddings").glob("*"))  # nothing hostile cached
    assert list((fake_engine.cache / "runs").iterdir()) == []  # work folders removed, locked ones too


def test_links_to_czb_own_files_are_ignored_and_never_written_through(tmp_path, secret, fake_engine):
    config = _config(tmp_path, {"sly": {"mode": "czb_files", "secret": str(secret)},
                                "flood": {"mode": "flood"}})
    result, records, out = _run_cli(tmp_path, ["sly", "flood"], config)
    assert result.exit_code == 0, result.output
    assert records["sly"]["status"] == "ok" and records["flood"]["status"] == "ok"
    _untouched(secret)
    _assert_secret_absent(out, fake_engine.cache, texts=(result.stdout, result.stderr))
    entries = list((fake_engine.cache / "embeddings").iterdir())
    assert len(entries) == 2
    for entry in entries:
        assert sorted(p.name for p in entry.iterdir()) == [
            "cell_ids.json", "container.log", "embeddings.npy", "key.json", "meta.json"]
        assert json.loads((entry / "key.json").read_text())["image_id"] == "sha256:" + "c" * 64
    # The cached runs are reused, read the same careful way (by a run on another store).
    again, records, _ = _run_cli(tmp_path, ["sly"], config, out=tmp_path / "elsewhere")
    assert again.exit_code == 0 and records["sly"]["model"]["info"]["cache"] == "hit"
    _untouched(secret)


def test_reason_with_escapes_and_markup_is_one_plain_line(tmp_path, fake_engine):
    config = _config(tmp_path, {"loud": {"mode": "fail_reason_escapes"}})
    result, records, _ = _run_cli(tmp_path, ["loud"], config)
    assert result.exit_code == 1, result.output
    error = records["loud"]["error"]
    reason = error.split("container failed (exit code 1): ")[1].split("; last log lines:")[0]
    assert reason.startswith("[/] [2Jboom yyy") and len(reason) == MAX_REASON_CHARS
    assert "\x1b" not in result.output and "\x1b" not in json.dumps(records)
    assert "failed: synthetic_cells_tiny/loud: embedding failed: loud: container failed" in result.stderr


# --------------------------------------------------------------------------- weights_checksum


def _weights(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"weights bytes " * 100)
    return folder


def test_readme_single_file_sha256_is_accepted(tmp_path, fake_engine):
    weights = _weights(tmp_path)
    config = _config(tmp_path, {"readme": {"mode": "readme_checksum"}})
    result, records, _ = _run_cli(tmp_path, ["readme"], config, "--weights", str(weights))
    assert result.exit_code == 0, result.output
    record = records["readme"]
    assert record["status"] == "ok"
    assert record["model"]["info"]["container_meta"]["weights_checksum"] == hashlib.sha256(
        (weights / "model.bin").read_bytes()).hexdigest()


@pytest.mark.parametrize("reported", ["0" * 64, "not a digest \x1b[2J" + SECRET])
def test_wrong_weights_checksum_says_what_was_expected_and_how(tmp_path, fake_engine, reported):
    from czb.models.weights import directory_checksum

    weights = _weights(tmp_path)
    config = _config(tmp_path, {"wrong": {"mode": "ok", "weights_checksum": reported}})
    result, records, _ = _run_cli(tmp_path, ["wrong"], config, "--weights", str(weights))
    assert result.exit_code == 1
    error = records["wrong"]["error"]
    folder_digest = directory_checksum(weights)
    file_digest = hashlib.sha256((weights / "model.bin").read_bytes()).hexdigest()
    assert f"must be {folder_digest} (the folder digest: sha256 over every file" in error
    assert f"or {file_digest} (the plain sha256 of the folder's only file), or null" in error
    assert SECRET not in error and "\x1b" not in error
    shown = "0" * 64 if reported == "0" * 64 else "a value that is not a sha256 hex digest"
    assert f"meta.json reports weights_checksum {shown}," in error
    assert not list((fake_engine.cache / "embeddings").glob("*"))  # a failed check caches nothing


def test_readme_reference_snippet_computes_the_staged_checksum(tmp_path):
    """The README's snippet, run as written, gives what the host computes."""
    from czb.models.weights import directory_checksum

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Wrap your own model")[1].split("\n## ")[0]
    import textwrap

    snippet = textwrap.dedent(section.split("```python\n")[1].split("```")[0])
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the README's own example
    folder = tmp_path / "w"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "b.pt").write_bytes(b"1")
    (folder / "a-c.json").write_bytes(b"2")  # string order and path-component order differ here
    (folder / "z.txt").write_bytes(b"3")
    assert namespace["weights_checksum"](folder) == directory_checksum(folder)


# --------------------------------------------------------------------------- a real engine


_HOSTILE_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY model/hostile.py /opt/hostile/hostile.py
USER 10001
ENTRYPOINT ["python3", "/opt/hostile/hostile.py"]
"""

# Standard library only (the base image has no numpy or h5py), so the test passes the
# dataset's cell IDs in parameters.cell_ids (a JSON list in a string parameter).
_HOSTILE_SCRIPT = r'''
import json, os, random, struct, sys

request = json.load(open("/input/request.json"))
params = request["parameters"]
mode, secret, ids = params["mode"], params["secret"], json.loads(params["cell_ids"])
out = "/output"


def save_npy(path, rows, cols):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, cols)
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        rng = random.Random(0)
        for _ in range(rows):
            f.write(struct.pack("<%df" % cols, *[rng.gauss(0, 1) for _ in range(cols)]))


def link(name):
    path = os.path.join(out, name)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(secret, path)


save_npy(os.path.join(out, "embeddings.npy"), len(ids), 4)
json.dump(ids, open(os.path.join(out, "cell_ids.json"), "w"))
json.dump({"model": request["model"], "weights_checksum": None}, open(os.path.join(out, "meta.json"), "w"))
print("planting", mode, "\x1b[2J\x1b]0;title\x07", flush=True)
if mode == "links":
    for name in ("meta.json", "key.json", "container.log", "reason.json"):
        link(name)
elif mode == "czb_files":
    for name in ("key.json", "container.log", "accepted"):
        link(name)
    os.mkfifo(os.path.join(out, "pipe"))
    for i in range(1000):
        open(os.path.join(out, "junk%d" % i), "w").close()
elif mode == "fifo":
    os.unlink(os.path.join(out, "embeddings.npy"))
    os.mkfifo(os.path.join(out, "embeddings.npy"))
elif mode == "reason_link":
    os.unlink(os.path.join(out, "meta.json"))
    link("reason.json")
    sys.exit(3)
'''


@pytest.mark.docker
def test_hostile_image_through_the_cli(tmp_path, secret, monkeypatch):
    """A real image plants links to a host file (by its host path), a FIFO and junk."""
    from czb.data.reading import load_dataset
    from czb.models.docker.images import build_model_image
    from czb.specs.catalog import Catalog

    engine = docker_engine_or_skip()
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "cache"))
    container = tmp_path / "hostile"
    container.mkdir()
    (container / "Dockerfile").write_text(_HOSTILE_DOCKERFILE)
    (container / "hostile.py").write_text(_HOSTILE_SCRIPT)
    ids = list(load_dataset(Catalog.load([]).dataset(DATASET)).adata.obs_names)
    modes = {"links": "hostile_links", "czb_files": "hostile_czb_files", "fifo": "hostile_fifo",
             "reason_link": "hostile_reason"}
    config = _config(tmp_path, {name: {"mode": mode, "secret": str(secret), "cell_ids": json.dumps(ids)}
                                for mode, name in modes.items()})
    text = (config / "models.yaml").read_text().replace(f"container: {TINY_DIR}", f"container: {container}")
    (config / "models.yaml").write_text(text)
    spec = Catalog.load([config]).model("hostile_links")
    build_model_image(spec, base_image=BASE_IMAGE, log=lambda _line: None)

    result, records, out = _run_cli(tmp_path, list(modes.values()), config)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    links, czb_files = records["hostile_links"], records["hostile_czb_files"]
    fifo, reason = records["hostile_fifo"], records["hostile_reason"]
    assert links["status"] == "failed" and "output file meta.json is a symbolic link" in links["error"]
    assert czb_files["status"] == "ok", czb_files["error"]
    assert fifo["status"] == "failed" and "output file embeddings.npy is a named pipe (FIFO)" in fifo["error"]
    assert reason["status"] == "failed"
    assert "container failed (exit code 3); output file reason.json is a symbolic link" in reason["error"]
    for record in (links, fifo):
        assert "\n" not in record["error"]
    _untouched(secret)
    _assert_secret_absent(out, tmp_path / "cache", texts=(result.stdout, result.stderr))
    assert "\x1b" not in result.output  # the image's terminal escapes never reach the terminal
    (entry,) = (tmp_path / "cache" / "embeddings").iterdir()  # only the well-formed run is cached
    assert sorted(p.name for p in entry.iterdir()) == [
        "cell_ids.json", "container.log", "embeddings.npy", "key.json", "meta.json"]
    assert engine.containers.list(all=True, filters={"label": f"org.czb.host-pid={os.getpid()}"}) == []


# --------------------------------------------------------------------------- text and depth czb can write back


def test_parse_json_replaces_lone_surrogates_in_keys_values_and_lists():
    from czb.core import untrusted
    text = ('{"s": "a\\ud800b", "k\\udfff": 1, "pair": "\\ud83d\\ude00", "l": ["\\udc00", [{"\\udbff": "\\uD800"}]],'
            ' "escaped": "\\\\ud800"}')
    for data in (text, text.encode()):
        value = untrusted.parse_json(data, max_depth=8)
        assert value == {"s": "a\ufffdb", "k\ufffd": 1, "pair": "\U0001f600", "l": ["\ufffd", [{"\ufffd": "\ufffd"}]],
                         "escaped": "\\ud800"}
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # writable as UTF-8 now
    assert untrusted.parse_json('"\\ud800"', max_depth=1) == "\ufffd"
    # A surrogate encoded in the bytes themselves (CESU-8 style) is replaced too.
    assert untrusted.parse_json(b'["\xed\xa0\x80"]', max_depth=1) == ["\ufffd"]
    # Deep documents are walked without recursion.
    deep = "[" * 900 + '"\\ud800"' + "]" * 900
    value = untrusted.parse_json(deep, max_depth=1000)
    for _ in range(900):
        value = value[0]
    assert value == "\ufffd"


def _report_formats(tmp_path: Path, folder: Path) -> None:
    """``czb report`` reads ``folder`` in every format, in a clean run."""
    for fmt in ("csv", "md", "html"):
        target = tmp_path / f"report.{fmt}"
        result = CliRunner().invoke(app, ["report", str(folder), "--format", fmt, "-o", str(target)])
        assert result.exit_code == 0, (fmt, result.output)
        assert "Traceback" not in result.output and target.stat().st_size > 0
    result = CliRunner().invoke(app, ["report", str(folder), "--format", "table"])
    assert result.exit_code == 0, result.output


def test_lone_surrogates_in_container_json_lose_no_result(tmp_path, fake_engine):
    from czb.core.records import read_result

    config = _config(tmp_path, {"sur": {"mode": "surrogates"}, "good": {"mode": "ok"},
                                "why": {"mode": "fail_reason_surrogates"}})
    result, records, out = _run_cli(tmp_path, ["sur", "good", "why"], config)
    assert result.exit_code == 1, result.output  # "why" fails, as its container says
    assert records["sur"]["status"] == "ok" and records["good"]["status"] == "ok"
    meta = records["sur"]["model"]["info"]["container_meta"]
    assert meta["s"] == "\U000103ff\ufffd" and meta["k\ufffd"] == 1 and meta["l"] == ["\ufffd", {"\ufffd": "\ufffd"}]
    assert "broke \ufffd here" in records["why"]["error"]
    files = sorted((out / "results").glob("*.json"))
    assert {read_result(f).model.name for f in files} == {"sur", "good", "why"}
    _report_formats(tmp_path, out)


def test_result_json_with_lone_surrogates_reports_in_every_format(tmp_path, fake_engine):
    config = _config(tmp_path, {"good": {"mode": "ok"}})
    result, _, out = _run_cli(tmp_path, ["good"], config)
    assert result.exit_code == 0, result.output
    (path,) = (out / "results").glob("*.json")
    record = json.loads(path.read_text())
    record["model"]["info"]["\ud800key"] = ["\udfff", {"x": "\ud800"}]
    record["model"]["parameters"]["note"] = "a\udc00b"
    record["command"] = "czb run \ud800"
    path.write_text(json.dumps(record))  # ASCII with \ud800 escapes: valid JSON
    _report_formats(tmp_path, out)


def test_store_json_with_lone_surrogates_or_deep_nesting_is_read_safely(tmp_path):
    from czb.pipeline.store import StoreError, open_store

    store = open_store(tmp_path / "store")
    store.write_bytes("scores/a.json", b'{"status": "ok", "k\\ud800": ["\\udfff"]}')
    assert store.read_json("scores/a.json") == {"status": "ok", "k\ufffd": ["\ufffd"]}
    store.write_bytes("scores/b.json", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(StoreError, match=r"scores/b.json is not valid JSON \(nested more than"):
        store.read_json("scores/b.json")


def test_deepest_accepted_meta_is_written_and_read_back(tmp_path, fake_engine):
    """What czb accepts from a container, it can write into a result and read again."""
    from czb.core import records as R
    from czb.core.untrusted import json_depth

    config = _config(tmp_path, {"deep": {"mode": "deep_meta"}})
    result, records, out = _run_cli(tmp_path, ["deep"], config)
    assert result.exit_code == 0, result.output
    assert json_depth(records["deep"]["model"]["info"]["container_meta"]) == MAX_JSON_DEPTH
    (path,) = (out / "results").glob("*.json")
    assert R.read_result(path).model.name == "deep"
    _report_formats(tmp_path, out)
    # One level more is refused at the boundary, as one line.
    folder = tmp_path / "deeper"
    _valid_output(folder)
    (folder / "meta.json").write_text("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(EmbeddingError, match=rf"nested more than {MAX_JSON_DEPTH} levels deep"):
        read_output(folder, name="m")


def test_one_record_that_cannot_be_written_loses_no_other(tmp_path, fake_engine, monkeypatch):
    from czb.core import records as R
    from czb.core.errors import ResultsError
    result_json = R.result_json

    def failing_for_bad(record, **kwargs):
        if record.model.name == "bad":
            msg = "cannot write result: No space left on device"
            raise ResultsError(msg)
        return result_json(record, **kwargs)

    monkeypatch.setattr(R, "result_json", failing_for_bad)
    config = _config(tmp_path, {"bad": {"mode": "ok"}, "good": {"mode": "ok"}})
    out = tmp_path / "results"
    result = CliRunner().invoke(app, [
        "run", "-m", "bad", "-m", "good", "-t", "clustering", "-t", "embedding", "-d", DATASET, "--seeds", "0",
        "--no-baseline", "--output-dir", str(out), "--config-dir", str(config)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 result(s) could not be written" in errors[0], result.stderr
    written = sorted(p.name.split("__")[1:3] for p in (out / "results").glob("*.json"))
    assert written == [["good", "clustering"], ["good", "embedding"]]


# --------------------------------------------------------------------------- removing what containers leave


def test_remove_tree_handles_any_depth_and_never_follows_links(tmp_path, secret):
    from czb.models.workdirs import remove_tree

    tree = tmp_path / "tree"
    tree.mkdir()
    try:
        fd = os.open(tree, os.O_RDONLY)
        for level in range(6000):  # deeper than Python's recursion and than PATH_MAX
            os.mkdir("d", dir_fd=fd)
            os.close(os.open("f", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=fd))
            if level % 1500 == 0:
                os.symlink(str(secret.parent), "outside", dir_fd=fd)
                os.symlink(str(secret), "file", dir_fd=fd)
                os.mkdir("locked", dir_fd=fd)
                os.mkdir("locked/inner", dir_fd=fd)
                os.chmod("locked/inner", 0, dir_fd=fd)
                os.chmod("locked", 0o100, dir_fd=fd)
            below = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = below
        os.close(fd)
        remove_tree(tree)
        assert not os.path.lexists(tree)
    finally:
        _remove_deep(tree)
    _untouched(secret)
    remove_tree(tree)  # gone already: nothing to do
    link = tmp_path / "link"
    link.symlink_to(secret.parent, target_is_directory=True)
    remove_tree(link)  # a link is removed itself, never what it points to
    assert not os.path.lexists(link)
    _untouched(secret)


def _remove_deep(path: Path) -> None:
    """Whatever a failing test left: pytest's own clean-up of old temporary folders
    (shutil.rmtree, recursive) would fail on a tree this deep in every later session."""
    import subprocess

    if os.path.lexists(path):
        subprocess.run(["chmod", "-R", "u+rwx", str(path)], check=False)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=False)


def test_deep_output_tree_keeps_the_run_and_leaves_no_work_folder(tmp_path, secret, fake_engine, request):
    request.addfinalizer(lambda: _remove_deep(fake_engine.cache / "runs"))
    config = _config(tmp_path, {"deep": {"mode": "deep_dirs", "depth": 5000, "secret": str(secret)}})
    result, records, _ = _run_cli(tmp_path, ["deep"], config)
    assert result.exit_code == 0, result.output
    assert records["deep"]["status"] == "ok", records["deep"]["error"]
    assert list((fake_engine.cache / "runs").iterdir()) == []
    _untouched(secret)


def test_a_work_folder_that_will_not_go_is_a_warning_not_a_failed_run(tmp_path, fake_engine, monkeypatch):
    from czb.models.docker import cache
    def cannot_remove(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache, "remove_tree", cannot_remove)
    config = _config(tmp_path, {"good": {"mode": "ok"}})
    result, records, _ = _run_cli(tmp_path, ["good"], config)
    assert result.exit_code == 0, result.output
    assert records["good"]["status"] == "ok"
    warning = " ".join(result.stderr.split())
    assert "could not remove work folder" in warning and "(Permission denied); remove it by hand" in warning


def test_stale_work_folders_of_dead_processes_are_removed_at_the_next_run(tmp_path, fake_engine):
    import subprocess
    import time

    from czb.models.workdirs import host_tag

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    runs = fake_engine.cache / "runs"
    host = host_tag()
    names = {
        "dead_here": f"m-{dead.pid}@{host}-abcd1234",
        "alive_here": f"m-1@{host}-abcd1234",  # init: alive (or not ours to judge)
        "dead_elsewhere": f"m-{dead.pid}@other.host-abcd1234",
        "untagged_old": "m-abcd1234",
        "untagged_new": "m-efgh5678",
    }
    for name in names.values():
        (runs / name / "output" / "locked").mkdir(parents=True)
        os.chmod(runs / name / "output" / "locked", 0)
    old = time.time() - 3 * 86400
    os.utime(runs / names["untagged_old"], (old, old))
    config = _config(tmp_path, {"good": {"mode": "ok"}})
    result, _, _ = _run_cli(tmp_path, ["good"], config)
    assert result.exit_code == 0, result.output
    left = sorted(p.name for p in runs.iterdir())
    assert left == sorted([names["alive_here"], names["dead_elsewhere"], names["untagged_new"]])
