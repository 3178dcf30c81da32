"""The data-file side of the trust boundary (issue 17), through the CLI on crafted files.

Corrupt, truncated or forged .h5ad files (sparse structure, sizes, links to other
files), embedding files with forged headers, a secret file named as a relationship
source, and wrong generator parameters must each end in one ``error:`` line and exit
code 1: never a native crash (134/139, -6/-11), a traceback, or a secret in any output.
Runs that could crash natively are subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from typer.testing import CliRunner

from czb.cli import app
from czb.core.errors import DatasetError, EmbeddingError
from czb.data.hdf5_checks import check_h5ad_structure
from czb.data.reading import load_dataset
from czb.data.validation import validate_dataset
from czb.specs.schema import DatasetSpec

N_CELLS, N_GENES = 60, 40
SECRET = "TOPSECRET-8d1f0c3a-do-not-print"


# --------------------------------------------------------------------------- crafted files


def counts(fmt: str = "csr") -> sp.spmatrix:
    """Integer counts, every cell with a few genes."""
    rng = np.random.default_rng(0)
    dense = rng.poisson(0.6, size=(N_CELLS, N_GENES)).astype(np.float32)
    dense[np.arange(N_CELLS), np.arange(N_CELLS) % N_GENES] += 1  # no empty cell
    return sp.csr_matrix(dense) if fmt == "csr" else sp.csc_matrix(dense)


def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(np.array(["a", "b", "c"])[np.arange(N_CELLS) % 3])},
        index=[f"cell{i}" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(N_GENES)])
    return obs, var


def write_h5ad(path: Path, *, fmt: str = "csr", where: str = "X") -> Path:
    """A small valid .h5ad with the counts at ``where`` (``X``, ``layer`` or ``raw``)."""
    obs, var = frames()
    X = counts(fmt)
    adata = ad.AnnData(X=X.copy(), obs=obs, var=var)
    if where == "layer":
        adata.layers["counts"] = X.copy()
    elif where == "raw":
        adata.raw = ad.AnnData(X=X.copy(), obs=obs, var=var)
    adata.write_h5ad(path)
    return path


ELEMENT = {"X": "X", "layer": "layers/counts", "raw": "raw/X"}
LAYER = {"X": "X", "layer": "counts", "raw": "raw"}


def replace(group: h5py.Group, member: str, values: np.ndarray) -> None:
    del group[member]
    group.create_dataset(member, data=values)


def corrupt(path: Path, element: str, how: str) -> None:
    """Break the sparse matrix at ``element`` of ``path`` in one way."""
    with h5py.File(path, "r+") as f:
        group = f[element]
        indptr, indices = group["indptr"][:], group["indices"][:]
        nnz = int(indptr[-1])
        if how == "indptr_decreasing":
            indptr[10] = indptr[11] + 3
        elif how == "indptr_too_short":
            indptr = indptr[:-5]
        elif how == "indptr_not_from_zero":
            indptr[0] = 2
        elif how == "indptr_end_not_nnz":
            indptr[-1] = nnz - 3
        elif how == "indptr_past_values":
            indptr[5] = nnz + 10**6
        elif how == "indices_out_of_range":
            indices[3] = 10**6
        elif how == "indices_just_past_end":
            indices[-1] = max(group.attrs["shape"])  # n_minor (or more): one past the end
        elif how == "indices_negative":
            indices[3] = -1
        elif how == "data_shorter":
            replace(group, "data", group["data"][:-2])
        elif how == "shape_negative":
            group.attrs["shape"] = np.array([-1, N_GENES])
        elif how == "shape_three":
            group.attrs["shape"] = np.array([N_CELLS, N_GENES, 2])
        elif how == "indices_float":
            replace(group, "indices", indices.astype(np.float64))
        else:
            raise AssertionError(how)
        if how.startswith("indptr"):
            replace(group, "indptr", indptr)
        if how.startswith("indices") and how != "indices_float":
            replace(group, "indices", indices)


def specs_dir(tmp_path: Path, uri: str | Path, *, name: str = "crafted", **fields) -> Path:
    """A spec folder with one dataset ``name`` read from ``uri``."""
    spec = {"uri": str(uri), "organism": "human", "label_key": "cell_type", "gene_id_type": "ensembl",
            "expression": "raw_counts", **fields}
    folder = tmp_path / f"specs-{name}"
    folder.mkdir(exist_ok=True)
    (folder / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {name: spec}}))
    return folder


def czb(tmp_path: Path, *args: str, backed: bool = False, timeout: int = 240) -> subprocess.CompletedProcess:
    """``czb ARGS`` in a fresh interpreter; ``backed`` leaves every matrix on disk."""
    code = "import sys; from czb.cli import main; sys.argv = ['czb', *sys.argv[1:]]; main()"
    if backed:  # the size threshold at 0: the backed path without a 20M-value file
        code = "import czb.data.reading as R; R.BACKED_MIN_VALUES = 0; " + code
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "500"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=tmp_path, check=False,
    )


def run_args(tmp_path: Path, config: Path, *, dataset: str = "crafted", extra: tuple = ()) -> list[str]:
    return ["run", "--dataset", dataset, "--task", "clustering", "--model", "pca", "--no-baseline",
            "--seeds", "0", "--offline", "--config-dir", str(config), "--output-dir",
            str(tmp_path / "out"), *extra]


def assert_one_line_failure(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1 (not a signal), no traceback, exactly one error line holding ``fragments``."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit {proc.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- sparse structure

SPARSE_FAULTS = [
    "indptr_decreasing",
    "indptr_too_short",
    "indptr_not_from_zero",
    "indptr_end_not_nnz",
    "indptr_past_values",
    "indices_out_of_range",
    "indices_just_past_end",
    "indices_negative",
    "data_shorter",
    "shape_negative",
    "shape_three",
    "indices_float",
]


@pytest.mark.parametrize("how", SPARSE_FAULTS)
def test_corrupt_csr_x_in_memory_is_one_line_not_a_crash(tmp_path, how):
    path = write_h5ad(tmp_path / "bad.h5ad")
    corrupt(path, "X", how)
    proc = czb(tmp_path, *run_args(tmp_path, specs_dir(tmp_path, path)))
    assert_one_line_failure(proc, "dataset 'crafted'", str(path), "'X'")
    assert not list((tmp_path / "out").glob("results/*.json"))  # no result record


@pytest.mark.parametrize(
    ("fmt", "where", "how"),
    [
        ("csc", "X", "indices_out_of_range"),
        ("csc", "X", "indptr_decreasing"),
        ("csr", "layer", "indices_out_of_range"),
        ("csr", "layer", "indptr_end_not_nnz"),
        ("csr", "raw", "indices_out_of_range"),
        ("csr", "raw", "indptr_decreasing"),
        ("csc", "raw", "indices_negative"),
    ],
)
def test_corrupt_csc_layer_and_raw_in_memory(tmp_path, fmt, where, how):
    path = write_h5ad(tmp_path / "bad.h5ad", fmt=fmt, where=where)
    corrupt(path, ELEMENT[where], how)
    config = specs_dir(tmp_path, path, layer=LAYER[where])
    proc = czb(tmp_path, *run_args(tmp_path, config))
    assert_one_line_failure(proc, str(path), repr(ELEMENT[where]))


@pytest.mark.parametrize(
    ("fmt", "where", "how"),
    [
        ("csr", "X", "indices_out_of_range"),
        ("csr", "X", "indices_negative"),
        ("csr", "X", "indptr_decreasing"),
        ("csr", "layer", "indices_out_of_range"),
        ("csc", "X", "indices_out_of_range"),
        ("csc", "raw", "indptr_end_not_nnz"),
    ],
)
def test_corrupt_matrix_left_on_disk_fails_at_load_time(tmp_path, fmt, where, how):
    """Backed matrices: row pointers checked at load, column indices block by block in
    the validation pass, before any model or baseline runs."""
    path = write_h5ad(tmp_path / "bad.h5ad", fmt=fmt, where=where)
    corrupt(path, ELEMENT[where], how)
    config = specs_dir(tmp_path, path, layer=LAYER[where])
    proc = czb(tmp_path, *run_args(tmp_path, config), backed=True)
    line = assert_one_line_failure(proc, str(path))
    assert "malformed sparse matrix" in line
    assert "embedding with" not in proc.stderr


def test_backed_corrupt_indices_are_caught_by_validation_before_heavy_work(tmp_path):
    path = write_h5ad(tmp_path / "bad.h5ad")
    corrupt(path, "X", "indices_out_of_range")
    spec = DatasetSpec(name="crafted", uri=str(path), organism="human", label_key="cell_type")
    ds = load_dataset(spec, backed=True)  # loads: the indices are read block by block later
    with pytest.raises(DatasetError, match=r"column indices outside \[0, 40\) in rows"):
        validate_dataset(ds)


def old_format_copy(tmp_path: Path) -> Path:
    """scanpy's pbmc68k_reduced: written by anndata < 0.7 (h5sparse groups, compound obs)."""
    import scanpy

    source = Path(scanpy.__file__).parent / "datasets" / "10x_pbmc68k_reduced.h5ad"
    return Path(shutil.copy(source, tmp_path / "old.h5ad"))


