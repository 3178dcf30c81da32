"""What scoring reads of a dataset: its record, per-cell roles and expression, aligned with an embedding's rows."""

from __future__ import annotations

from typing import Any

import numpy as np

from czb.core import records as R
from czb.data.dataset import Dataset


def dataset_roles(ds: Dataset, cell_index: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-cell annotations of a dataset by role, restricted to ``cell_index`` when given.

    ``species`` is always there (the spec's organism unless an obs column holds it).
    ``labels`` and ``batch`` are strings, ``None`` for a cell without a value (NaN,
    ``None``, empty: :func:`~czb.core.missing.missing_mask`; for several
    batch keys, a cell missing any of them), never the text ``"nan"``: the evaluation
    leaves those cells out of the tasks that need the role and counts them.
    """
    roles: dict[str, np.ndarray] = {"labels": ds.labels, "species": ds.role("species")}
    if ds.batches is not None:
        roles["batch"] = ds.batches
    if ds.controls is not None:
        roles["control"] = ds.controls
    for role in ds.spec.extra_keys:
        roles[role] = ds.role(role)
    if cell_index is not None:
        roles = {k: v[cell_index] for k, v in roles.items()}
    return roles


def map_labels(labels: np.ndarray | None) -> np.ndarray | None:
    """Labels for a report map's legend: a cell without one shows as ``(no label)``."""
    from czb.core.missing import missing_mask

    if labels is None:
        return None
    labels = np.asarray(labels, dtype=object).copy()
    labels[missing_mask(labels)] = "(no label)"
    return labels


def dataset_expression(ds: Dataset, cell_index: np.ndarray | None = None) -> Any:
    """The dataset's expression for tasks that read it (rows restricted to ``cell_index``).

    A matrix on disk stays there (the tasks read it in row chunks); its rows are
    restricted lazily (:class:`~czb.evaluation.row_subset.RowSubset`), never copied.
    """
    from czb.data.matrix import BackedMatrix
    from czb.evaluation.perturbation.expression import Expression
    from czb.evaluation.row_subset import RowSubset

    X = ds.adata.X
    if cell_index is not None:
        X = RowSubset(X, cell_index) if isinstance(X, BackedMatrix) else X[cell_index]
    return Expression(X, ds.gene_symbols(), kind=ds.spec.expression)


def dataset_record(ds: Dataset) -> R.DatasetRecord:
    return R.DatasetRecord(name=ds.name, uri=ds.spec.uri, sha256=ds.sha256, n_cells=ds.n_cells, n_genes=ds.n_genes)
