"""When a metric over groups of cells (labels, batches, time points...) is defined.

One rule, for every task, so no metric reports a confident number on a grouping it
cannot judge:

* a grouping of ``n`` cells into ``g`` groups is **scorable** when
  ``2 <= g <= n - 1``: scikit-learn's rule for the silhouette (``silhouette_score``
  raises outside it). With one group, ARI and NMI against any clustering are 0 or 1
  by convention, the silhouette is 0 (0.5 rescaled) and batch mixing is 0 or
  undefined; with one cell per group every clustering "agrees" by chance (NMI 0.41 on
  700 cells). So ``silhouette_score``, ``adjusted_rand_index``,
  ``normalized_mutual_info``, ``scib_leiden_*`` (labels), ``entropy_per_cell``,
  ``ilisi_normalized`` (batches), the scIB aggregates (both), time-point silhouettes
  and the label silhouettes of cross-species tasks all require it, on the cells that
  are scored;
* ``batch_silhouette`` additionally needs one label whose cells hold a scorable
  grouping of batches (scIB skips the others); without one it is not reported;
* a top-``k`` accuracy needs more than ``k`` classes (with ``k`` or fewer it is 1
  whatever the embedding);
* classifiers (label prediction) need 2 classes with at least ``min_class_size`` cells.

A task whose core grouping fails the rule is ``not_applicable`` with the reason
(:func:`require_groups`); a metric that alone fails it is left out, and the reason
recorded in the result's ``computation['not_applicable']``
(:meth:`~czb.evaluation.task.TaskContext.skip_metric`).

Cells without a value (:func:`~czb.core.missing.missing_mask`: ``None``, NaN,
``pd.NA``, empty text, or the text pandas and numpy make of those: ``"nan"``,
``"None"``, ``"<NA>"``, ``"NaT"``) are never a group: the evaluation context leaves
them out of every task that needs that role, and counts them
(``computation['cells_without_label']``...).
"""

from __future__ import annotations

import numpy as np

from czb.core.errors import NotApplicableError

#: The roles whose values group cells; a cell without one is left out of the tasks
#: that need it. Readable names for messages and records.
GROUP_ROLES = {"labels": "label", "batch": "batch"}


def group_problem(values: np.ndarray, *, what: str = "label") -> str | None:
    """Why a grouping of cells cannot be scored (see the module docstring), or ``None``.

    Parameters
    ----------
    values
        ``(n_cells,)`` group of each scored cell (no missing values).
    what
        The group's name in the message (``label``, ``batch``, ``time point``...).

    The message gives counts only, never the values (they come from the user's files).
    """
    import pandas as pd

    n = len(values)
    if n == 0:
        return f"no cell has a {what}"
    n_groups = len(pd.unique(np.asarray(values)))
    if n_groups < 2:
        return f"all {n} scored cells have the same {what} (1 {what}; at least 2 are needed)"
    if n_groups >= n:
        return (f"each of the {n} scored cells has its own {what} ({n_groups} {_plural(what)} for {n} cells; "
                f"at most {n - 1} can be scored)")
    return None


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "sh", "ch", "x")) else "s")


def require_groups(values: np.ndarray, *, what: str, task: str, metrics: str = "") -> int:
    """The number of groups, or :class:`NotApplicableError` when ``values`` is not a
    scorable grouping (:func:`group_problem`).

    ``metrics`` names what is undefined in the message (default: the task's metrics).
    """
    import pandas as pd

    problem = group_problem(values, what=what)
    if problem is not None:
        which = metrics or "its metrics"
        msg = f"task {task!r}: {problem}; {which} are not defined (they need 2 to n_cells - 1 {_plural(what)})"
        raise NotApplicableError(msg)
    return len(pd.unique(np.asarray(values)))


def topk_problem(n_classes: int, k: int) -> str | None:
    """Why a top-``k`` accuracy over ``n_classes`` classes says nothing, or ``None``."""
    if n_classes <= k:
        return f"{n_classes} classes: every prediction is in the top {k}, so top-{k} accuracy is 1 whatever the embedding"
    return None