@pytest.mark.parametrize("how", ["indices_out_of_range", "indptr_decreasing", "shape_negative"])
def test_corrupt_old_format_file(tmp_path, how):
    path = old_format_copy(tmp_path)
    with h5py.File(path, "r+") as f:
        group = f["raw.X"]
        if how == "shape_negative":
            group.attrs["h5sparse_shape"] = np.array([-700, 765])
        else:
            indptr, indices = group["indptr"][:], group["indices"][:]
            if how == "indices_out_of_range":
                indices[7] = 10**6
                replace(group, "indices", indices)
            else:
                indptr[10] = indptr[11] + 3
                replace(group, "indptr", indptr)
    config = specs_dir(tmp_path, path, label_key="bulk_labels", layer="raw", gene_id_type="symbol",
                       expression="log_normalized")
    proc = czb(tmp_path, *run_args(tmp_path, config))
    assert_one_line_failure(proc, str(path), "'raw.X'", "malformed sparse matrix")


def test_old_format_file_still_loads(tmp_path):
    path = old_format_copy(tmp_path)
    spec = DatasetSpec(name="old", uri=str(path), organism="human", label_key="bulk_labels", layer="raw",
                       gene_id_type="symbol", expression="log_normalized")
    ds = load_dataset(spec)
    validate_dataset(ds)
    assert ds.adata.shape == (700, 765)
    check_h5ad_structure(path, name="dataset 'old'")


