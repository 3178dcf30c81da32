"""Checking .h5ad (HDF5) files before anndata, scipy or numpy read them.

An .h5ad file can come from anywhere (a dataset someone published, a user's
embeddings, a model container's predictions), and the libraries that read it trust its
structure: a sparse matrix whose row pointers run past its values makes scipy read out
of bounds (a segfault, not an exception), and an array that claims 300M values it does
not store makes anndata allocate gigabytes before anything fails. HDF5 can also reach
outside the file (external links, external storage, virtual datasets) and pull another
host file into a run. :func:`check_h5ad_structure` and :func:`check_h5ad_element` refuse
all of this from metadata and one chunked pass over sparse indices, with one
:class:`~czb.core.errors.DatasetError` naming the file and element and never quoting them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from czb.core.errors import DatasetError
from czb.core.terminal import human_bytes

__all__ = [
    "FileCheck",
    "MAX_DIMENSION",
    "NUMERIC_KINDS",
    "ProducerLimits",
    "check_array",
    "check_element",
    "check_group",
    "check_h5ad_element",
    "check_h5ad_structure",
    "check_links",
    "check_sparse_group",
    "read_error_cause",
    "sparse_format",
    "unreadable_file",
]


def unreadable_file(name: str, path: Path, e: BaseException, *, shown_as: str | None = None) -> DatasetError:
    """A one-line error for a file h5py/anndata cannot read, saying what it is if not HDF5."""
    from czb.io.content import describe_content

    shown = shown_as or path
    what = describe_content(path, expected="hdf5")
    if what is not None:
        msg = (
            f"{name}: cannot read {shown} as .h5ad (it is {what}, not an HDF5 file); "
            "the file may be corrupt or truncated"
        )
    else:
        msg = (
            f"{name}: cannot read {shown} as .h5ad ({read_error_cause(e)}); "
            "the file may be corrupt or truncated"
        )
    return DatasetError(msg)


# Library text that may stand in an error message: no double quotes, brackets or other
# marks that parsers put around the pieces of a file they quote (single-quoted names
# are masked before this is applied; an apostrophe may remain, as in "doesn't").
_SAFE_DETAIL = re.compile(r"^[A-Za-z0-9 ,.;:=()_+/>'-]{1,200}$")


def read_error_cause(error: BaseException) -> str:
    """Why reading a file failed, in words that never quote the file.

    Parsers put pieces of the file into their messages (numpy: ``got b'root:x'``; csv
    and pandas: the offending field; h5py: object names), and a file can be anything a
    spec points at. Kept are the system's error text (``strerror``) and HDF5's own
    messages when they hold no quoted text; anything else is named by its type only.

    Parameters
    ----------
    error
        The exception a reader raised.

    Returns
    -------
    A short phrase, e.g. ``"Permission denied"`` or ``"ValueError"``.
    """
    if isinstance(error, MemoryError):
        return "out of memory"
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return str(error.strerror)
    if isinstance(error, EOFError):
        return "the file ends early"
    text = error.args[0] if error.args and isinstance(error.args[0], str) else ""
    text = text.strip().splitlines()[0] if text.strip() else ""
    # h5py raises plain OSError/KeyError with HDF5's message ("Unable to ... (detail)");
    # the object names it quotes may come from the file, so they are left out.
    text = re.sub(r"'[^']*'", "...", text)
    if isinstance(error, (OSError, KeyError)) and text.startswith("Unable to") and _SAFE_DETAIL.match(text):
        return text
    return type(error).__name__


#: Largest matrix dimension accepted (cells or genes); no real dataset comes near it.
MAX_DIMENSION = 2**31 - 1
#: An element claiming more than this many times the bytes HDF5 stores for it is
#: refused: counts, indices and row pointers compress 2-20 fold; 1000-fold is padding
#: made to look like data...
_MAX_COMPRESSION_RATIO = 1000
#: ... when it claims at least this much (small elements are never refused for it).
_RATIO_MIN_BYTES = 64 << 20
#: dtype kinds of matrix values: bool, signed and unsigned integers, floats.
NUMERIC_KINDS = "biuf"
#: Sparse indices read per step when checking their range (4M values, 16-32 MB).
INDEX_CHUNK = 1 << 22


@dataclass(frozen=True)
class ProducerLimits:
    """Extra limits for a file made by code czb does not trust (a model container).

    A dataset is whatever its owner published; a container's output is held to what the
    request asked for: no soft links or object references (anndata writes neither), at
    most ``max_objects`` groups and arrays nested at most ``max_depth`` deep, and no
    array larger than ``max_bytes`` (a tiny file can declare a huge fill-valued one).
    """

    max_bytes: int
    max_objects: int = 10_000
    max_depth: int = 32


@dataclass
class FileCheck:
    """One file being checked: its path and size, how messages name it, and what to
    enforce (``check_indices``: read every sparse index; ``limits``: for untrusted
    producers). ``seen`` holds the objects already checked, so each is checked once."""

    path: Path
    name: str
    file_size: int
    check_indices: bool = True
    limits: ProducerLimits | None = None
    #: How messages name the file (default: its path), e.g. for a private copy of it.
    shown_as: str | None = None
    seen: set = field(default_factory=set)

    @property
    def shown(self) -> str:
        return self.shown_as or str(self.path)

    def fail(self, element: str, problem: str) -> DatasetError:
        return DatasetError(f"{self.name}: {self.shown}: element {element!r} {problem}")


def check_h5ad_structure(
    path: Path, *, name: str, limits: ProducerLimits | None = None, shown_as: str | None = None
) -> None:
    """Check every element of an .h5ad file before anything reads it.

    Cheap checks of what each element claims against what HDF5 stores, for every
    array in the file, and the full structure of every sparse matrix (``X``,
    ``raw/X``, ``layers/*``, ``obsm/*`` and anywhere else; anndata's
    ``csr_matrix``/``csc_matrix`` encoding and the ``h5sparse`` layout of files written
    by anndata < 0.7):

    - no external links, external storage or virtual datasets (they read other files);
    - sizes: a contiguous array stores all its bytes inside the file, a chunked one
      has every chunk allocated and is not compressed more than 1000-fold (a file
      claiming 300M values it does not store is refused at once, not after reading);
    - sparse matrices: a shape of two non-negative integers; ``data``, ``indices`` and
      ``indptr`` 1-D, numeric values, integer indices; ``indptr`` of length
      ``n_major + 1``, starting at 0, non-decreasing and ending at ``nnz == len(data)
      == len(indices)``; every index in ``[0, n_minor)`` (read 4M values at a time).

    Unsorted or repeated indices within a row are accepted, as scipy accepts them
    (repeated entries count as their sum).

    Parameters
    ----------
    path
        The .h5ad file.
    name
        What the file is, for messages, e.g. ``"dataset 'pbmc'"`` or ``"model 'scgpt'"``;
        every message starts with it.
    limits
        For files from untrusted code (:class:`ProducerLimits`); ``None`` for data files.
    shown_as
        How messages name the file (default: its path).

    Raises
    ------
    DatasetError
        One line naming the file, the element and what is wrong (the file is not HDF5,
        cannot be read, or an element fails a check).
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            check_group(f, FileCheck(path, name, path.stat().st_size, limits=limits, shown_as=shown_as))
    except (DatasetError, MemoryError):
        raise
    except Exception as e:  # h5py raises OSError, KeyError, ValueError... on bad files
        raise unreadable_file(name, path, e, shown_as=shown_as) from e


def check_h5ad_element(f: Any, element: str, *, path: Path, name: str) -> None:
    """Check one element of an open .h5ad file (and all under it) before reading it.

    The checks of :func:`check_h5ad_structure`, limited to ``element`` (e.g.
    ``"obsm/X_pca"`` or ``"obs"``), for readers that read only part of a file.

    Parameters
    ----------
    f
        The file, open with h5py.
    element
        Path of the element inside the file; a missing element passes (its reader
        reports it).
    path
        The file's path, for messages and its size.
    name
        What the file is, for messages; every message starts with it.

    Raises
    ------
    DatasetError
        One line naming the file, the element and what is wrong.
    """
    check_element(f, element, FileCheck(Path(path), name, Path(path).stat().st_size))


def _text_attr(node: Any, key: str) -> str | None:
    value = node.attrs.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def sparse_format(group: Any) -> tuple[str, Any] | None:
    """``(format, shape attribute)`` of a sparse-matrix group, or ``None`` for other groups.

    anndata >= 0.7 writes ``encoding-type: csr_matrix`` (or ``csc_matrix``) and
    ``shape``; older versions wrote ``h5sparse_format: csr`` and ``h5sparse_shape``.
    An unknown format comes back as it is, for :func:`check_sparse_group` to refuse.
    """
    encoding = _text_attr(group, "encoding-type")
    if encoding in ("csr_matrix", "csc_matrix"):
        return encoding[:3], group.attrs.get("shape")
    if "h5sparse_format" in group.attrs:
        return _text_attr(group, "h5sparse_format") or "", group.attrs.get("h5sparse_shape")
    return None


def _matrix_shape(value: Any) -> tuple[int, int] | None:
    """A shape attribute as two ints in ``[0, MAX_DIMENSION]``, or ``None`` if it is not one."""
    try:
        array = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything odd is "not a shape"
        return None
    if array.shape != (2,) or array.dtype.kind not in "iu":
        return None
    if array.min() < 0 or array.max() > MAX_DIMENSION:
        return None
    return int(array[0]), int(array[1])


def check_sparse_group(group: Any, scope: FileCheck) -> tuple[str, tuple[int, int], np.ndarray]:
    """Check a sparse-matrix group (see :func:`check_h5ad_structure`) before scipy sees it.

    Returns
    -------
    The storage (``"csr"`` or ``"csc"``), the shape, and ``indptr`` as int64.
    """
    import h5py

    element = group.name.lstrip("/")

    def malformed(problem: str) -> DatasetError:
        msg = (
            f"{scope.name}: {scope.shown} holds a malformed sparse matrix at {element!r} ({problem}); "
            "the file may be corrupt or truncated"
        )
        return DatasetError(msg)

    storage, shape_attr = sparse_format(group)
    if storage not in ("csr", "csc"):
        raise malformed("its sparse format is neither CSR nor CSC")
    shape = _matrix_shape(shape_attr)
    if shape is None:
        raise malformed(f"its shape is not two integers from 0 to {MAX_DIMENSION}")
    members = {}
    for member in ("data", "indices", "indptr"):
        check_links(group, member, scope)
        node = group.get(member)
        if not isinstance(node, h5py.Dataset) or node.ndim != 1:
            raise malformed(f"{member!r} is missing or not a 1-D array")
        check_array(node, scope)
        members[member] = node
    data, indices, indptr_node = members["data"], members["indices"], members["indptr"]
    if data.dtype.kind not in NUMERIC_KINDS:
        raise malformed(f"its values are not numbers (dtype {data.dtype})")
    for member in ("indices", "indptr"):
        if members[member].dtype.kind not in "iu":
            raise malformed(f"{member!r} does not hold integers")
    n_major, n_minor = shape if storage == "csr" else shape[::-1]
    major, minor = ("rows", "column") if storage == "csr" else ("columns", "row")
    nnz = int(data.shape[0])
    if int(indices.shape[0]) != nnz:
        raise malformed(f"{nnz} values but {indices.shape[0]} {minor} indices")
    if int(indptr_node.shape[0]) != n_major + 1:
        raise malformed(f"indptr has {indptr_node.shape[0]} entries for {n_major} {major}")
    raw = indptr_node[:]
    if raw[0] != 0 or raw[-1] != nnz:
        raise malformed(f"indptr runs from {raw[0]} to {raw[-1]}; it must run from 0 to the {nnz} stored values")
    # Compared before any cast: an unsigned pointer beyond int64 must not wrap around.
    beyond = np.flatnonzero(raw > nnz)
    if beyond.size:
        raise malformed(f"indptr entry {int(beyond[0])} points past the {nnz} stored values")
    indptr = raw.astype(np.int64, copy=False)
    decreasing = np.flatnonzero(np.diff(indptr) < 0)
    if decreasing.size:
        raise malformed(f"indptr decreases after entry {int(decreasing[0])}")
    if scope.check_indices:
        for lo in range(0, nnz, INDEX_CHUNK):
            block = indices[lo : lo + INDEX_CHUNK]
            if block.size and (block.min() < 0 or block.max() >= n_minor):
                raise malformed(f"{minor} indices outside [0, {n_minor}) among stored values {lo}-{lo + block.size - 1}")
    return storage, shape, indptr


def check_array(dset: Any, scope: FileCheck) -> None:
    """What an HDF5 array claims (shape × item size) against what the file stores.

    Metadata only, so it takes microseconds: a truncated or forged file is refused
    before anything is read or allocated. A compressed array stores fewer bytes than it
    holds, but every one of its chunks is allocated.
    """
    import h5py

    element = dset.name.lstrip("/")

    def fail(problem: str) -> DatasetError:
        return scope.fail(element, problem)

    if dset.is_virtual:
        raise fail("maps its values from other files (an HDF5 virtual dataset), which czb does not read")
    if dset.external:
        raise fail("keeps its values in other files (HDF5 external storage), which czb does not read")
    claimed = int(dset.size or 0) * int(dset.id.get_type().get_size())
    if scope.limits is not None:
        if h5py.check_dtype(ref=dset.dtype) is not None:
            raise fail("holds object references; only plain values are accepted")
        if claimed > scope.limits.max_bytes:
            raise fail(f"claims {human_bytes(claimed)}, over the limit of {human_bytes(scope.limits.max_bytes)}")
    if claimed == 0:
        return
    plist = dset.id.get_create_plist()
    layout = plist.get_layout()
    stored = int(dset.id.get_storage_size())
    what = f"claims {dset.size} values ({human_bytes(claimed)})"
    if stored > scope.file_size:
        raise fail(f"{what} in {human_bytes(stored)}, more than the whole file; the file is corrupt")
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        if stored < claimed or offset is None or offset + claimed > scope.file_size:
            available = min(stored, max(scope.file_size - (offset or 0), 0))
            raise fail(f"{what} but the file stores {human_bytes(available)} of them; the file is truncated or forged")
    elif layout == h5py.h5d.CHUNKED:
        expected = 1
        for size, chunk in zip(dset.shape, dset.chunks):
            expected *= -(-int(size) // int(chunk))
        allocated = int(dset.id.get_num_chunks())
        if allocated < expected:
            raise fail(f"{what} in {expected} chunks, but only {allocated} are stored; the file is truncated or forged")
        if plist.get_nfilters() == 0 and stored < claimed:
            raise fail(f"{what} but stores only {human_bytes(stored)}; the file is truncated or forged")
        if claimed >= _RATIO_MIN_BYTES and claimed > stored * _MAX_COMPRESSION_RATIO:
            raise fail(
                f"{what} from {human_bytes(stored)} of compressed data (more than "
                f"{_MAX_COMPRESSION_RATIO}-fold); refusing it as implausible"
            )


def _refuse_link(group: Any, key: str, link: Any, scope: FileCheck) -> bool:
    """Raise for a link czb does not follow; ``True`` for a hard link (an object to check)."""
    import h5py

    where = f"{group.name.rstrip('/')}/{key}".lstrip("/")
    if isinstance(link, h5py.ExternalLink):
        raise scope.fail(where, "links to another file, which czb does not follow")
    if isinstance(link, h5py.SoftLink) and scope.limits is not None:
        raise scope.fail(where, "is a soft link; only plain groups and arrays are accepted")
    return isinstance(link, h5py.HardLink)


def check_links(group: Any, element: str, scope: FileCheck) -> None:
    """No external link on the way to ``element``: it would open another file on the host."""
    import h5py

    node = group
    for part in element.strip("/").split("/"):
        link = node.get(part, getlink=True)
        if link is None or part not in node:
            return  # missing: reported by whoever reads it
        _refuse_link(node, part, link, scope)
        node = node[part]
        if not isinstance(node, h5py.Group):
            return


def check_element(f: Any, element: str, scope: FileCheck) -> None:
    """Check one element (an array, a sparse matrix, or a group of anything) before reading it."""
    check_links(f, element, scope)
    if element in f:  # a missing one is reported by whoever reads it
        _check_node(f[element], scope, depth=0)


def check_group(group: Any, scope: FileCheck, depth: int = 0) -> None:
    """Check everything under ``group`` (hard links only; each object once)."""
    limits = scope.limits
    if limits is not None and depth > limits.max_depth:
        raise scope.fail(group.name.lstrip("/"), f"is nested more than {limits.max_depth} groups deep")
    for key in group:
        if not _refuse_link(group, key, group.get(key, getlink=True), scope):
            continue  # a soft link (data files only) names an object checked where it lives
        node = group[key]
        if node.id in scope.seen:
            continue
        scope.seen.add(node.id)
        if limits is not None and len(scope.seen) > limits.max_objects:
            raise scope.fail(group.name.lstrip("/") or "/", f"is part of more than {limits.max_objects} objects")
        _check_node(node, scope, depth=depth + 1)


def _check_node(node: Any, scope: FileCheck, *, depth: int) -> None:
    """An array, a sparse matrix, or a group of anything."""
    import h5py

    if isinstance(node, h5py.Dataset):
        check_array(node, scope)
    elif isinstance(node, h5py.Group):
        if sparse_format(node) is not None:
            check_sparse_group(node, scope)
        else:
            check_group(node, scope, depth)
