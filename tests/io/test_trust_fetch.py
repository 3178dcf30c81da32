"""The dataset cache side of the trust boundary (issue 17), through the CLI.

A web page, JSON or XML error body served with status 200 must never stay in the
cache as a "dataset"; a cached or local file edited in place (size and mtime put back)
must be noticed where a spec pins its sha256; and the record must carry the digest of
the file actually read. A loopback HTTP server stands in for the remote.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import FileServer
from test_trust_data import write_h5ad
from typer.testing import CliRunner

from czb.cli import app
from czb.core.errors import DatasetWarning, FetchError
from czb.io import cache as cache_module
from czb.io.cache import cache_entries
from czb.io.content import describe_content
from czb.io.fetch import fetch

MARKER = "PAGE-CONTENT-5f2a9c-never-echoed"


@pytest.fixture
def server(file_server: FileServer) -> FileServer:
    return file_server


def serve(server: FileServer, path: str, body: bytes, content_type: str) -> None:
    server.files[path] = body
    server.content_types[path] = content_type


def specs(tmp_path: Path, uri: str, **fields) -> Path:
    spec = {"uri": uri, "organism": "human", "label_key": "cell_type", "gene_id_type": "ensembl", **fields}
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    (folder / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {"remote": spec}}))
    return folder


def run(tmp_path: Path, config: Path, *, offline: bool) -> object:
    args = ["run", "--dataset", "remote", "--task", "clustering", "--model", "pca", "--no-baseline",
            "--seeds", "0", "--config-dir", str(config), "--output-dir", str(tmp_path / "out")]
    return CliRunner().invoke(app, [*args, "--offline"] if offline else args)


def error_line(result) -> str:
    assert result.exit_code == 1, result.output[-3000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and not line.startswith(("warning:", "hint:")) and "━" not in line]  # progress bars
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def cached_files(cache: Path) -> list[Path]:
    return [p for p in (cache / "downloads").rglob("*") if p.is_file()] if (cache / "downloads").exists() else []


def cache_dir() -> Path:
    return Path(os.environ["CZB_CACHE_DIR"])


# --------------------------------------------------------------------------- wrong content


WRONG_BODIES = {
    "html": (f"<!DOCTYPE html><html><body>Sign in {MARKER}</body></html>".encode(), "text/html; charset=utf-8",
             "received an HTML page (text/html, "),
    "html_no_type": (f"\n  <html><head><title>{MARKER}</title></head></html>".encode(), "application/octet-stream",
                     "received an HTML page (application/octet-stream, "),
    "json": (json.dumps({"error": MARKER}).encode(), "application/json", "received a JSON document"),
    "s3_xml": (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code><Message>{MARKER}'
               "</Message></Error>".encode(), "application/xml", "received an XML document"),
    "empty": (b"", "application/octet-stream", "received an empty file"),
}


@pytest.mark.parametrize("kind", sorted(WRONG_BODIES))
def test_a_page_instead_of_a_dataset_is_never_cached(tmp_path, server, kind):
    body, content_type, fragment = WRONG_BODIES[kind]
    serve(server, "/data/cells.h5ad", body, content_type)
    result = run(tmp_path, specs(tmp_path, server.url("/data/cells.h5ad")), offline=False)
    line = error_line(result)
    assert fragment in line and "instead of an HDF5 file" in line and "Nothing was cached" in line
    assert MARKER not in result.stdout + result.stderr
    assert all(MARKER.encode() not in p.read_bytes() for p in cached_files(cache_dir()))
    assert not [p for p in cached_files(cache_dir()) if p.name.startswith("cells.h5ad")]
    assert cache_entries() == []
    # offline afterwards: not cached, said plainly
    line = error_line(run(tmp_path, specs(tmp_path, server.url("/data/cells.h5ad")), offline=True))
    assert "is not in the cache" in line


def test_a_page_already_in_the_cache_is_evicted_and_fetched_again(tmp_path, server):
    """An HTML page cached by an older czb is dropped on the next use, not read as a dataset."""
    good = write_h5ad(tmp_path / "good.h5ad").read_bytes()
    serve(server, "/data/cells.h5ad", good, "application/octet-stream")
    path = fetch(server.url("/data/cells.h5ad"))
    page = f"<html>{MARKER}</html>".encode().ljust(len(good), b" ")
    path.write_bytes(page)  # same size: the sidecar's size still matches
    sidecar = json.loads((path.parent / ".czb-entry.json").read_text())
    sidecar.update(cache_module.stamp(path.stat()))  # as if the page had been downloaded
    (path.parent / ".czb-entry.json").write_text(json.dumps(sidecar))
    with pytest.raises(FetchError, match="was damaged or edited in the cache .*it is an HTML page.*deleted"):
        fetch(server.url("/data/cells.h5ad"), offline=True)
    assert not path.exists()
    assert fetch(server.url("/data/cells.h5ad")).read_bytes() == good  # online: downloaded again
    path.write_bytes(page)  # the same, found online: evicted with a warning, downloaded again
    sidecar.update(cache_module.stamp(path.stat()))
    (path.parent / ".czb-entry.json").write_text(json.dumps(sidecar))
    with pytest.warns(DatasetWarning, match="damaged or edited in the cache .*downloading it again"):
        assert fetch(server.url("/data/cells.h5ad")).read_bytes() == good


def test_describe_content_never_returns_file_bytes(tmp_path):
    page = tmp_path / "x.h5ad"
    page.write_text(f"<!doctype html>{MARKER}")
    assert describe_content(page, expected="hdf5") == "an HTML page"
    text = tmp_path / "table.txt"
    text.write_text("symbol\tensembl\n")
    assert describe_content(text, expected="text") is None
    assert describe_content(page, expected="text") == "an HTML page"
    blob = tmp_path / "weights.bin"
    blob.write_bytes(b"\x00\x01binary")
    assert describe_content(blob, expected=None) is None  # unknown kind: only pages are refused
    for expected in ("hdf5", "zip", "npy", "parquet", "gzip", "text", "json", None):
        what = describe_content(page, expected=expected)
        assert what is None or MARKER not in what


# --------------------------------------------------------------------------- edited in place


def edit_in_place(path: Path) -> None:
    """Change one byte, then put size and mtime back as they were."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_local_dataset_edited_in_place_is_detected(tmp_path):
    path = write_h5ad(tmp_path / "local.h5ad")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    config = specs(tmp_path, str(path), sha256=digest)
    result = run(tmp_path, config, offline=True)
    assert result.exit_code == 0, result.output[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")]
    assert records and all(r["dataset"]["sha256"] == digest for r in records)

    edit_in_place(path)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    line = error_line(run(tmp_path, config, offline=True))
    assert str(path) in line and f"expected {digest}" in line and f"got {actual}" in line
    assert "update the spec's sha256" in line
    assert path.exists()  # the user's own file is never deleted


def test_cached_download_edited_in_place_is_detected_and_evicted(tmp_path, server):
    good = write_h5ad(tmp_path / "good.h5ad").read_bytes()
    digest = hashlib.sha256(good).hexdigest()
    serve(server, "/data/cells.h5ad", good, "application/x-hdf5")
    config = specs(tmp_path, server.url("/data/cells.h5ad"), sha256=digest)
    fetched = CliRunner().invoke(app, ["datasets", "fetch", "remote", "--config-dir", str(config)])
    assert fetched.exit_code == 0, fetched.output
    (entry,) = cache_entries()
    cached = entry["path"]
    assert run(tmp_path, config, offline=True).exit_code == 0

    edit_in_place(cached)
    actual = hashlib.sha256(cached.read_bytes()).hexdigest()
    line = error_line(run(tmp_path, config, offline=True))
    assert str(cached) in line and actual in line and digest in line
    assert "deleted" in line and "czb datasets fetch" in line
    assert not cached.exists() and cache_entries() == []

    result = run(tmp_path, config, offline=False)  # online: fetched again and used
    assert result.exit_code == 0, result.output[-2000:]
    assert hashlib.sha256(cache_entries()[0]["path"].read_bytes()).hexdigest() == digest


def test_cached_download_edited_in_place_without_a_pinned_sha256_is_also_caught(tmp_path, server):
    """The digest recorded at download time stands in for the spec's."""
    good = write_h5ad(tmp_path / "good.h5ad").read_bytes()
    serve(server, "/data/cells.h5ad", good, "application/x-hdf5")
    path = fetch(server.url("/data/cells.h5ad"))
    edit_in_place(path)
    with pytest.raises(FetchError, match="not the .* recorded when it was downloaded"):
        fetch(server.url("/data/cells.h5ad"), offline=True)


def test_hash_memo_is_not_fooled_by_a_restored_mtime(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"a" * 4096)
    cache = tmp_path / "cache"
    first = cache_module.known_sha256(path, cache_dir=cache)
    edit_in_place(path)
    assert cache_module.cached_sha256(path, cache_dir=cache) is None
    assert cache_module.known_sha256(path, cache_dir=cache) == hashlib.sha256(path.read_bytes()).hexdigest() != first


def test_record_carries_the_computed_digest_when_the_spec_pins_none(tmp_path):
    path = write_h5ad(tmp_path / "local.h5ad")
    result = run(tmp_path, specs(tmp_path, str(path)), offline=True)
    assert result.exit_code == 0, result.output[-2000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "out" / "results").glob("*.json")]
    assert records and {r["dataset"]["sha256"] for r in records} == {hashlib.sha256(path.read_bytes()).hexdigest()}


def test_special_files_are_refused_as_datasets(tmp_path):
    for special in ("/dev/zero", "/dev/stdin"):
        if not Path(special).exists():
            continue
        line = error_line(run(tmp_path, specs(tmp_path, special), offline=True))
        assert "not a regular file" in line


def test_a_valid_file_is_kept_whatever_content_type_the_server_declares(tmp_path, server):
    good = write_h5ad(tmp_path / "good.h5ad").read_bytes()
    serve(server, "/data/cells.h5ad", good, "text/html")
    assert fetch(server.url("/data/cells.h5ad")).read_bytes() == good