def test_unsorted_and_repeated_indices_are_accepted_and_summed(tmp_path):
    """Valid CSR as scipy defines it: repeats add up. The loaded matrix is canonical."""
    path = write_h5ad(tmp_path / "repeats.h5ad")
    with h5py.File(path, "r+") as f:
        indices, data = f["X/indices"][:], f["X/data"][:]
        start, stop = f["X/indptr"][0], f["X/indptr"][1]
        expected_row0 = np.zeros(N_GENES)
        np.add.at(expected_row0, indices[start:stop], data[start:stop])
        indices[start:stop] = indices[start:stop][::-1]  # unsorted
        indices[start + 1] = indices[start]  # a repeat within the row
        expected_row0 = np.zeros(N_GENES)
        np.add.at(expected_row0, indices[start:stop], data[start:stop])
        replace(f["X"], "indices", indices)
    check_h5ad_structure(path, name="x")
    spec = DatasetSpec(name="repeats", uri=str(path), organism="human", label_key="cell_type")
    ds = load_dataset(spec)
    validate_dataset(ds)
    assert ds.adata.X.has_canonical_format
    np.testing.assert_allclose(ds.adata.X[0].toarray().ravel(), expected_row0)
    proc = czb(tmp_path, *run_args(tmp_path, specs_dir(tmp_path, path)))
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- sizes, links


def forge_unwritten_values(path: Path, n_claimed: int = 300_000_000) -> None:
    """X claims ``n_claimed`` stored values in chunked arrays of which almost nothing is written."""
    with h5py.File(path, "r+") as f:
        group = f["X"]
        for member, dtype in (("data", np.float32), ("indices", np.int32)):
            del group[member]
            dset = group.create_dataset(member, shape=(n_claimed,), maxshape=(None,), dtype=dtype,
                                        chunks=(1 << 16,))
            dset[:1000] = 1
        indptr = np.linspace(0, n_claimed, N_CELLS + 1).astype(np.int64)
        replace(group, "indptr", indptr)


@pytest.mark.parametrize("backed", [False, True])
def test_forged_size_is_refused_at_once(tmp_path, backed):
    path = write_h5ad(tmp_path / "forged.h5ad")
    forge_unwritten_values(path)
    assert path.stat().st_size < 1_000_000
    started = time.perf_counter()
    with pytest.raises(DatasetError, match=r"element 'X/data' claims 300000000 values .* chunks"):
        check_h5ad_structure(path, name="dataset 'forged'")
    assert time.perf_counter() - started < 5
    proc = czb(tmp_path, *run_args(tmp_path, specs_dir(tmp_path, path)), backed=backed)
    assert_one_line_failure(proc, str(path), "'X/data'", "truncated or forged")


