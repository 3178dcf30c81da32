"""Where a suite's units keep their outputs, shared by every worker: a folder, or an
``s3://`` prefix.

Layout under the store's root::

    embeddings/<key>/embedding.npz   values (float32) and cell_index, when there is one
    embeddings/<key>/unit.json       status, model and dataset provenance; written last
    scores/<key>.json                one task, one seed: metrics, runtime, computation
    failures/<key>.json              the last failure of a unit that ran out of retries
    results/<dataset>__<model>__<task>__<key>.json   assembled result records
    results/embeddings/*.npz         embedding samples for report maps
    suite.json                       the plan the results came from

Every file appears whole or not at all (a folder store writes a temporary file and
renames it; an S3 object is written in one request), and a unit's output appears
with its last file. Outputs are named by their unit's content key: a unit that runs
twice (a retry after a lost worker whose first attempt finished after all) writes the
same file twice, never two files.

A store can still be damaged from outside (a full disk, a copy cut short, an edit): an
output that cannot be read is treated as absent. It is deleted with a one-line
:class:`StoreWarning` naming it, and its unit runs again (:meth:`Store.read_output`,
:func:`czb.pipeline.execute.done_units`). In a folder store, an output that is not a regular
file (a folder, symlink, FIFO or device in its place) is such an output, and czb never
reads or writes through a symlink in it; a folder of the layout above (``scores``...)
replaced by something else is a :class:`StoreError` when the store is opened. Error
messages name files, never their content.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import warnings
import zipfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from czb.core.errors import CzbError, CzbWarning, ResultsError
from czb.core.untrusted import UntrustedInputError, read_bounded

UNIT_FILE = "unit.json"
EMBEDDING_FILE = "embedding.npz"
#: The arrays an embedding file must hold.
EMBEDDING_ARRAYS = ("values",)
#: Bytes read from the end of a remote ``.npz`` to find its zip directory.
_ZIP_TAIL_BYTES = 1 << 16


class StoreError(CzbError):
    """The store cannot be read or written."""


class StoreWarning(CzbWarning):
    """An output in the store could not be read; it is deleted and its unit runs again."""


class UnreadableOutput(StoreError):
    """An entry of the store is not a file czb can read (a folder, symlink, FIFO or
    device where an output should be).

    Attributes
    ----------
    why
        What it is, as the end of a sentence naming it (``"is a folder"``).
    """

    def __init__(self, message: str, why: str):
        super().__init__(message)
        self.why = why


class Store(ABC):
    """Files by relative path (``/``-separated); subclasses move the bytes."""

    url: str

    @abstractmethod
    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file at once (readers see the old file or the new one)."""

    @abstractmethod
    def read_bytes(self, relative: str) -> bytes | None:
        """A file's content, or ``None`` when there is no such file."""

    @abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether the file is there."""

    @abstractmethod
    def files(self, prefix: str) -> list[str]:
        """Relative paths of every file under folder ``prefix``, at any depth."""

    @abstractmethod
    def delete(self, relative: str) -> None:
        """Remove a file (nothing when it is not there)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # typed ------------------------------------------------------------------------

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, json.dumps(value, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, relative: str) -> Any:
        """A JSON file's value, ``None`` when there is no such file; :class:`StoreError`
        (naming the file, not its content) when it is not JSON."""
        from czb.core.untrusted import parse_json

        data = self.read_bytes(relative)
        if data is None:
            return None
        try:
            # As any untrusted JSON: bounded depth, lone surrogates replaced (czb writes
            # nothing deeper than a result record, which readers accept up to 64 levels).
            return parse_json(data, max_depth=64)
        except ValueError as e:  # UntrustedInputError is a ValueError
            msg = f"{self.url}/{relative} is not valid JSON ({e}); delete it to redo its unit"
            raise StoreError(msg) from None

    def read_output(self, relative: str, *, keys: tuple[str, ...] = ("status",),
                    repair: bool = True) -> dict[str, Any] | None:
        """A unit's JSON output (an object with ``keys``), or ``None`` when it is absent or
        cannot be read; an unreadable one is reported and, with ``repair``, deleted
        (:meth:`discard`) so its unit runs again."""
        try:
            value = self.read_json(relative)
        except UnreadableOutput as e:
            self.discard(relative, e.why, repair=repair)
            return None
        except StoreError:
            self.discard(relative, "is not valid JSON", repair=repair)
            return None
        if value is None:
            return None
        if not isinstance(value, dict) or any(k not in value for k in keys):
            self.discard(relative, f"is not a czb output (expected a JSON object with {', '.join(keys)})",
                         repair=repair)
            return None
        return value

    def discard(self, relative: str, why: str, *, repair: bool = True) -> None:
        """Report an unreadable output in one :class:`StoreWarning` line naming it (not its
        content), and with ``repair`` delete it."""
        warnings.warn(f"{self.url}/{relative} {why}; its unit runs again", StoreWarning, stacklevel=3)
        if repair:
            self.delete(relative)

    def write_arrays(self, relative: str, **arrays: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        self.write_bytes(relative, buffer.getvalue())

    def read_arrays(self, relative: str) -> dict[str, np.ndarray]:
        data = self.read_bytes(relative)
        if data is None:
            msg = f"{self.url}/{relative} is missing"
            raise StoreError(msg)
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except Exception as e:  # noqa: BLE001 - a damaged file raises anything (BadZipFile, EOFError, zlib.error...)
            msg = f"{self.url}/{relative} is not a readable .npz ({type(e).__name__})"
            raise StoreError(msg) from None

    def arrays_problem(self, relative: str, names: tuple[str, ...] = EMBEDDING_ARRAYS) -> str | None:
        """Why an ``.npz`` in the store cannot be what it should (holding arrays
        ``names``), or ``None`` when it looks whole. Cheap: the zip directory at the end
        of the file and each member's ``.npy`` header, not the data (a file cut short
        loses its directory)."""
        data = self.read_bytes(relative)
        if data is None:
            return "is missing"
        return _npz_problem(io.BytesIO(data), names)

    # units ------------------------------------------------------------------------

    def done_embeddings(self) -> set[str]:
        """Keys of embed units whose output is complete (its ``unit.json`` is there)."""
        return {p.split("/")[1] for p in self.files("embeddings") if p.endswith(f"/{UNIT_FILE}")}

    def done_scores(self) -> set[str]:
        """Keys of score units whose output is there."""
        return {p.split("/")[1].removesuffix(".json") for p in self.files("scores") if p.endswith(".json")}

    def readable_embedding(self, key: str, *, repair: bool = True) -> bool:
        """Whether embed unit ``key``'s output can be read: ``unit.json`` is a czb
        output and, for an embedding that exists (status ``ok``), ``embedding.npz`` looks
        whole (:meth:`arrays_problem`). If not, a :class:`StoreWarning` names the bad
        file and, with ``repair``, the unit's files are deleted so the unit runs again."""
        meta_file, arrays_file = f"embeddings/{key}/{UNIT_FILE}", f"embeddings/{key}/{EMBEDDING_FILE}"
        meta = self.read_output(meta_file, keys=("status", "dataset", "model"), repair=repair)
        if meta is None:
            if repair:
                self.delete(arrays_file)
            return False
        if meta["status"] == "ok":
            problem = self.arrays_problem(arrays_file)
            if problem is not None:
                self.discard(arrays_file, problem, repair=repair)
                if repair:
                    self.delete(meta_file)
                return False
        return True

    def forget_embedding(self, key: str) -> None:
        """Remove embed unit ``key``'s output (its ``unit.json`` first: the unit is then
        not done, whatever else remains)."""
        self.delete(f"embeddings/{key}/{UNIT_FILE}")
        self.delete(f"embeddings/{key}/{EMBEDDING_FILE}")


def _npz_problem(source: Any, names: tuple[str, ...]) -> str | None:
    """What is wrong with an ``.npz`` (a path or file object), or ``None``."""
    try:
        with zipfile.ZipFile(source) as archive:
            members = set(archive.namelist())
            missing = [n for n in names if f"{n}.npy" not in members]
            if missing:
                return f"is not a czb embedding file (no array {missing[0]!r})"
            for member in sorted(members):
                with archive.open(member) as f:  # shape and dtype only
                    if np.lib.format.read_magic(f) == (1, 0):
                        np.lib.format.read_array_header_1_0(f)
                    else:
                        np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, it is damaged
        return f"is not a readable .npz ({type(e).__name__})"
    return None


def check_output_dir(folder: Path, *, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it writable (a probe file is written and
    removed), so that a run with nowhere to put its results fails at once, not after its
    work.

    Raises
    ------
    ResultsError
        One line naming the folder: it is a file, cannot be created, or is not writable.
    """
    import tempfile

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        msg = f"{what} {folder} exists and is not a folder"
        raise ResultsError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create {what} {folder}: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from None
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".czb-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        msg = f"{what} {folder} is not writable: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from None
    return folder



class LocalStore(Store):
    """A store in a folder (a local disk, or a file system every node mounts).

    Only regular files reached through real folders are outputs: an entry that is
    something else is never read or written through (a symlink could lead anywhere, a
    FIFO or device would block or never end); where a file should be it is an
    unreadable output (reported, deleted, redone), where a unit's folder should be it is
    removed when the unit writes there.
    """

    #: Folders of the layout: one replaced by something else is not any unit's output,
    #: so it is reported when the store is opened rather than removed.
    LAYOUT = ("embeddings", "scores", "failures", "results", "results/embeddings")

    def __init__(self, root: str | os.PathLike[str], *, what: str = "store folder"):
        self.root = Path(root).expanduser().resolve()
        try:  # created and written to now, so a bad folder fails before any work
            check_output_dir(self.root, what=what)
        except ResultsError as e:
            raise StoreError(str(e)) from None
        self.url = str(self.root)
        for folder in self.LAYOUT:
            kind = self._kind(folder)
            if kind not in (None, "folder"):
                why = "is a file" if kind == "file" else kind
                msg = f"store {self.url}: {folder} {why}, not a folder; move it away or use another store"
                raise StoreError(msg)

    def _kind(self, relative: str) -> str | None:
        """What the entry ``relative`` is, without following a symlink: ``None`` when
        absent, ``"folder"``, ``"file"`` (regular), else ``"is a ..."``."""
        try:
            mode = os.lstat(self.root / relative).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            msg = f"{self.url}/{relative} cannot be examined ({e.strerror or type(e).__name__})"
            raise StoreError(msg) from None
        if stat.S_ISDIR(mode):
            return "folder"
        if stat.S_ISREG(mode):
            return "file"
        if stat.S_ISLNK(mode):
            return "is a symbolic link"
        return "is a FIFO, device or socket"

    def _blocker(self, relative: str) -> str | None:
        """The first entry on the way to ``relative`` (below the root) that is there but
        not a real folder, or ``None``."""
        parts = relative.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            kind = self._kind(folder)
            if kind is None:
                return None
            if kind != "folder":
                return folder
        return None

    def _regular(self, relative: str) -> bool:
        """Whether ``relative`` is a regular file reached through real folders; ``False``
        when absent; :class:`UnreadableOutput` when something else is in its place."""
        if self._blocker(relative) is not None:
            return False  # no file can be there; a write there removes what blocks it
        kind = self._kind(relative)
        if kind is None or kind == "file":
            return kind == "file"
        why = "is a folder" if kind == "folder" else kind
        msg = f"{self.url}/{relative} {why}, not a file; delete it to redo its unit"
        raise UnreadableOutput(msg, f"{why}, not a file")

    def write_bytes(self, relative: str, data: bytes) -> None:
        from czb.core.records import write_atomically

        while (blocker := self._blocker(relative)) is not None:
            if blocker in self.LAYOUT:
                msg = f"store {self.url}: {blocker} is not a folder; move it away or use another store"
                raise StoreError(msg)
            warnings.warn(f"{self.url}/{blocker} is not a folder; removed to write its unit's output",
                          StoreWarning, stacklevel=2)
            self._remove(blocker)
        if self._kind(relative) == "folder":
            warnings.warn(f"{self.url}/{relative} is a folder, not a file; removed to write its unit's output",
                          StoreWarning, stacklevel=2)
            self._remove(relative)
        write_atomically(self.root / relative, data, what="store file")

    def read_bytes(self, relative: str) -> bytes | None:
        if not self._regular(relative):
            return None
        try:
            return read_bounded(self.root / relative, None, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:  # replaced meanwhile (ELOOP: now a symlink), or no permission
            why = f"cannot be read ({e.strerror or type(e).__name__})"
        except UntrustedInputError as e:  # replaced meanwhile by a FIFO or device
            why = f"is {e}"
        raise UnreadableOutput(f"{self.url}/{relative} {why}", why)

    def exists(self, relative: str) -> bool:
        try:
            return self._regular(relative)
        except UnreadableOutput:
            return False

    def arrays_problem(self, relative: str, names: tuple[str, ...] = EMBEDDING_ARRAYS) -> str | None:
        try:
            if not self._regular(relative):
                return "is missing"
        except UnreadableOutput as e:
            return e.why
        return _npz_problem(self.root / relative, names)  # reads the zip directory and headers, not the data

    def files(self, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        if self._blocker(f"{prefix}/x") is not None or self._kind(prefix) != "folder":
            return []
        out = []
        for folder, _, names in os.walk(self.root / prefix, followlinks=False):
            for name in names:
                path = Path(folder) / name
                if not name.startswith(".") and stat.S_ISREG(_lstat_mode(path)):
                    out.append(path.relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, relative: str) -> None:
        if self._blocker(relative) is None and self._kind(relative) is not None:
            self._remove(relative)

    def _remove(self, relative: str) -> None:
        """Remove the entry ``relative``: a folder with what it holds (symlinks in it are
        removed, not followed), anything else by its name."""
        path = self.root / relative
        try:
            if self._kind(relative) == "folder":
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as e:
            msg = f"{self.url}/{relative} cannot be removed ({e.strerror or type(e).__name__})"
            raise StoreError(msg) from None


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


class S3Store(Store):
    """A store under an ``s3://bucket/prefix``, written with the default AWS credentials
    (endpoint: the ``CZB_S3_ENDPOINT_URL`` setting, for S3-compatible servers)."""

    def __init__(self, url: str):
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            msg = f"store {url!r}: an S3 store must look like s3://bucket/prefix"
            raise StoreError(msg)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3

            from czb.core.settings import get_settings

            self._client = boto3.session.Session().client("s3", endpoint_url=get_settings().s3_endpoint_url)
        return self._client

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _request(self, what: str, call: Any, *, missing_ok: bool = False) -> Any:
        """``call()``, with S3's errors as :class:`StoreError` (``None`` for a missing
        object when ``missing_ok``)."""
        import botocore.exceptions

        try:
            return call()
        except botocore.exceptions.ClientError as e:
            if missing_ok and e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            msg = f"{self.url}: cannot {what}: {e}"
            raise StoreError(msg) from e
        except botocore.exceptions.BotoCoreError as e:
            msg = f"{self.url}: cannot {what}: {e}"
            raise StoreError(msg) from e

    def write_bytes(self, relative: str, data: bytes) -> None:
        key = self._key(relative)
        self._request(f"write {relative}", lambda: self._s3().put_object(Bucket=self.bucket, Key=key, Body=data))

    def read_bytes(self, relative: str) -> bytes | None:
        key = self._key(relative)
        found = self._request(f"read {relative}", lambda: self._s3().get_object(Bucket=self.bucket, Key=key),
                              missing_ok=True)
        return None if found is None else found["Body"].read()

    def exists(self, relative: str) -> bool:
        key = self._key(relative)
        return self._request(f"look for {relative}", lambda: self._s3().head_object(Bucket=self.bucket, Key=key),
                             missing_ok=True) is not None

    def arrays_problem(self, relative: str, names: tuple[str, ...] = EMBEDDING_ARRAYS) -> str | None:
        # Only the end of the object: a file cut short has no zip directory there.
        key = self._key(relative)
        found = self._request(
            f"read {relative}",
            lambda: self._s3().get_object(Bucket=self.bucket, Key=key, Range=f"bytes=-{_ZIP_TAIL_BYTES}"),
            missing_ok=True)
        if found is None:
            return "is missing"
        if b"PK\x05\x06" not in found["Body"].read():
            return "is not a readable .npz (cut short: no zip directory at its end)"
        return None

    def files(self, prefix: str) -> list[str]:
        root = self._key(prefix.strip("/")) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root)
        out = []
        for page in self._request(f"list {prefix}", lambda: list(pages)):
            out += [item["Key"][strip:] for item in page.get("Contents", [])]
        return out

    def delete(self, relative: str) -> None:
        key = self._key(relative)
        self._request(f"delete {relative}", lambda: self._s3().delete_object(Bucket=self.bucket, Key=key))


def open_store(url: str | os.PathLike[str], *, what: str = "store folder") -> Store:
    """The store at ``url``: ``s3://bucket/prefix``, or a folder (path or ``file://``;
    ``what`` it is called in errors)."""
    text = str(url)
    if text.startswith("s3://"):
        return S3Store(text)
    if "://" in text and not text.startswith("file://"):
        msg = f"store {text!r}: use a folder every worker can reach, or an s3:// prefix"
        raise StoreError(msg)
    return LocalStore(text.removeprefix("file://"), what=what)
