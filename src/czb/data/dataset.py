"""The :class:`Dataset`: a loaded dataset and the roles its spec maps to obs columns.

:func:`~czb.data.reading.load_dataset` makes one from a
:class:`~czb.specs.schema.DatasetSpec`; :func:`~czb.data.validation.validate_dataset`
checks it before any heavy work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from czb.core.errors import DatasetError
from czb.core.missing import missing_mask
from czb.data.gene_ids import SYMBOL_COLUMNS
from czb.data.matrix import BackedMatrix
from czb.specs.schema import DatasetSpec

if TYPE_CHECKING:
    import anndata
    import pandas as pd

__all__ = ["Dataset", "parse_control_flags"]


@dataclass
class Dataset:
    """A dataset ready for a model and the tasks.

    What is in memory: ``obs`` and ``var`` always. The expression matrix is in memory
    for generated data and for files whose matrix stores at most
    :data:`~czb.data.reading.BACKED_MIN_VALUES` values (20M: ~160 MB as CSR); larger
    ones (or any file loaded with ``backed=True``) stay on disk as a
    :class:`BackedMatrix`, which opens the file for each read and closes it after (no
    handle is held between reads, so nothing needs closing). Everything that reads it
    goes through row chunks (:func:`~czb.data.matrix.iter_row_chunks`, ``X[rows]``):
    validation, the PCA baselines (streamed above a size, see
    :mod:`czb.models.baselines`), model input files, task expression; only
    perturbation-prediction data (``perturbation_data``) and
    :meth:`BackedMatrix.to_memory` read the whole matrix. A CSR or dense matrix on
    disk is read as it is; a large CSC (column-major) matrix, whose rows cannot be
    read without reading all of it, is rewritten once as CSR into the cache with a
    :class:`~czb.core.errors.DatasetWarning` (small ones are read into memory and
    converted, as before).

    Attributes
    ----------
    spec
        The spec it was loaded from.
    adata
        ``AnnData`` whose ``X`` is the expression matrix of shape ``(n_cells, n_genes)``
        (sparse CSR where the file is sparse, never densified here; or a
        :class:`BackedMatrix`, see above), of the kind ``spec.expression`` says, with
        ``var_names`` the gene IDs of ``spec.gene_id_type`` and ``obs_names`` the cell IDs.
    path
        The local file it was read from (``None`` for generated data).
    sha256
        Checksum of that file as read (computed from its bytes, or remembered while its
        size, times and inode are unchanged; never copied from the spec), or of the
        generator's parameters for generated data.
    extras
        Notes from loading, e.g. ``gene_source`` (where the gene IDs came from:
        ``"var_names"`` or ``"var['<column>']"``) and ``layer``.
    """

    spec: DatasetSpec
    adata: anndata.AnnData
    path: Path | None = None
    sha256: str | None = None
    extras: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n_cells(self) -> int:
        return self.adata.n_obs

    @property
    def backed(self) -> bool:
        """Whether the expression matrix is on disk (a :class:`BackedMatrix`)."""
        return isinstance(self.adata.X, BackedMatrix)

    @property
    def n_genes(self) -> int:
        return self.adata.n_vars

    @cached_property
    def labels(self) -> np.ndarray:
        """Cell labels from ``obs[spec.label_key]``: ``(n_cells,)`` object array of
        strings, ``None`` for a cell without one (NaN, ``None``, empty text:
        :func:`~czb.core.missing.missing_mask`), never the text ``"nan"``."""
        return self._annotation([self.spec.label_key])

    @cached_property
    def batches(self) -> np.ndarray | None:
        """Batch labels (several batch columns joined with ``"|"``; ``None`` for a cell
        missing any of them), or ``None`` for a dataset without batches."""
        keys = self.spec.batch_keys
        return self._annotation(keys) if keys else None

    def _annotation(self, keys: list[str]) -> np.ndarray:
        missing = np.zeros(self.n_cells, dtype=bool)
        out = None
        for key in keys:
            column = self.adata.obs[key]
            missing |= missing_mask(column)
            text = column.astype(str).to_numpy().astype(object)
            out = text if out is None else out + "|" + text
        out[missing] = None
        return out

    @cached_property
    def controls(self) -> np.ndarray | None:
        """``(n_cells,)`` bool control flags of a perturbation screen, or ``None``.

        From ``obs[control_key]`` when the spec names it (bool, 0/1, or
        ``true``/``false`` strings in any case; anything else is an error), else cells
        whose label (``condition`` role when mapped, else ``label_key``) equals
        ``control_label``.
        """
        spec = self.spec
        if spec.control_key is not None:
            return parse_control_flags(self.adata.obs[spec.control_key], name=self.name, key=spec.control_key)
        if spec.control_label is not None:
            key = spec.extra_keys.get("condition", spec.label_key)
            return self.adata.obs[key].astype(str).to_numpy() == spec.control_label
        return None

    def gene_symbols(self) -> np.ndarray | None:
        """Gene symbols of the var axis: ``var_names`` for symbol datasets, else a symbol
        var column (:data:`czb.data.gene_ids.SYMBOL_COLUMNS`), else ``None``."""
        if self.spec.gene_id_type == "symbol" and self.spec.gene_key is None:
            return self.adata.var_names.astype(str).to_numpy()
        for column in ((self.spec.gene_key,) if self.spec.gene_id_type == "symbol" else ()) + SYMBOL_COLUMNS:
            if column is not None and column in self.adata.var.columns:
                return self.adata.var[column].astype(str).to_numpy()
        return None

    def role(self, role: str) -> np.ndarray | None:
        """Values of an extra role (``time_point``, ``donor``, ``species``...) or ``None``.

        ``species`` falls back to the spec's organism for every cell when the spec
        maps no obs column to it (a dataset holds one species unless it says otherwise).
        A role with a declared ``label_order`` comes back as integer ranks in that order.
        """
        key = self.spec.extra_keys.get(role)
        if key is None:
            if role == "species":
                return np.full(self.n_cells, self.spec.organism, dtype=object)
            return None
        values = self.adata.obs[key].to_numpy()
        order = self.spec.label_order.get(role)
        if order is None:
            return values
        # Declared order: string labels become their rank (0, 1, ...), so ordered tasks
        # (sequential organization) can compare them.
        rank = {label: i for i, label in enumerate(order)}
        text = np.asarray(values).astype(str)
        unknown = sorted(str(t) for t in set(text) - set(rank))
        if unknown:
            msg = (
                f"dataset {self.name!r}: obs[{key!r}] has values {unknown[:5]} that are not in "
                f"label_order[{role!r}] ({', '.join(order)})"
            )
            raise DatasetError(msg)
        return np.array([rank[t] for t in text], dtype=np.int64)


_TRUE = {"true", "1", "yes", "t"}
_FALSE = {"false", "0", "no", "f"}


def parse_control_flags(column: pd.Series, *, name: str, key: str) -> np.ndarray:
    """A control-flag obs column as bool: real booleans, 0/1, or true/false strings.

    Strings are compared case-insensitively to both spellings, so a bool column is
    never compared to the string "true" (Tx-Evaluation's recall let every control
    through that way).
    """
    if column.isna().any():
        msg = f"dataset {name!r}: control_key {key!r} has {int(column.isna().sum())} missing values"
        raise DatasetError(msg)
    values = column.to_numpy()
    if values.dtype == bool:
        return values
    if np.issubdtype(values.dtype, np.number):
        bad = sorted(set(np.unique(values).tolist()) - {0, 1})
        if bad:
            msg = f"dataset {name!r}: control_key {key!r} must hold 0/1 or true/false; found {bad[:5]}"
            raise DatasetError(msg)
        return values.astype(bool)
    text = np.char.lower(values.astype(str))
    bad = sorted(set(np.unique(text).tolist()) - _TRUE - _FALSE)
    if bad:
        msg = f"dataset {name!r}: control_key {key!r} must hold booleans or true/false; found {bad[:5]}"
        raise DatasetError(msg)
    return np.isin(text, list(_TRUE))
