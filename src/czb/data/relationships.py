"""Known gene-gene relationships as data: the unordered gene pairs of one source, and
reading them from a CSV/TSV file of pairs.

Pairs are unordered: self-pairs are dropped and ``A-B`` / ``B-A`` count once. Where the
sources come from (the EFAAR databases, the planted complexes, a user's file) is
:mod:`czb.data.relationship_sources`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from czb.core.errors import DatasetError


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
