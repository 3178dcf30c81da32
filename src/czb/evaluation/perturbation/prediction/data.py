"""What a genetic perturbation prediction task reads: the screen (:class:`PerturbationData`),
the model predicting it (:class:`Predictor`) and the context handing both to the task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from czb.core.errors import TaskError
from czb.evaluation.perturbation.expression import log_normalize
from czb.evaluation.task import TaskContext


@dataclass
class PerturbationData:
    """A perturbation screen as the task reads it.

    Attributes
    ----------
    counts
        ``(n_cells, n_genes)`` raw counts, scipy sparse (kept as CSR) or ndarray.
    conditions
        ``(n_cells,)`` str: the control label, ``"GENE"`` or ``"GENEA+GENEB"``.
    control_label
        Label of the control cells.
    genes
        ``(n_genes,)`` str gene symbols (what conditions name).
    batches
        ``(n_cells,)`` str batch (e.g. 10x GEM group); controls are matched within it.
    cell_ids
        ``(n_cells,)`` cell IDs (for the predictor's bookkeeping; the task addresses
        cells by row).

    :attr:`log_normalized` (``log1p(counts / total * 1e4)``, CSR ``float32``) is
    computed once, on first use, and shared by :meth:`subset`.
    """

    counts: Any
    conditions: np.ndarray
    control_label: str
    genes: np.ndarray
    batches: np.ndarray | None = None
    cell_ids: np.ndarray | None = None
    _log_normalized: sp.csr_matrix | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if sp.issparse(self.counts):
            self.counts = sp.csr_matrix(self.counts)
        else:
            self.counts = np.asarray(self.counts)
        if self.counts.ndim != 2:
            msg = f"PerturbationData: counts must be 2-D (cells x genes); got shape {self.counts.shape}"
            raise TaskError(msg)
        n_cells, n_genes = self.counts.shape
        self.conditions = np.asarray(self.conditions).astype(str)
        self.genes = np.asarray(self.genes).astype(str)
        self.control_label = str(self.control_label)
        expected = {"conditions": (n_cells,), "genes": (n_genes,)}
        if self.batches is not None:
            self.batches = np.asarray(self.batches).astype(str)
            expected["batches"] = (n_cells,)
        if self.cell_ids is not None:
            self.cell_ids = np.asarray(self.cell_ids).astype(str)
            expected["cell_ids"] = (n_cells,)
        for name, shape in expected.items():
            got = getattr(self, name).shape
            if got != shape:
                msg = (
                    f"PerturbationData: {name} has shape {got}, expected {shape} to match "
                    f"counts {self.counts.shape}"
                )
                raise TaskError(msg)

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    @property
    def log_normalized(self) -> sp.csr_matrix:
        """``log1p(counts / total * 1e4)`` per cell, CSR ``float32`` (computed once)."""
        if self._log_normalized is None:
            X = log_normalize(self.counts)
            self._log_normalized = sp.csr_matrix(X, dtype=np.float32)
        return self._log_normalized

    def subset(self, rows: np.ndarray) -> PerturbationData:
        """The cells ``rows`` (indices), with the cached log-normalised rows carried over
        (normalisation is per cell, so subsetting commutes with it)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = PerturbationData(
            counts=self.counts[rows],
            conditions=self.conditions[rows],
            control_label=self.control_label,
            genes=self.genes,
            batches=None if self.batches is None else self.batches[rows],
            cell_ids=None if self.cell_ids is None else self.cell_ids[rows],
        )
        if self._log_normalized is not None:
            out._log_normalized = self._log_normalized[rows]
        return out

    def hide(self, hidden: sp.spmatrix) -> PerturbationData:
        """A copy with the counts of the ``hidden`` entries (boolean ``(n_cells, n_genes)``)
        set to zero; its log-normalised expression is recomputed from those counts."""
        hidden = sp.csr_matrix(hidden, dtype=bool)
        if sp.issparse(self.counts):
            counts = self.counts - self.counts.multiply(hidden)
            counts = sp.csr_matrix(counts, dtype=self.counts.dtype)
            counts.eliminate_zeros()
        else:
            counts = self.counts.copy()
            r, c = hidden.nonzero()
            counts[r, c] = 0
        return PerturbationData(counts, self.conditions, self.control_label, self.genes,
                                self.batches, self.cell_ids)


@runtime_checkable
class Predictor(Protocol):
    """A model that predicts the expression of a perturbation screen."""

    name: str

    def predict_expression_shift(
        self, train: PerturbationData, test_conditions: Sequence[str], *, seed: int
    ) -> np.ndarray:
        """(n_test, n_genes) predicted mean log-normalised expression of each test
        condition, rows in ``test_conditions`` order."""
        ...

    def predict_masked_genes(
        self, data: PerturbationData, cells: np.ndarray, masked: np.ndarray, *, seed: int
    ) -> np.ndarray:
        """``cells``: (n_sel,) row indices into ``data``; ``masked``: (n_sel, n_genes) bool,
        True where the value was hidden (zeroed in ``data``). Returns (n_sel, n_genes)
        predicted log-normalised expression."""
        ...


class PerturbationContext(TaskContext):
    """What the runner hands a perturbation task: the screen and the predictor.

    Offers :meth:`role` / :meth:`require` like
    :class:`~czb.evaluation.context.EvaluationContext`, so ``run_task``'s check works:
    the role ``condition`` is always there, ``batch`` when the screen has batches.
    Seed-independent intermediate results (DE tests, matched controls) are memoised
    (:meth:`memo`), so several seeds and both formulations compute them once.
    """

    def __init__(self, data: PerturbationData, predictor: Predictor, *, n_jobs: int = 1):
        if not isinstance(data, PerturbationData):
            msg = f"PerturbationContext needs PerturbationData, not {type(data).__name__}"
            raise TaskError(msg)
        self.data = data
        self.predictor = predictor
        self.n_jobs = n_jobs
        self._memo: dict[tuple, Any] = {}
        roles = {"condition": data.conditions, "batch": data.batches}
        self._roles = {name: values for name, values in roles.items() if values is not None}

    @property
    def n_cells(self) -> int:
        return self.data.n_cells
