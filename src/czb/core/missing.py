"""Which values of an annotation column are missing: ``None``, NaN, ``pd.NA``, empty
text, or the text pandas and numpy make of those."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

#: Text that stands for a missing value once a column has been turned into strings.
MISSING_TEXT = frozenset({"", "nan", "none", "<na>", "nat"})


def missing_mask(values: np.ndarray | pd.Series) -> np.ndarray:
    """``(n,)`` bool: which entries hold no value.

    ``None``, NaN, ``pd.NA``/``NaT``, and strings that are empty (after stripping) or
    spell a missing value (:data:`MISSING_TEXT`, any case). Numbers other than NaN and
    every other string are values. Works on numeric, string, object and categorical
    arrays or Series.
    """
    import pandas as pd

    codes, uniques = pd.factorize(values if isinstance(values, pd.Series) else np.asarray(values))
    missing = codes < 0  # None, NaN, pd.NA, NaT
    text = pd.Index(uniques).astype(str).str.strip().str.lower()
    spelled = np.flatnonzero(np.isin(np.asarray(text), list(MISSING_TEXT)))
    if spelled.size:  # checked on the distinct values only
        missing |= np.isin(codes, spelled)
    return missing
