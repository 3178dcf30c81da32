"""What a file is, from its first bytes: the kind a file name promises and whether the
content fits it.

A download that is not the kind of file its name says (an HTML login page served
with status 200 for an ``.h5ad``, a JSON or XML error body) is deleted, never
cached, and the error says what was received (its type and size, not its content).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from czb.core.errors import FetchError
from czb.core.terminal import human_bytes

__all__ = ["describe_content", "expected_kind"]

#: The kind of file a name promises, by extension (longest match first).
_KINDS_BY_SUFFIX = {
    ".h5ad": "hdf5", ".h5": "hdf5", ".hdf5": "hdf5", ".loom": "hdf5",
    ".zip": "zip", ".whl": "zip", ".npz": "zip",
    ".gz": "gzip", ".tgz": "gzip",
    ".parquet": "parquet",
    ".npy": "npy",
    ".txt": "text", ".tsv": "text", ".csv": "text", ".tab": "text", ".rpt": "text",
    ".json": "json",
    ".html": "html", ".htm": "html",
}
KIND_NAMES = {
    "hdf5": "an HDF5 file", "zip": "a zip archive", "gzip": "a gzip file",
    "parquet": "a Parquet file", "npy": "a NumPy .npy file", "text": "a text table",
    "json": "a JSON document", "html": "an HTML page",
}
_SIGNATURES = {
    "hdf5": (b"\x89HDF\r\n\x1a\n",),
    "zip": (b"PK\x03\x04", b"PK\x05\x06"),
    "gzip": (b"\x1f\x8b",),
    "parquet": (b"PAR1",),
    "npy": (b"\x93NUMPY",),
}
#: Bytes looked at to tell what a file is.
_SNIFF_BYTES = 1024


def expected_kind(name: str) -> str | None:
    """The kind of file a file name promises (``"hdf5"``, ``"zip"``, ``"text"``...), or ``None``.

    Parameters
    ----------
    name
        A file name or path; only its extension counts.
    """
    lowered = name.lower()
    for suffix in sorted(_KINDS_BY_SUFFIX, key=len, reverse=True):
        if lowered.endswith(suffix):
            return _KINDS_BY_SUFFIX[suffix]
    return None


def _has_signature(path: Path, head: bytes, kind: str) -> bool:
    signatures = _SIGNATURES[kind]
    if head.startswith(signatures):
        return True
    if kind != "hdf5":
        return False
    # HDF5 may start after a user block of 512, 1024, 2048... bytes.
    with contextlib.suppress(OSError), open(path, "rb") as f:
        offset = 512
        while offset <= 1 << 20:
            f.seek(offset)
            if f.read(8) == signatures[0]:
                return True
            offset *= 2
    return False


def _looks_like(head: bytes) -> str:
    """What the first bytes of a file look like, in words (never the bytes themselves)."""
    if not head:
        return "an empty file"
    for kind, signatures in _SIGNATURES.items():
        if head.startswith(signatures):
            return KIND_NAMES[kind]
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or (
        text.startswith(b"<!--") and b"<html" in text
    ):
        return "an HTML page"
    if text.startswith((b"<?xml", b"<error")):
        return "an XML document (as object stores send for errors)"
    if text.startswith((b"{", b"[")):
        return "a JSON document (as web services send for errors)"
    if b"\x00" in head:
        return "binary data of an unknown kind"
    return "plain text"


def describe_content(path: str | os.PathLike[str], *, expected: str | None) -> str | None:
    """What a file is, in words, when it is not the kind expected; ``None`` when it fits.

    Reads the first bytes only and never quotes them: the answer is a phrase like
    ``"an HTML page"``, ``"an empty file"`` or ``"a JSON document (...)"``.

    Parameters
    ----------
    path
        The file.
    expected
        What it should be: a key of :func:`expected_kind` (``"hdf5"``, ``"zip"``,
        ``"gzip"``, ``"parquet"``, ``"npy"`` must carry their signature; ``"text"`` must
        be text that is not an HTML, XML or JSON document; ``"json"`` must not be HTML
        or XML), or ``None`` for a file of unknown kind, which only an HTML page fails.

    Returns
    -------
    ``None`` if the file fits, else a phrase saying what it is.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None  # unreadable: the reader says so in its own words
    looks = _looks_like(head)
    if expected in _SIGNATURES:
        return None if _has_signature(path, head, expected) else looks
    if expected == "html":
        return None
    if expected == "text":
        return None if looks == "plain text" else looks
    if expected == "json":
        return looks if looks.startswith(("an HTML", "an XML", "an empty")) else None
    return looks if looks == "an HTML page" else None


def refuse_wrong_content(uri: str, part: Path, name: str, content_type: str | None) -> None:
    """Delete a finished download that is not the kind of file its name says, and say why."""
    kind = expected_kind(name)
    # The bytes decide, not the declared type: servers label valid files text/html too.
    what = describe_content(part, expected=kind)
    if what is None:
        return
    declared = (content_type or "").split(";")[0].strip().lower()
    size = part.stat().st_size
    with contextlib.suppress(OSError):
        part.unlink()
    wanted = KIND_NAMES.get(kind, "the file") if kind else "the file"
    served = f"{declared or 'no content type'}, {human_bytes(size)}"
    hint = (
        "the URL may need a login or be wrong"
        if what.startswith(("an HTML", "an XML", "a JSON"))
        else "the URL may be wrong"
    )
    msg = f"{uri}: received {what} ({served}) instead of {wanted}; {hint}. Nothing was cached"
    raise FetchError(msg)