def test_forged_contiguous_dense_matrix_is_refused(tmp_path):
    """A dense X that claims 4 GB in a file of a few kB (contiguous, never written)."""
    path = write_h5ad(tmp_path / "dense.h5ad")
    with h5py.File(path, "r+") as f:
        del f["X"]
        f.create_dataset("X", shape=(N_CELLS, 2**24), dtype=np.float32)  # storage never allocated
        f["X"].attrs["encoding-type"] = "array"
        f["X"].attrs["encoding-version"] = "0.2.0"
    proc = czb(tmp_path, *run_args(tmp_path, specs_dir(tmp_path, path)))
    assert_one_line_failure(proc, str(path), "'X'", "truncated or forged")


def test_forged_obs_column_is_refused(tmp_path):
    path = write_h5ad(tmp_path / "obs.h5ad")
    with h5py.File(path, "r+") as f:
        dset = f.create_dataset("obs/huge", shape=(10**9,), maxshape=(None,), dtype=np.float64, chunks=(1 << 16,))
        dset[:10] = 1.0
    with pytest.raises(DatasetError, match="'obs/huge' claims"):
        load_dataset(DatasetSpec(name="obs", uri=str(path), organism="human", label_key="cell_type"))


def test_external_storage_and_links_to_host_files_are_refused(tmp_path):
    """HDF5 can keep an array's bytes in another file, or link to another file: czb reads
    neither, so a crafted .h5ad cannot pull a host file into the run."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET * 40)
    path = write_h5ad(tmp_path / "external.h5ad")
    with h5py.File(path, "r+") as f:
        nnz = f["X/data"].shape[0]
        del f["X/data"]
        f["X"].create_dataset("data", shape=(nnz,), dtype=np.uint8, external=[(str(secret), 0, nnz)])
    proc = czb(tmp_path, *run_args(tmp_path, specs_dir(tmp_path, path)))
    assert_one_line_failure(proc, "'X/data'", "external storage")
    assert SECRET not in proc.stdout + proc.stderr

    other = write_h5ad(tmp_path / "other.h5ad")
    linked = write_h5ad(tmp_path / "linked.h5ad")
    with h5py.File(linked, "r+") as f:
        del f["X"]
        f["X"] = h5py.ExternalLink(str(other), "/X")
    proc = czb(tmp_path, *run_args(tmp_path, specs_dir(tmp_path, linked, name="linked"), dataset="linked"))
    assert_one_line_failure(proc, "'X'", "links to another file")


def test_check_h5ad_structure_covers_every_sparse_group(tmp_path):
    """The check another component runs on a model's predictions.h5ad: X, raw/X, layers
    and obsm, named in the message; a good file passes."""
    obs, var = frames()
    adata = ad.AnnData(X=counts(), obs=obs, var=var)
    adata.layers["counts"] = counts()
    adata.raw = ad.AnnData(X=counts("csc"), obs=obs, var=var)
    adata.obsm["X_emb"] = sp.csr_matrix(np.eye(N_CELLS, 8, dtype=np.float32))
    good = tmp_path / "good.h5ad"
    adata.write_h5ad(good)
    check_h5ad_structure(good, name="model 'm'")
    for element in ("X", "raw/X", "layers/counts", "obsm/X_emb"):
        bad = Path(shutil.copy(good, tmp_path / f"bad-{element.replace('/', '_')}.h5ad"))
        corrupt(bad, element, "indices_out_of_range")
        with pytest.raises(DatasetError, match=rf"^model 'm': .*{bad.name} holds a malformed sparse matrix at '{element}'"):
            check_h5ad_structure(bad, name="model 'm'")
    junk = tmp_path / "junk.h5ad"
    junk.write_text("<!doctype html><html>login</html>")
    with pytest.raises(DatasetError, match=r"\(it is an HTML page, not an HDF5 file\)"):
        check_h5ad_structure(junk, name="model 'm'")


def test_chunked_index_check_reads_a_bounded_amount(tmp_path, monkeypatch):
    """Indices are checked in blocks of INDEX_CHUNK, so memory stays at one block."""
    from czb.data import hdf5_checks
    path = write_h5ad(tmp_path / "chunks.h5ad")
    corrupt(path, "X", "indices_out_of_range")
    monkeypatch.setattr(hdf5_checks, "INDEX_CHUNK", 4)
    with pytest.raises(DatasetError, match=r"among stored values 0-3\)"):
        check_h5ad_structure(path, name="x")


# --------------------------------------------------------------------------- embedding files


def embedding_h5ad(path: Path, *, sparse: bool) -> Path:
    obs, _ = frames()
    values = np.random.default_rng(1).normal(size=(N_CELLS, 6)).astype(np.float32)
    emb = ad.AnnData(obs=obs)
    emb.obsm["X_emb"] = sp.csr_matrix(values) if sparse else values
    emb.write_h5ad(path)
    return path


@pytest.mark.parametrize("how", ["indices_out_of_range", "indptr_decreasing", "indptr_too_short"])
def test_corrupt_sparse_obsm_of_an_embedding_file(tmp_path, how):
    data = write_h5ad(tmp_path / "good.h5ad")
    emb = embedding_h5ad(tmp_path / "emb.h5ad", sparse=True)
    corrupt(emb, "obsm/X_emb", how)
    args = ["run", "--dataset", "crafted", "--task", "clustering", "--embedding", str(emb), "--no-baseline",
            "--seeds", "0", "--offline", "--config-dir", str(specs_dir(tmp_path, data)),
            "--output-dir", str(tmp_path / "out")]
    proc = czb(tmp_path, *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    assert "malformed sparse matrix at 'obsm/X_emb'" in output


def test_forged_npy_header_is_refused_before_allocating(tmp_path):
    data = write_h5ad(tmp_path / "good.h5ad")
    emb = tmp_path / "emb.npy"
    np.save(emb, np.zeros((N_CELLS, 4), dtype=np.float64))
    raw = bytearray(emb.read_bytes())
    header_end = raw.index(b"\n") + 1
    header = raw[:header_end].decode("latin1").replace(f"({N_CELLS}, 4)", "(100000000000, 64)")
    header = header[:-1].ljust(header_end - 1) + "\n"  # same header length
    emb.write_bytes(header.encode("latin1") + raw[header_end:])
    args = ["run", "--dataset", "crafted", "--task", "clustering", "--embedding", str(emb), "--no-baseline",
            "--seeds", "0", "--offline", "--config-dir", str(specs_dir(tmp_path, data)),
            "--output-dir", str(tmp_path / "out")]
    proc = czb(tmp_path, *args)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "the header claims shape (100000000000, 64)" in output


def test_npy_parser_messages_never_quote_the_file(tmp_path):
    """numpy's own message quotes the file's first bytes; czb says what the file is instead."""
    from czb.models.embedding_files import FileEmbeddingSource

    data = write_h5ad(tmp_path / "good.h5ad")
    spec = DatasetSpec(name="crafted", uri=str(data), organism="human", label_key="cell_type")
    ds = load_dataset(spec)
    for name in ("secret.npy", "secret.npz", "secret.parquet", "secret.h5ad"):
        fake = tmp_path / name
        fake.write_text(f"{SECRET}\nroot:x:0:0\n")
        with pytest.raises(EmbeddingError) as info:
            FileEmbeddingSource(fake).embed(ds)
        assert SECRET not in str(info.value) and "root:x" not in str(info.value)
        assert "plain text" in str(info.value), str(info.value)


# --------------------------------------------------------------------------- secrets as relationship files


def screen_specs(tmp_path: Path, source: str) -> Path:
    spec = {
        "uri": "synthetic:planted_screen",
        "params": {"n_genes": 400, "n_unexpressed": 20, "n_singletons": 6, "n_complexes": 8, "n_batches": 6,
                   "n_cells_per_perturbation": 9, "n_control_cells_per_batch": 24, "seed": 0},
        "organism": "human", "label_key": "gene", "batch_key": "gem_group", "control_key": "is_control",
        "relationship_sources": [source], "gene_id_type": "symbol", "expression": "raw_counts",
    }
    folder = tmp_path / "screen-specs"
    folder.mkdir(exist_ok=True)
    (folder / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {"screen": spec}}))
    return folder


SECRET_FILES = {
    "shadow": f"root:{SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n".encode(),
    "one_column": f"{SECRET}\n".encode(),
    "bad_second_line": f"entity1,entity2\nA,B\n{SECRET}\n".encode(),
    "binary": b"\xff\xfe\x00" + SECRET.encode(),
}


@pytest.mark.parametrize("kind", sorted(SECRET_FILES))
def test_secret_file_as_relationship_source_is_never_echoed(tmp_path, kind):
    secret = tmp_path / "shadow"
    secret.write_bytes(SECRET_FILES[kind])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "run", "--dataset", "screen", "--task", "perturbation_recall", "--model", "pca", "--no-baseline",
        "--seeds", "0", "--offline", "--config-dir", str(screen_specs(tmp_path, str(secret))),
        "--output-dir", str(out), "--format", "json",
    ])
    output = result.stdout + result.stderr
    assert result.exit_code == 1, output[-3000:]
    assert "Traceback" not in output
    assert SECRET not in output and "root:" not in output and "daemon" not in output
    written = [p for p in out.rglob("*") if p.is_file()]
    assert written, "a failed task still writes its record"
    for p in written:
        text = p.read_bytes().decode("latin1")
        assert SECRET not in text and "daemon" not in text, p
    errors = {json.loads(p.read_text()).get("error") for p in written if p.suffix == ".json"}
    message = next(e for e in errors if e)
    assert str(secret) in message and "line" in message
    assert "expected" in message


def test_relationship_source_that_is_a_device_or_folder(tmp_path):
    from czb.data.relationship_sources import load_relationships

    for source in ("/dev/null", str(tmp_path)):
        with pytest.raises(DatasetError, match="not a regular file"):
            load_relationships(source)


def test_gene_table_errors_never_quote_the_table(tmp_path):
    from czb.data.genes import GENE_MAPS, GeneMap

    table = tmp_path / "hgnc.txt"
    for content, fragment in (
        (f"{SECRET}\tx\n".encode(), "line 1: expected a tab-separated header with columns"),
        (b"\xff\xfe" + SECRET.encode(), "line 1 is not UTF-8 text"),
    ):
        table.write_bytes(content)
        with pytest.raises(DatasetError) as info:
            GeneMap.from_table(table, GENE_MAPS["human"])
        assert SECRET not in str(info.value) and str(table) in str(info.value)
        assert fragment in str(info.value)
    with pytest.raises(DatasetError, match="not a regular file"):
        GeneMap.from_table(Path("/dev/null"), GENE_MAPS["human"])


# --------------------------------------------------------------------------- generator parameters


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"n_genes": "lots"}, "parameter 'n_genes' must be an integer from 1 to"),
        ({"n_cells": 10**12}, "parameter 'n_cells' must be an integer"),
        ({"n_cells": -5}, "parameter 'n_cells' must be an integer"),
        ({"n_cells": 2.5}, "parameter 'n_cells' must be an integer"),
        ({"n_batches": True}, "parameter 'n_batches' must be an integer"),
        ({"batch_effect": float("nan")}, "parameter 'batch_effect' must be a number"),
        ({"mean_counts": "many"}, "parameter 'mean_counts' must be a number"),
        ({"gene_prefix": ["ENSG"]}, "parameter 'gene_prefix' must be a string"),
        ({"seed": -1}, "parameter 'seed' must be an integer"),
        ({"n_cells": 5_000_000, "n_genes": 20_000}, "generated values"),
        ({"not_a_param": 1}, "bad params for synthetic:planted_cells"),
    ],
)
def test_wrong_generator_params_are_one_line(tmp_path, params, fragment):
    spec = {"uri": "synthetic:planted_cells", "params": params, "organism": "human", "label_key": "cell_type",
            "gene_id_type": "ensembl"}
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {"syn": spec}}))
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "--dataset", "syn", "--task", "clustering", "--model", "pca",
                                      "--seeds", "0", "--offline", "--config-dir", str(folder)])
    assert time.perf_counter() - started < 60
    assert result.exit_code == 1, result.output[-2000:]
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'syn'"), result.stderr
    assert fragment in lines[0]


def test_planted_screen_without_targets_is_a_clear_error():
    from czb.data.synthetic.screen import planted_screen

    with pytest.raises(ValueError, match="needs at least one perturbed gene"):
        planted_screen(n_complexes=0, n_singletons=0, n_unexpressed=0)


def test_recorded_sha256_is_the_files(tmp_path):
    """The record carries the digest of the file that was read."""
    path = write_h5ad(tmp_path / "good.h5ad")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out"
    result = CliRunner().invoke(app, run_args(tmp_path, specs_dir(tmp_path, path, sha256=digest))[:-1] + [str(out)])
    assert result.exit_code == 0, result.output[-2000:]
    records = [json.loads(p.read_text()) for p in (out / "results").glob("*.json")]
    assert records and all(r["dataset"]["sha256"] == digest for r in records if "dataset" in r)
