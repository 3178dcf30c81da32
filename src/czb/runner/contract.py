"""The container contract (version 1) as files, and the host's reading of ``/output``.

The names of the files that cross the boundary, the exit codes, and the readers of what
a container leaves in ``/output``: :func:`collect_output` (copy the expected files into
a folder of czb's own), :func:`read_output` (embeddings), :func:`read_predictions`
(perturbation predictions) and :func:`read_reason`.

Everything a container leaves in ``/output`` is hostile. A name there may be a symbolic
link to a host file (its target is resolved on the host, not in the container), a hard
link, a FIFO that blocks its reader, a device, a folder, a sparse file of a terabyte or
JSON nested 100k deep. So only the expected names are looked at (anything else is
ignored: never listed, opened or kept); each must be a regular file with one link and
within its size cap, is opened with ``O_NOFOLLOW | O_NONBLOCK``, and is copied through
that descriptor into a folder czb made, which the container never had.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from czb import untrusted
from czb.errors import DatasetError, EmbeddingError
from czb.runner.embeddings import check_embedding
from czb.runner.hdf5_checks import ProducerLimits, check_h5ad_structure

CONTRACT_VERSION = 1
EXIT_OK = 0
EXIT_NOT_APPLICABLE = 99
DATASET_FILE = "dataset.h5ad"
REQUEST_FILE = "request.json"
EMBEDDINGS_FILE = "embeddings.npy"
CELL_IDS_FILE = "cell_ids.json"
META_FILE = "meta.json"
REASON_FILE = "reason.json"
PREDICTIONS_FILE = "predictions.h5ad"
PREDICT_EXPRESSION_SHIFT = "perturbation_expression_shift"
PREDICT_MASKED_GENE = "perturbation_masked_gene"
LOG_FILE = "container.log"

# Everything a container leaves in /output is hostile. A name there may be a symbolic
# link to a host file (its target is resolved on the host, not in the container), a hard
# link, a FIFO that blocks its reader, a device, a folder, a sparse file of a terabyte or
# JSON nested 100k deep. So only the expected names are looked at (anything else is
# ignored: never listed, opened or kept); each must be a regular file with one link and
# within its size cap, is opened with O_NOFOLLOW | O_NONBLOCK, and is copied through that
# descriptor into a folder czb made, which the container never had (collect_output).

#: Caps of the small JSON files (parsed whole) and of their nesting. ``meta.json`` is kept
#: in results about 4 levels down (``model.info.container_meta``), so its cap leaves room
#: under what result readers accept (``czb.runner.results.MAX_RESULT_DEPTH``, 64).
MAX_META_BYTES = 4 << 20
MAX_REASON_BYTES = 64 << 10
MAX_JSON_DEPTH = 32
#: ``reason.json``'s reason is shown to the user: one line of at most this many characters.
MAX_REASON_CHARS = 300
#: The widest embedding accepted (the largest models' are a few thousand).
MAX_EMBEDDING_DIM = 1 << 15
#: Room for an ``.npy`` header; room for an ``.h5ad``'s names, attributes and metadata.
NPY_HEADER_BYTES = 1 << 16
H5AD_SLACK_BYTES = 64 << 20
_DEFAULT_ARRAY_BYTES = 16 << 30
UNLIMITED = 1 << 62

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class OutputLimits:
    """Size caps of the files a container may leave in ``/output``.

    Attributes
    ----------
    max_rows
        Cells the request sent: ``cell_ids.json`` may list no more (``None``: unbounded).
    max_dim
        Columns ``embeddings.npy`` may have.
    meta_bytes, reason_bytes, cell_ids_bytes, embeddings_bytes, predictions_bytes
        The largest size of each file, in bytes.
    """

    max_rows: int | None = None
    max_dim: int = MAX_EMBEDDING_DIM
    meta_bytes: int = MAX_META_BYTES
    reason_bytes: int = MAX_REASON_BYTES
    cell_ids_bytes: int = 256 << 20
    embeddings_bytes: int = _DEFAULT_ARRAY_BYTES
    predictions_bytes: int = _DEFAULT_ARRAY_BYTES

    @classmethod
    def for_cells(cls, cell_ids: Any) -> OutputLimits:
        """The caps of an embedding request that sent ``cell_ids``."""
        n = len(cell_ids)
        longest = max((len(str(i)) for i in cell_ids), default=0)
        return cls(
            max_rows=n,
            # Each ID at worst fully \u-escaped (12 bytes per character), plus quotes,
            # separator and indentation.
            cell_ids_bytes=(1 << 20) + n * (12 * longest + 16),
            embeddings_bytes=NPY_HEADER_BYTES + n * MAX_EMBEDDING_DIM * 4,
        )

    @classmethod
    def for_predictions(cls, n_rows: int, n_genes: int) -> OutputLimits:
        """The caps of a prediction request for ``n_rows`` × ``n_genes`` values."""
        return cls(
            max_rows=n_rows,
            predictions_bytes=H5AD_SLACK_BYTES + n_rows * n_genes * 8 + (n_rows + n_genes) * 1024,
        )

    def embedding_files(self) -> dict[str, int]:
        return {META_FILE: self.meta_bytes, CELL_IDS_FILE: self.cell_ids_bytes,
                EMBEDDINGS_FILE: self.embeddings_bytes}

    def prediction_files(self) -> dict[str, int]:
        return {META_FILE: self.meta_bytes, PREDICTIONS_FILE: self.predictions_bytes}


@dataclass
class ModelOutput:
    """What a run left in ``/output``, checked.

    Attributes
    ----------
    values
        Array of shape ``(n_embedded_cells, dim)``, float32.
    cell_ids
        Object array of shape ``(n_embedded_cells,)``.
    meta
        ``meta.json`` as a dict.
    """

    values: np.ndarray
    cell_ids: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)


def _file_kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _check_stat(st: os.stat_result, file: str, cap: int, *, name: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        msg = f"{name}: output file {file} is {_file_kind(st.st_mode)}; only regular files are accepted"
        raise EmbeddingError(msg)
    if st.st_nlink != 1:
        msg = (f"{name}: output file {file} has {st.st_nlink} hard links; "
               f"only files with one link are accepted")
        raise EmbeddingError(msg)
    if st.st_size > cap:
        msg = f"{name}: output file {file} is {st.st_size} bytes, over its limit of {cap} bytes"
        raise EmbeddingError(msg)


@contextlib.contextmanager
def open_folder(folder: Path, *, name: str) -> Iterator[int]:
    """A descriptor of ``folder`` itself (never through a symbolic link)."""
    try:
        fd = os.open(folder, _DIR_FLAGS)
    except OSError as e:
        msg = f"{name}: cannot open the output folder {folder} ({e.strerror})"
        raise EmbeddingError(msg) from None
    try:
        yield fd
    finally:
        os.close(fd)


def open_regular(dir_fd: int, file: str, cap: int, *, name: str) -> int | None:
    """A read descriptor of ``file`` in folder ``dir_fd``; ``None`` when there is no such name.

    ``lstat`` first, so a FIFO or device is never opened; then ``O_NOFOLLOW`` and a check
    that the opened file is the one inspected.

    Raises
    ------
    EmbeddingError
        Not a regular file with one link, or over ``cap`` bytes.
    """
    try:
        before = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as e:
        msg = f"{name}: cannot inspect output file {file} ({e.strerror})"
        raise EmbeddingError(msg) from None
    _check_stat(before, file, cap, name=name)
    try:
        fd = os.open(file, _READ_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        msg = f"{name}: cannot open output file {file} ({e.strerror})"
        raise EmbeddingError(msg) from None
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            msg = f"{name}: output file {file} was replaced while it was being opened"
            raise EmbeddingError(msg)
        _check_stat(now, file, cap, name=name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chunks(fd: int, cap: int, file: str, *, name: str) -> Iterator[bytes]:
    """The bytes of ``fd`` from its current offset, failing past ``cap`` (a file still growing)."""
    total = 0
    while chunk := os.read(fd, 1 << 22):
        total += len(chunk)
        if total > cap:
            msg = f"{name}: output file {file} grew over its limit of {cap} bytes"
            raise EmbeddingError(msg)
        yield chunk


def _read_file(dir_fd: int, file: str, cap: int, *, name: str) -> bytes | None:
    fd = open_regular(dir_fd, file, cap, name=name)
    if fd is None:
        return None
    try:
        return b"".join(_chunks(fd, cap, file, name=name))
    finally:
        os.close(fd)


def copy_fd(fd: int, dir_fd: int, file: str, cap: int, *, name: str) -> None:
    """Copy ``fd`` into a new file ``file`` of folder ``dir_fd`` (never an existing name)."""
    out = os.open(file, NEW_FILE_FLAGS, 0o644, dir_fd=dir_fd)
    try:
        for chunk in _chunks(fd, cap, file, name=name):
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
    finally:
        os.close(out)


def collect_output(output_dir: Path, dest: Path, files: Mapping[str, int], *, name: str) -> list[str]:
    """Copy the expected files of a container's ``/output`` into ``dest``, a new folder of czb's.

    Only the names in ``files`` are looked at: anything else the container left there is
    ignored (never listed, opened or kept), so a flood of files costs nothing but their
    removal. Each expected name that exists must be a regular file with one link, no
    larger than its cap; it is opened without following links and copied through that
    descriptor, so what is copied is what was checked.

    Parameters
    ----------
    files
        ``{file name: largest size in bytes}``.

    Returns
    -------
    The names copied (absent ones are left to the reader to report).

    Raises
    ------
    EmbeddingError
        One line naming the refused file: a symbolic link, hard link, folder, FIFO,
        device or socket, or a file over its cap.
    """
    copied = []
    with open_folder(output_dir, name=name) as source, open_folder(dest, name=name) as target:
        for file, cap in files.items():
            fd = open_regular(source, file, cap, name=name)
            if fd is None:
                continue
            try:
                copy_fd(fd, target, file, cap, name=name)
            finally:
                os.close(fd)
            copied.append(file)
    return copied


def parse_json(data: bytes, file: str, *, name: str) -> Any:
    """Parse an output JSON file; NaN and infinities become ``null`` (results stay valid JSON).

    Raises
    ------
    EmbeddingError
        Not JSON, or nested deeper than :data:`MAX_JSON_DEPTH`. The message never quotes
        the file.
    """
    try:
        return untrusted.parse_json(data, max_depth=MAX_JSON_DEPTH)
    except untrusted.UntrustedInputError as e:
        msg = f"{name}: {file} is refused ({e})"
        raise EmbeddingError(msg) from None


def _read_npy(
    dir_fd: int, file: str, *, name: str, cap: int, n_rows: int, max_dim: int
) -> np.ndarray | None:
    """Read a float32 ``.npy`` after checking its header (never unpickles).

    The header must describe a ``(n_rows, d)`` float32 array with ``d <= max_dim`` that
    fills the file exactly, so nothing larger than the file on disk is ever allocated.
    """
    fd = open_regular(dir_fd, file, cap, name=name)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(version)
        except Exception:  # noqa: BLE001 - any header that numpy cannot parse
            msg = f"{name}: unreadable output ({file} has no valid .npy header)"
            raise EmbeddingError(msg) from None
        if dtype.hasobject:
            msg = f"{name}: unreadable output ({file} holds Python objects, which czb never unpickles)"
            raise EmbeddingError(msg)
        if dtype != np.float32:
            msg = f"{name}: {file} has dtype {dtype}; the contract asks for float32"
            raise EmbeddingError(msg)
        if len(shape) != 2 or shape[0] != n_rows:
            msg = f"{name}: {file} has shape {tuple(shape)} but {CELL_IDS_FILE} lists {n_rows} cells"
            raise EmbeddingError(msg)
        if shape[1] > max_dim:
            msg = f"{name}: {file} has {shape[1]} columns; at most {max_dim} are accepted"
            raise EmbeddingError(msg)
        expected = f.tell() + shape[0] * shape[1] * dtype.itemsize
        if size != expected:
            msg = f"{name}: unreadable output ({file} is {size} bytes; its header describes {expected})"
            raise EmbeddingError(msg)
        # Fortran order on disk is the C order of the transpose.
        values = np.empty(shape[::-1] if fortran else shape, dtype=dtype)
        if values.nbytes and f.readinto(memoryview(values).cast("B")) != values.nbytes:
            msg = f"{name}: unreadable output ({file} ended early)"
            raise EmbeddingError(msg)
    return values.T if fortran else values


def _check_cell_ids(ids: list[str], known: Any, *, name: str) -> None:
    """Every ID must be one of the ``known`` cells, once (checked before any ID is shown)."""
    import pandas as pd

    index = pd.Index(ids, dtype=object)
    if index.has_duplicates:
        msg = f"{name}: {CELL_IDS_FILE} lists {int(index.duplicated().sum())} duplicated cell IDs"
        raise EmbeddingError(msg)
    unknown = int((~index.isin(known)).sum())
    if unknown:
        msg = (
            f"{name}: {unknown} of {len(ids)} IDs in {CELL_IDS_FILE} are not cells of the dataset "
            f"(a model may only return the cell IDs it was given)"
        )
        raise EmbeddingError(msg)


def read_output(
    output_dir: Path,
    *,
    name: str,
    limits: OutputLimits | None = None,
    known_cells: Any = None,
) -> ModelOutput:
    """Read and check ``embeddings.npy``, ``cell_ids.json`` and ``meta.json``.

    Files are read as :func:`collect_output` reads them (regular files only, within
    ``limits``), wherever ``output_dir`` is.

    Parameters
    ----------
    limits
        Size caps (default: generous fixed ones).
    known_cells
        The cell IDs that were sent; every ID in ``cell_ids.json`` must be one of them.

    Raises
    ------
    EmbeddingError
        A file is missing (``meta.json`` absent means the run did not finish), refused,
        not readable without unpickling, of the wrong shape or type.
    """
    limits = limits or OutputLimits()
    with open_folder(Path(output_dir), name=name) as folder:
        meta_bytes = _read_file(folder, META_FILE, limits.meta_bytes, name=name)
        if meta_bytes is None:
            msg = f"{name}: the container exited 0 but wrote no {META_FILE} (the run did not finish)"
            raise EmbeddingError(msg)
        ids_bytes = _read_file(folder, CELL_IDS_FILE, limits.cell_ids_bytes, name=name)
        if ids_bytes is None:
            msg = f"{name}: output file {CELL_IDS_FILE} missing"
            raise EmbeddingError(msg)
        meta = parse_json(meta_bytes, META_FILE, name=name)
        if not isinstance(meta, dict):
            msg = f"{name}: {META_FILE} must be a JSON object"
            raise EmbeddingError(msg)
        ids = parse_json(ids_bytes, CELL_IDS_FILE, name=name)
        del meta_bytes, ids_bytes
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            msg = f"{name}: {CELL_IDS_FILE} must be a JSON list of strings"
            raise EmbeddingError(msg)
        if limits.max_rows is not None and len(ids) > limits.max_rows:
            msg = f"{name}: {CELL_IDS_FILE} lists {len(ids)} cells; the request sent {limits.max_rows}"
            raise EmbeddingError(msg)
        if known_cells is not None:
            _check_cell_ids(ids, known_cells, name=name)
        values = _read_npy(folder, EMBEDDINGS_FILE, name=name, cap=limits.embeddings_bytes,
                           n_rows=len(ids), max_dim=limits.max_dim)
        if values is None:
            msg = f"{name}: output file {EMBEDDINGS_FILE} missing"
            raise EmbeddingError(msg)
    cell_ids = np.asarray(ids, dtype=object)
    values = check_embedding(values, name=name, row_names=cell_ids)
    return ModelOutput(values=values, cell_ids=cell_ids, meta=meta)


def _one_line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most ``limit`` characters."""
    # Control, format (bidi overrides), private and unassigned characters and line breaks
    # become spaces: the text is the container's, shown on the user's terminal.
    cleaned = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in text[: limit * 4])
    line = " ".join(cleaned.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def read_reason(output_dir: Path, *, name: str) -> str | None:
    """The reason in ``reason.json``, as one line of at most :data:`MAX_REASON_CHARS` characters.

    ``None`` when there is no ``reason.json`` or it has no reason.

    Raises
    ------
    EmbeddingError
        ``reason.json`` is refused (not a regular file, too large, not JSON, too deep).
    """
    with open_folder(Path(output_dir), name=name) as folder:
        data = _read_file(folder, REASON_FILE, MAX_REASON_BYTES, name=name)
    if data is None:
        return None
    value = parse_json(data, REASON_FILE, name=name)
    reason = value.get("reason") if isinstance(value, dict) else None
    if reason is None:
        return None
    text = reason if isinstance(reason, str) else json.dumps(reason)
    return _one_line(text, MAX_REASON_CHARS) or None


def read_predictions(
    output_dir: Path, *, name: str, rows: list[str], genes: Any, limits: OutputLimits | None = None
) -> np.ndarray:
    """Read ``predictions.h5ad`` and put its rows and columns in the asked order.

    The file is copied as :func:`collect_output` copies (a regular file within its cap)
    into a private folder, checked (:func:`~czb.runner.hdf5_checks.check_h5ad_structure` with the limits of an
    untrusted producer) and only then read by anndata.

    Raises
    ------
    EmbeddingError
        No ``meta.json`` (the run did not finish), a refused or unreadable file, missing
        or extra rows or genes, or values that are not finite.
    """
    import anndata as ad

    genes = [str(g) for g in genes]
    limits = limits or OutputLimits.for_predictions(len(rows), len(genes))
    with tempfile.TemporaryDirectory(prefix="czb-predictions-") as tmp:
        folder = Path(tmp)
        copied = collect_output(Path(output_dir), folder, limits.prediction_files(), name=name)
        if META_FILE not in copied:
            msg = f"{name}: the container exited 0 but wrote no {META_FILE} (the run did not finish)"
            raise EmbeddingError(msg)
        if not isinstance(parse_json((folder / META_FILE).read_bytes(), META_FILE, name=name), dict):
            msg = f"{name}: {META_FILE} must be a JSON object"
            raise EmbeddingError(msg)
        if PREDICTIONS_FILE not in copied:
            msg = f"{name}: output file {PREDICTIONS_FILE} missing"
            raise EmbeddingError(msg)
        path = folder / PREDICTIONS_FILE
        try:
            check_h5ad_structure(path, name=name, limits=ProducerLimits(max_bytes=limits.predictions_bytes),
                                 shown_as=PREDICTIONS_FILE)
        except DatasetError as e:
            raise EmbeddingError(str(e)) from None
        try:
            predicted = ad.read_h5ad(path)
        except Exception as e:  # noqa: BLE001 - the file is the container's: any failure is its
            msg = f"{name}: cannot read {PREDICTIONS_FILE} ({type(e).__name__})"
            raise EmbeddingError(msg) from None
    for what, want, have in (("rows", rows, predicted.obs_names), ("genes", genes, predicted.var_names)):
        missing = sorted(set(want) - set(map(str, have)))
        if missing or len(have) != len(want):
            msg = (
                f"{name}: {PREDICTIONS_FILE} has {len(have)} {what} where {len(want)} were asked"
                + (f" (missing e.g. {', '.join(missing[:3])})" if missing else "")
            )
            raise EmbeddingError(msg)
    try:
        values = predicted[rows, genes].X
        values = np.asarray(values.toarray() if hasattr(values, "toarray") else values, dtype=np.float64)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        msg = f"{name}: {PREDICTIONS_FILE} has an unusable X ({type(e).__name__})"
        raise EmbeddingError(msg) from None
    if values.shape != (len(rows), len(genes)):
        msg = (f"{name}: {PREDICTIONS_FILE} gives {values.shape} values for "
               f"{len(rows)} rows × {len(genes)} genes")
        raise EmbeddingError(msg)
    if not np.isfinite(values).all():
        msg = f"{name}: {PREDICTIONS_FILE} holds NaN or infinite values"
        raise EmbeddingError(msg)
    return values


def remove_tree(path: Path) -> None:
    """Remove ``path`` (a folder, or anything else) without following links or leaving
    its file system, however deep it goes and whatever its owner did to the permissions
    of the folders inside.

    A container may leave a tree thousands of folders deep (deeper than Python's
    recursion and than ``PATH_MAX``), so the walk is iterative and goes by descriptor,
    one folder at a time: it never builds long paths and holds at most three
    descriptors.

    Raises
    ------
    OSError
        Something could not be removed (the caller decides whether that matters).
    """
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        path.unlink()
        return
    fd = _open_folder_to_remove(os.fspath(path), None)
    try:
        _empty_folder(fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def _open_folder_to_remove(name: str, dir_fd: int | None) -> int:
    """A descriptor of folder ``name``, made readable and writable (a container's user,
    which on a rootless engine is ours, may have left it mode 000)."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except PermissionError:
        _unlock(name, dir_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    with contextlib.suppress(OSError):
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
            os.fchmod(fd, 0o700)
    return fd


def _unlock(name: str, dir_fd: int | None) -> None:
    """``chmod 700`` the folder ``name`` itself, never what a link in its place points to:
    through an ``O_PATH`` descriptor opened without following links, where Linux has one."""
    o_path = getattr(os, "O_PATH", 0)
    if not o_path or not os.path.isdir("/proc/self/fd"):
        os.chmod(name, 0o700, dir_fd=dir_fd)
        return
    fd = os.open(name, o_path | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.chmod(f"/proc/self/fd/{fd}", 0o700)
    finally:
        os.close(fd)


def _empty_folder(root_fd: int) -> None:
    """Remove everything inside the folder ``root_fd``, depth first, without recursion.

    Going down opens a child relative to its parent; going up opens ``..`` and checks it
    is the folder that was left (device and inode), so a tree changed meanwhile stops
    the walk rather than leading it elsewhere. A folder on another file system (a mount
    point) is refused, never entered.
    """
    root = os.fstat(root_fd)
    trail: list[tuple[str, int, int]] = []  # (name, device, inode) of each folder above the current one
    fd = os.dup(root_fd)
    try:
        while True:
            child, removed = None, 0
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    os.unlink(entry.name, dir_fd=fd)
                    removed += 1
            if child is None and removed:
                continue  # look again: a listing need not show names while others go
            if child is not None:
                here = os.fstat(fd)
                child_fd = _open_folder_to_remove(child, fd)
                if os.fstat(child_fd).st_dev != root.st_dev:
                    os.close(child_fd)
                    msg = f"{child} is a mount point"
                    raise OSError(errno.EXDEV, msg)
                trail.append((child, here.st_dev, here.st_ino))
                os.close(fd)
                fd = child_fd
                continue
            if not trail:
                return  # the root is empty
            name, device, inode = trail.pop()
            parent_fd = root_fd if not trail else os.open("..", _DIR_FLAGS, dir_fd=fd)
            parent = os.fstat(parent_fd)
            if (parent.st_dev, parent.st_ino) != (device, inode):
                if parent_fd != root_fd:
                    os.close(parent_fd)
                msg = "the tree changed while it was being removed"
                raise OSError(errno.ESTALE, msg)
            os.close(fd)
            fd = os.dup(parent_fd) if parent_fd == root_fd else parent_fd
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)


def read_tail(folder: Path, file: str, n: int, *, max_bytes: int = 1 << 20) -> list[str]:
    """The last ``n`` lines of a regular file ``file`` in ``folder`` (its last ``max_bytes`` only)."""
    try:
        with open_folder(folder, name="embedding cache") as dir_fd:
            fd = open_regular(dir_fd, file, UNLIMITED, name="embedding cache")
            if fd is None:
                return []
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - max_bytes))
                lines = f.read(max_bytes).decode("utf-8", errors="replace").splitlines()
        return (lines[1:] if size > max_bytes else lines)[-n:]
    except (OSError, EmbeddingError):
        return []
