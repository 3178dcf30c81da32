"""Known gene-gene relationships: pair normalisation, file reading, the planted complexes and
the EFAAR annotation files extracted from a (here: locally built) wheel."""

import itertools
import json
import socket
import zipfile

import numpy as np
import pytest

from czb.core.errors import DatasetError
from czb.data import relationship_sources as sources
from czb.data import relationships as rel
from czb.data.synthetic import KNOWN_COMPLEXES

MEMBER_DIR = "efaar_benchmarking/benchmark_annotations/"
FAKE_ROWS = {
    "CORUM": "entity1,entity2\nGENEA,GENEB\nGENEB,GENEA\nGENEC,GENEA\nGENED,GENED\n",
    "HuMAP": "entity1,entity2\nH1,H2\n",
    "Reactome": "entity1,entity2\nR1,R2\nR2,R3\n",
    "SIGNOR": "entity1,entity2\nS1,S2\n",
    "StringDB": "entity1,entity2\nT1,T2\nT3,T4\n",
}


def as_set(pairs):
    return {tuple(p) for p in pairs}


def build_wheel(path, *, skip=()):
    """A wheel-shaped zip with the five annotation files and LICENSE, minus ``skip``."""
    with zipfile.ZipFile(path, "w") as z:
        for name, text in FAKE_ROWS.items():
            if f"{name}.txt" not in skip:
                z.writestr(f"{MEMBER_DIR}{name}.txt", text)
        if "LICENSE" not in skip:
            z.writestr(f"{MEMBER_DIR}LICENSE", "CORUM: CC BY-NC 4.0 ...\n")
        z.writestr("efaar_benchmarking/__init__.py", "")
    return path


# --------------------------------------------------------------------------- pairs


def test_from_pairs_normalises():
    """Self pairs go, A-B and B-A count once, each pair is sorted, values are strings."""
    r = rel.Relationships.from_pairs("x", ["B", "A", "C", "D", "A", 1], ["A", "B", "C", "A", "B", 2])
    assert as_set(r.pairs) == {("A", "B"), ("A", "D"), ("1", "2")}
    assert len(r.pairs) == 3 and r.pairs.shape == (3, 2)
    assert all(a < b for a, b in r.pairs)
    empty = rel.Relationships.from_pairs("y", ["A"], ["A"])
    assert empty.pairs.shape == (0, 2)


def test_restricted_to_keeps_pairs_with_both_genes():
    """Only pairs whose two genes are both present survive."""
    r = rel.Relationships.from_pairs("x", ["A", "A", "B", "C"], ["B", "C", "C", "D"])
    assert as_set(r.restricted_to(["A", "B", "C"])) == {("A", "B"), ("A", "C"), ("B", "C")}
    assert as_set(r.restricted_to(np.array(["D", "C"]))) == {("C", "D")}
    assert len(r.restricted_to([])) == 0


def test_read_relationship_file_csv_and_tsv(tmp_path):
    """Reads an entity1,entity2 CSV and a headerless-named two-column TSV (first two columns)."""
    csv = tmp_path / "pairs.csv"
    csv.write_text("score,entity2,entity1\n1,B,A\n2,A,B\n3,C,C\n4,D,A\n")
    r = rel.read_relationship_file(csv)
    assert r.name == "pairs" and as_set(r.pairs) == {("A", "B"), ("A", "D")}
    tsv = tmp_path / "other.tsv"
    tsv.write_text("gene_a\tgene_b\nX\tY\nY\tZ\n")
    r = rel.read_relationship_file(tsv, name="mine", license="CC0-1.0")
    assert r.name == "mine" and r.license == "CC0-1.0"
    assert as_set(r.pairs) == {("X", "Y"), ("Y", "Z")}


def test_read_relationship_file_errors(tmp_path):
    """A one-column file or a missing file is a DatasetError."""
    one = tmp_path / "one.csv"
    one.write_text("gene\nA\nB\n")
    with pytest.raises(DatasetError):
        rel.read_relationship_file(one)
    with pytest.raises(DatasetError):
        rel.read_relationship_file(tmp_path / "absent.csv")


