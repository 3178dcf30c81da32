"""The container contract (version 1) as files, and the host's reading of ``/output``.

The names of the files that cross the boundary, the exit codes, the size caps of what a
container may leave in ``/output`` (:class:`OutputLimits`), and the readers of those
files: :func:`read_output` (embeddings), :func:`read_predictions` (perturbation
predictions) and :func:`read_reason`. Each file is opened, read or copied as
:mod:`czb.models.docker.output_files` does: only the expected names, regular files within
their caps, never through a link.
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from czb.core import untrusted
from czb.core.errors import DatasetError, EmbeddingError
from czb.data.hdf5_checks import ProducerLimits, check_h5ad_structure
from czb.models.docker.output_files import collect_output, open_folder, open_regular, read_regular
from czb.models.embedding import check_embedding

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

#: Caps of the small JSON files (parsed whole) and of their nesting. ``meta.json`` is kept
#: in results about 4 levels down (``model.info.container_meta``), so its cap leaves room
#: under what result readers accept (``czb.core.records.MAX_RESULT_DEPTH``, 64).
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

    Files are read as :func:`~czb.models.docker.output_files.collect_output` reads them
    (regular files only, within ``limits``), wherever ``output_dir`` is.

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
        meta_bytes = read_regular(folder, META_FILE, limits.meta_bytes, name=name)
        if meta_bytes is None:
            msg = f"{name}: the container exited 0 but wrote no {META_FILE} (the run did not finish)"
            raise EmbeddingError(msg)
        ids_bytes = read_regular(folder, CELL_IDS_FILE, limits.cell_ids_bytes, name=name)
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
        data = read_regular(folder, REASON_FILE, MAX_REASON_BYTES, name=name)
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

    The file is copied as :func:`~czb.models.docker.output_files.collect_output` copies (a
    regular file within its cap) into a private folder, checked (:func:`~czb.data.hdf5_checks.check_h5ad_structure` with the limits of an
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
