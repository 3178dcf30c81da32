"""A row subset of a matrix, read only when asked for (never copied into memory)."""

from __future__ import annotations

from typing import Any

import numpy as np


class RowSubset:
    """Rows ``index`` of a matrix, read only when asked for (``shape`` and ``X[rows]``).

    What the tasks get for a matrix left on disk when an embedding covers only some
    cells, or when cells without a label are left out
    (:meth:`~czb.evaluation.context.EvaluationContext.scoped`), so that the subset is
    never copied into memory.
    """

    ndim = 2

    def __init__(self, X: Any, index: np.ndarray):
        self.X = X
        self.index = np.asarray(index, dtype=np.int64)
        self.shape = (len(self.index), X.shape[1])
        self.dtype = X.dtype

    def __getitem__(self, rows: Any) -> Any:
        if isinstance(rows, tuple):
            rows, cols = rows
            return self.X[self.index[rows], cols]
        return self.X[self.index[rows]]
