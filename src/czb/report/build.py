"""``czb report``: result files in, an HTML report (or CSV, Markdown, terminal table) out."""

from __future__ import annotations

import io
import math
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from czb.core import records as R
from czb.core.errors import EmbeddingWarning, ResultsError
from czb.core.untrusted import read_bounded
from czb.report.html import EmbeddingMap, render_html
from czb.report.layout import umap_layout
from czb.report.tables import Comparison, compare, load_results

#: Cells per 2-D map (a label-stratified subsample of the stored sample).
MAP_CELLS = 5_000
#: Largest embedding sample file a report reads (czb writes at most 10,000 cells).
MAX_SAMPLE_BYTES = 256 << 20
#: Most bytes the arrays of a sample may unpack to (as declared, and as read).
MAX_SAMPLE_UNPACKED = 1 << 30
#: Most cells a sample may hold: czb keeps :data:`~czb.core.records.MAP_SAMPLE_CELLS`,
#: plus whole small labels.
MAX_SAMPLE_ROWS = 8 * R.MAP_SAMPLE_CELLS
#: Most dimensions of a sample's embedding (models give tens to a few thousand).
MAX_SAMPLE_DIMS = 8192
#: Arrays read for a map; ``cells`` is only checked to line up.
_SAMPLE_ARRAYS = ("X", "labels", "batches")
_ROW_ARRAYS = ("labels", "batches", "cells")


