"""``czb report``: result files in, an HTML report (or CSV, Markdown, terminal table) out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from czb.errors import ResultsError
from czb.report.html import EmbeddingMap, render_html
from czb.report.layout import umap_layout
from czb.report.tables import Comparison, compare, read_results
from czb.runner import results as R

#: Cells per 2-D map (a label-stratified subsample of the stored sample).
MAP_CELLS = 5_000


def embedding_maps(
    loaded: Sequence[tuple[Path, object]], comparison: Comparison, *, max_cells: int = MAP_CELLS,
) -> dict[tuple[str, str], EmbeddingMap]:
    """UMAP maps of the embedding samples the results point to, one per (dataset, model).

    A sample that is missing or unreadable is skipped (the report says none was found);
    the rest of the report does not depend on it.
    """
    from czb.evaluation.estimates import stratified_rows

    maps: dict[tuple[str, str], EmbeddingMap] = {}
    for path, record in loaded:
        model = comparison.model_of(record)
        key = (record.dataset.name, model)
        if model is None or key in maps or not record.embedding_sample:
            continue
        try:
            with np.load(path.parent / record.embedding_sample, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except (OSError, ValueError, KeyError):
            continue
        X = arrays.get("X")
        if X is None or X.ndim != 2 or len(X) < 3:
            continue
        rows = stratified_rows(len(X), arrays.get("labels"), max_cells)
        pick = {k: v[rows] for k, v in arrays.items() if k in ("labels", "batches")}
        maps[key] = EmbeddingMap(umap_layout(X[rows]), pick.get("labels"), pick.get("batches"), len(X))
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
        File to write (atomically); ``None``: only return the text.
    fmt
        ``html``, ``csv`` or ``md``.
    maps
        Compute the 2-D embedding maps (HTML only).

    Returns
    -------
    The rendered text.
    """
    from czb.report.exports import to_csv, to_markdown

    loaded = read_results(paths)
    comparison = compare([r for _, r in loaded])
    if fmt == "html":
        found = embedding_maps(loaded, comparison, max_cells=max_map_cells) if maps else {}
        text = render_html(comparison, maps=found, command=command)
    elif fmt == "csv":
        text = to_csv(comparison)
    elif fmt == "md":
        text = to_markdown(comparison)
    else:
        msg = f"unknown report format {fmt!r}: html, csv or md"
        raise ResultsError(msg)
    if output is not None:
        R.write_atomically(Path(output), text.encode("utf-8"), what="report")
    return text