def test_known_complex_relationships():
    """Every member pair of every planted complex, n (n - 1) / 2 per complex, no repeats."""
    members = [g for genes in KNOWN_COMPLEXES.values() for g in genes]
    assert len(members) == len(set(members))  # complexes share no gene
    r = sources.known_complex_relationships()
    assert len(r.pairs) == sum(len(g) * (len(g) - 1) // 2 for g in KNOWN_COMPLEXES.values())
    assert len(as_set(r.pairs)) == len(r.pairs)
    expected = {tuple(sorted(p)) for genes in KNOWN_COMPLEXES.values() for p in itertools.combinations(genes, 2)}
    assert as_set(r.pairs) == expected
    assert sources.load_relationships("known_complexes").name == "known_complexes"


# --------------------------------------------------------------------------- EFAAR files


def test_efaar_annotations_from_local_wheel(tmp_path):
    """The five files, LICENSE and a manifest with each file's licence are extracted; a
    second call reuses them without extracting again."""
    wheel = build_wheel(tmp_path / "efaar_benchmarking-1.0-py2.py3-none-any.whl")
    folder = sources.efaar_annotations_dir(cache_dir=tmp_path / "cache", wheel_uri=str(wheel), wheel_sha256=None)
    names = [f"{n}.txt" for n in ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB")] + ["LICENSE"]
    for n in names:
        assert (folder / n).is_file(), n
    assert (folder / "CORUM.txt").read_text() == FAKE_ROWS["CORUM"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["wheel_uri"] == str(wheel)
    assert manifest["licenses"]["CORUM.txt"] == "CC-BY-NC-4.0"
    assert manifest["licenses"]["SIGNOR.txt"] == "CC-BY-NC-4.0"
    mtimes = {n: (folder / n).stat().st_mtime_ns for n in [*names, "manifest.json"]}
    (folder / "HuMAP.txt").write_text("entity1,entity2\nKEEP,ME\n")  # re-extraction would overwrite it
    mtimes["HuMAP.txt"] = (folder / "HuMAP.txt").stat().st_mtime_ns
    again = sources.efaar_annotations_dir(cache_dir=tmp_path / "cache", wheel_uri=str(wheel), wheel_sha256=None)
    assert again == folder
    assert {n: (folder / n).stat().st_mtime_ns for n in mtimes} == mtimes
    assert (folder / "HuMAP.txt").read_text() == "entity1,entity2\nKEEP,ME\n"


def test_efaar_annotations_incomplete_or_bad_wheel(tmp_path):
    """A wheel lacking one file, or a file that is not a zip, is a DatasetError naming the problem."""
    partial = build_wheel(tmp_path / "partial.whl", skip=("SIGNOR.txt",))
    with pytest.raises(DatasetError, match="SIGNOR.txt"):
        sources.efaar_annotations_dir(cache_dir=tmp_path / "c1", wheel_uri=str(partial), wheel_sha256=None)
    assert not (tmp_path / "c1" / "annotations" / "efaar-benchmarking-1.0" / "manifest.json").exists()
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"this is not a zip file")
    with pytest.raises(DatasetError, match="not a valid wheel"):
        sources.efaar_annotations_dir(cache_dir=tmp_path / "c2", wheel_uri=str(junk), wheel_sha256=None)


def test_load_relationships_from_env_wheel(tmp_path, monkeypatch):
    """load_relationships('CORUM') reads the pairs of the wheel named by CZB_EFAAR_WHEEL_URI
    into CZB_CACHE_DIR, with CORUM's licence."""
    wheel = build_wheel(tmp_path / "fake.whl")
    monkeypatch.setenv("CZB_EFAAR_WHEEL_URI", str(wheel))
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "cache"))
    r = sources.load_relationships("CORUM")
    assert r.name == "CORUM" and r.license == "CC-BY-NC-4.0"
    assert as_set(r.pairs) == {("GENEA", "GENEB"), ("GENEA", "GENEC")}
    assert (tmp_path / "cache" / "annotations" / "efaar-benchmarking-1.0" / "manifest.json").is_file()
    assert as_set(sources.load_relationships("StringDB").pairs) == {("T1", "T2"), ("T3", "T4")}


def test_load_relationships_path_and_unknown(tmp_path):
    """A CSV path is read as a file; an unknown name is a DatasetError listing the known sources."""
    csv = tmp_path / "mine.csv"
    csv.write_text("entity1,entity2\nA,B\n")
    assert as_set(sources.load_relationships(str(csv)).pairs) == {("A", "B")}
    with pytest.raises(DatasetError) as info:
        sources.load_relationships("NotADatabase")
    for known in ("CORUM", "HuMAP", "Reactome", "SIGNOR", "StringDB", "known_complexes"):
        assert known in str(info.value)


def _pypi_reachable():
    try:
        socket.create_connection(("files.pythonhosted.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.internet
def test_real_efaar_wheel_corum(tmp_path):
    """The published wheel (sha256-checked) yields CORUM's ~37,649 unique pairs, and every
    member pair of the planted complexes is a CORUM pair."""
    if not _pypi_reachable():
        pytest.skip("files.pythonhosted.org is not reachable")
    folder = sources.efaar_annotations_dir(cache_dir=tmp_path / "cache", offline=False)
    corum = rel.read_relationship_file(folder / "CORUM.txt", name="CORUM")
    assert abs(len(corum.pairs) - 37649) <= 0.01 * 37649
    known = as_set(corum.pairs)
    missing = [tuple(sorted(p)) for genes in KNOWN_COMPLEXES.values() for p in itertools.combinations(genes, 2)
               if tuple(sorted(p)) not in known]
    assert not missing, missing