def _sample_location(result_file: Path, root: Path, relative: str) -> Path | None:
    """Where a result's embedding sample is (relative to the result file's folder), or
    ``None`` when it would be outside the results folder given (symlinks resolved)."""
    if not relative or "\0" in relative or Path(relative).is_absolute():
        return None
    location = (result_file.parent / relative).resolve()
    return location if root.resolve() in location.parents else None


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of one array of an ``.npz`` from its header, or ``None`` when it
    holds objects (pickles) or claims more bytes than its member has."""
    from numpy.lib import format as npy

    with zf.open(info) as f:
        version = npy.read_magic(f)
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = read_header(f)
    if dtype.hasobject or math.prod(shape) * dtype.itemsize > info.file_size:
        return None
    return shape, dtype


def _shape_problem(headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> str | None:
    """Why arrays of these shapes cannot be a map's sample (checked before any is read:
    a tiny file can declare a huge array of empty rows), or ``None``."""
    if "X" not in headers:
        return "holds no array X"
    shape, dtype = headers["X"]
    if len(shape) != 2 or dtype.kind not in "fiu":
        return "holds no 2-D numeric array X"
    rows, dims = shape
    if not 3 <= rows <= MAX_SAMPLE_ROWS or not 1 <= dims <= MAX_SAMPLE_DIMS:
        return (f"has an X of {rows:,} x {dims:,}; a sample has 3 to {MAX_SAMPLE_ROWS:,} cells "
                f"of 1 to {MAX_SAMPLE_DIMS:,} dimensions")
    for key in _ROW_ARRAYS:
        if key in headers:
            other, kind = headers[key]
            if other != (rows,) or kind.kind not in ("U", "S", "i", "u"):
                return f"has {key} that do not line up with its {rows:,} cells"
    return None


def read_embedding_sample(result_file: Path, root: Path, relative: str) -> tuple[dict[str, np.ndarray] | None, str]:
    """The arrays of the embedding sample a result names, read only if it is a regular
    file inside the results folder; otherwise ``None`` and why (never the path it names)."""
    location = _sample_location(result_file, root, relative)
    if location is None:
        return None, "its embedding sample is not inside the results folder"
    try:
        raw = read_bounded(location, MAX_SAMPLE_BYTES, follow_symlinks=False, allow_hard_links=False)
    except OSError:
        return None, "its embedding sample cannot be read"
    except ValueError as e:
        return None, f"its embedding sample is {e}"
    from numpy.lib import format as npy

    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            infos = {i.filename.removesuffix(".npy"): i for i in zf.infolist()}
            if sum(i.file_size for i in infos.values()) > MAX_SAMPLE_UNPACKED:
                return None, "its embedding sample unpacks to more than the limit"
            headers = {}
            for key in {*_SAMPLE_ARRAYS, *_ROW_ARRAYS} & infos.keys():
                header = _npy_header(zf, infos[key])
                if header is None:
                    return None, "its embedding sample is not a plain array file"
                headers[key] = header
            problem = _shape_problem(headers)
            if problem is not None:
                return None, f"its embedding sample {problem}"
            for key in _SAMPLE_ARRAYS:
                if key in infos:
                    with zf.open(infos[key]) as f:
                        arrays[key] = npy.read_array(f, allow_pickle=False)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError):
        return None, "its embedding sample is not a readable .npz"
    if any(arrays[k].shape != headers[k][0] for k in arrays):
        return None, "its embedding sample is not a readable .npz"
    if not np.isfinite(arrays["X"]).all():
        return None, "its embedding sample holds values that are not finite"
    return arrays, ""


def embedding_maps(
    loaded: Sequence[tuple[Path, object]], comparison: Comparison, *, max_cells: int = MAP_CELLS,
    roots: Mapping[Path, Path] | None = None, notes: dict[tuple[str, str], str] | None = None,
) -> dict[tuple[str, str], EmbeddingMap]:
    """UMAP maps of the embedding samples the results point to, one per (dataset, model).

    A sample is read only inside its results folder (``roots[result_file]``, default the
    result file's folder) and only as a regular file within size limits; one that is
    missing, elsewhere or unreadable is skipped with a warning naming the result file
    (and a note in ``notes``); the rest of the report does not depend on it.
    """
    from czb.core.sampling import stratified_rows

    roots = roots or {}
    maps: dict[tuple[str, str], EmbeddingMap] = {}
    for path, record in loaded:
        model = comparison.model_of(record)
        key = (record.dataset.name, model)
        if model is None or key in maps or not record.embedding_sample:
            continue
        arrays, reason = read_embedding_sample(path, roots.get(path, path.parent), record.embedding_sample)
        if arrays is not None:
            X = arrays["X"]
            rows = stratified_rows(len(X), arrays.get("labels"), max_cells)
            pick = {k: v[rows] for k, v in arrays.items() if k in ("labels", "batches")}
            try:
                maps[key] = EmbeddingMap(umap_layout(X[rows]), pick.get("labels"), pick.get("batches"), len(X))
                continue
            except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError):
                reason = "no 2-D layout could be computed from its embedding sample"
        warnings.warn(f"{path}: map skipped: {reason}", EmbeddingWarning, stacklevel=2)
        if notes is not None:
            notes.setdefault(key, reason)
    return maps


def make_report(
    paths: Sequence[str | Path],
    output: Path | None,
    *,
    fmt: str = "html",
    command: str = "",
    max_map_cells: int = MAP_CELLS,
    maps: bool = True,
) -> str:
    """Read result files, merge them, and render the report.

    Parameters
    ----------
    paths
        Result JSONs or folders of them.
    output
        File to write (:func:`~czb.core.records.write_output`: atomically, or into a
        device or FIFO such as ``/dev/stdout``); ``None``: only return the text.
    fmt
        ``html``, ``csv`` or ``md``.
    maps
        Compute the 2-D embedding maps (HTML only).

    Returns
    -------
    The rendered text.
    """
    from czb.report.exports import to_csv, to_markdown

    results = load_results(paths)
    loaded = [(file, record) for file, _, record in results]
    comparison = compare([r for _, r in loaded])
    if fmt == "html":
        notes: dict[tuple[str, str], str] = {}
        roots = {file: root for file, root, _ in results}
        found = (embedding_maps(loaded, comparison, max_cells=max_map_cells, roots=roots, notes=notes)
                 if maps else {})
        text = render_html(comparison, maps=found, command=command, notes=notes)
    elif fmt == "csv":
        text = to_csv(comparison)
    elif fmt == "md":
        text = to_markdown(comparison)
    else:
        msg = f"unknown report format {fmt!r}: html, csv or md"
        raise ResultsError(msg)
    if output is not None:
        R.write_output(Path(output), text.encode("utf-8"), what="report")
    return text
