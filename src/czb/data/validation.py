"""Checking a loaded dataset against its spec, before any heavy work.

:func:`validate_dataset` raises a one-line :class:`~czb.core.errors.DatasetError`
naming the dataset, the key and what was found.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np

from czb.core.errors import DatasetError, DatasetWarning
from czb.data.dataset import Dataset
from czb.data.gene_ids import (
    ANY_ENSEMBL,
    MIN_ENSEMBL_SHARE,
    PREFIX_PATTERNS,
    describe_gene_ids,
    gene_sample,
    pattern_share,
)
from czb.data.matrix import iter_row_chunks, row_sums
from czb.data.messages import available, examples
from czb.specs.schema import ORGANISMS

__all__ = ["check_obs_keys", "validate_dataset"]

#: Roles every spec fills without extra_keys.
_BUILTIN_ROLES = {"label", "batch", "species"}
#: Rows sampled to decide whether values are integers.
_INTEGER_CHECK_ROWS = 2000
#: Above this maximum, non-integer data are normalised but not log-transformed.
_LOG_MAX = 30.0

def check_obs_keys(ds: Dataset) -> None:
    """Check that the spec's label, batch, extra and control keys are obs columns
    (:class:`~czb.core.errors.DatasetError` naming the closest columns), and warn
    (:class:`~czb.core.errors.DatasetWarning`) when some cells have no label."""
    spec, obs = ds.spec, ds.adata.obs
    wanted = [("label_key", spec.label_key)]
    wanted += [("batch_key", k) for k in spec.batch_keys]
    wanted += [(f"extra_keys.{role}", k) for role, k in spec.extra_keys.items()]
    if spec.control_key is not None:
        wanted.append(("control_key", spec.control_key))
    for what, key in wanted:
        if key not in obs.columns:
            msg = (
                f"dataset {ds.name!r}: {what} {key!r} is not an obs column; "
                f"available: {available(key, obs.columns)}"
            )
            raise DatasetError(msg)
    n_missing = sum(label is None for label in ds.labels)
    if n_missing:
        warnings.warn(
            f"dataset {ds.name!r}: {n_missing} of {ds.n_cells} cells have no value in label_key "
            f"{spec.label_key!r}; tasks that need a label leave them out and count them",
            DatasetWarning,
            stacklevel=3,
        )


def _check_gene_ids(ds: Dataset) -> None:
    spec = ds.spec
    names = gene_sample(str(n) for n in ds.adata.var_names)
    where = ds.extras.get("gene_source", "var_names")
    if spec.gene_id_type == "ensembl":
        share = pattern_share(PREFIX_PATTERNS[spec.organism], names)
        if share < MIN_ENSEMBL_SHARE:
            prefix = ORGANISMS[spec.organism].ensembl_prefix
            msg = (
                f"dataset {ds.name!r}: {where} {describe_gene_ids(names)}, but the spec declares "
                f"gene_id_type 'ensembl' for organism {spec.organism!r} "
                f"(only {share:.0%} start with {prefix}; need {MIN_ENSEMBL_SHARE:.0%})"
            )
            raise DatasetError(msg)
    elif spec.gene_id_type == "symbol":
        share = pattern_share(ANY_ENSEMBL, names)
        if share >= 0.5:
            msg = (
                f"dataset {ds.name!r}: {where} {describe_gene_ids(names)} ({share:.0%} of them), "
                "but the spec declares gene_id_type 'symbol'"
            )
            raise DatasetError(msg)


def _first_bad_cell(ds: Dataset, row: int) -> str:
    return repr(str(ds.adata.obs_names[row]))


def _check_values(ds: Dataset) -> None:
    """Finite and non-negative everywhere; integers (on sampled rows) for raw counts."""
    import scipy.sparse as sp

    X, name, spec = ds.adata.X, ds.name, ds.spec
    where = f"expression matrix (layer {spec.layer!r})"

    # Finite and non-negative: sparse matrices only need their stored values.
    blocks = [(0, X)] if sp.issparse(X) else iter_row_chunks(X)
    n_bad = n_neg = 0
    first_bad = first_neg = None
    min_value = np.inf
    for start, block in blocks:
        values = block.data if sp.issparse(block) else np.asarray(block)
        bad = ~np.isfinite(values)
        if bad.any():
            n_bad += int(bad.sum())
            if first_bad is None:
                first_bad = start + _row_of(block, np.flatnonzero(bad.ravel())[0])
        finite = values[~bad] if bad.any() else values
        if finite.size:
            min_value = min(min_value, float(finite.min()))
        neg = finite < 0
        if neg.any():
            n_neg += int(neg.sum())
            if first_neg is None:
                first_neg = start + _row_of(block, np.flatnonzero((values < 0).ravel())[0])
    if n_bad:
        msg = (
            f"dataset {name!r}: {where} has {n_bad} non-finite values (NaN or inf), "
            f"e.g. in cell {_first_bad_cell(ds, first_bad)}"
        )
        raise DatasetError(msg)
    if n_neg:
        msg = (
            f"dataset {name!r}: {where} has {n_neg} negative values (min {min_value:.4g}, "
            f"e.g. in cell {_first_bad_cell(ds, first_neg)}); expected {spec.expression}: "
            "is it scaled or centred data?"
        )
        raise DatasetError(msg)

    # Integers: a sample of rows is enough to tell counts from normalised data.
    # The sample is read in chunks: 2,000 dense rows of 60,000 genes would be 480 MB.
    n = X.shape[0]
    rows = np.unique(np.linspace(0, n - 1, num=min(n, _INTEGER_CHECK_ROWS)).astype(int))
    max_value = -np.inf
    first_fraction: tuple[int, float] | None = None  # (row, value)
    for start in range(0, rows.size if n else 0, 256):
        chunk_rows = rows[start : start + 256]
        block = X[chunk_rows]
        values = block.data if sp.issparse(block) else np.asarray(block).ravel()
        if values.size == 0:
            continue
        max_value = max(max_value, float(values.max()))
        fractional = np.flatnonzero(values != np.round(values))
        if fractional.size and first_fraction is None:
            first_fraction = (
                int(chunk_rows[_row_of(block, fractional[0])]),
                float(values[fractional[0]]),
            )
            if spec.expression == "raw_counts":
                break  # enough to fail; the max so far is a fine hint
    if max_value == -np.inf:
        return  # no stored values at all: reported as empty cells
    if spec.expression == "raw_counts" and first_fraction is not None:
        row, value = first_fraction
        kind = "log-normalised" if max_value <= _LOG_MAX else "normalised (not raw counts)"
        msg = (
            f"dataset {name!r}: spec declares expression 'raw_counts' but {where} has "
            f"non-integer values (e.g. {value:.4g} in cell {_first_bad_cell(ds, row)}, "
            f"max {max_value:.4g}); the data look {kind}: "
            "point `layer` at the counts or declare `expression: log_normalized`"
        )
        raise DatasetError(msg)
    if spec.expression == "log_normalized" and first_fraction is None and max_value > _LOG_MAX:
        warnings.warn(
            f"dataset {name!r}: spec declares expression 'log_normalized' but {where} "
            f"holds only integers up to {max_value:.0f}; the data look like raw counts",
            DatasetWarning,
            stacklevel=3,
        )


def _row_of(block: Any, flat_index: int) -> int:
    """Row of the ``flat_index``-th stored value (sparse CSR) or element (dense) of ``block``."""
    import scipy.sparse as sp

    if sp.issparse(block):
        indptr = block.tocsr().indptr
        return int(np.searchsorted(indptr, flat_index, side="right") - 1)
    n_cols = block.shape[1] if block.ndim == 2 else 1
    return int(flat_index // max(n_cols, 1))


def _check_empty_cells(ds: Dataset) -> None:
    totals = row_sums(ds.adata.X)
    empty = np.flatnonzero(totals == 0)
    if empty.size:
        ids = examples((str(ds.adata.obs_names[i]) for i in empty[:3]), 3)
        msg = (
            f"dataset {ds.name!r}: {empty.size} of {ds.n_cells} cells have no counts (zero total), "
            f"e.g. {ids}; filter them out (e.g. scanpy.pp.filter_cells(adata, min_counts=1))"
        )
        raise DatasetError(msg)


def _check_roles(ds: Dataset, require: Iterable[str]) -> None:
    spec = ds.spec
    for role in require:
        if role == "batch" and not spec.batch_keys:
            msg = f"dataset {ds.name!r}: the task needs batches, but the spec has no batch_key"
            raise DatasetError(msg)
        if role == "control":
            if spec.control_key is None and spec.control_label is None:
                msg = f"dataset {ds.name!r}: the task needs control cells, but the spec has no control_key or control_label"
                raise DatasetError(msg)
            continue
        if role not in _BUILTIN_ROLES and role not in spec.extra_keys:
            have = ", ".join(sorted(spec.extra_keys)) or "none"
            msg = (
                f"dataset {ds.name!r}: the task needs role {role!r}, but the spec has no "
                f"extra_keys.{role} (extra_keys: {have})"
            )
            raise DatasetError(msg)


def validate_dataset(ds: Dataset, *, require: Iterable[str] = ()) -> None:
    """Check that a loaded dataset fits its spec, before any heavy work.

    Checks, cheapest first, stopping at the first failure:

    1. every role in ``require`` is provided by the spec (``batch`` needs a
       ``batch_key``; ``label`` and ``species`` always are; others need ``extra_keys``);
    2. ``label_key``, every batch key and every extra key are obs columns, and every
       value of a role with a ``label_order`` is in that order;
    3. gene IDs fit ``gene_id_type`` and the organism: for ``ensembl``, at least
       90% must carry the organism's Ensembl prefix; for ``symbol``, most must not
       look like Ensembl IDs;
    4. expression values are finite and non-negative (stored values only for
       sparse matrices, row chunks for dense ones and for matrices on disk), and
       integers on a sample of rows when the spec declares ``raw_counts``;
    5. no cell has a zero total.

    A matrix on disk (:class:`~czb.data.matrix.BackedMatrix`) is read in row chunks, so memory stays
    at one chunk; the checks and messages are the same as in memory.

    Parameters
    ----------
    ds
        The dataset, from :func:`~czb.data.reading.load_dataset`.
    require
        Roles the task needs, e.g. ``("batch",)`` or ``("time_point",)``.

    Raises
    ------
    DatasetError
        One line naming the dataset, the key and what was found.
    """
    _check_roles(ds, require)
    check_obs_keys(ds)
    for role in ds.spec.label_order:
        if role not in ds.spec.extra_keys:
            msg = f"dataset {ds.name!r}: label_order names role {role!r}, which extra_keys does not map"
            raise DatasetError(msg)
        ds.role(role)  # every value must be in the declared order
    if ds.spec.control_key is not None or ds.spec.control_label is not None:
        controls = ds.controls  # the flag parses
        if not controls.any():
            how = (f"control_key {ds.spec.control_key!r}" if ds.spec.control_key
                   else f"control_label {ds.spec.control_label!r}")
            msg = f"dataset {ds.name!r}: no cell is a control by {how}"
            raise DatasetError(msg)
    _check_gene_ids(ds)
    _check_values(ds)
    _check_empty_cells(ds)
