"""Which differences from the baseline the report marks ▲/▼, and by which test.

- A stochastic metric (its value depends on the seed): a two-sided paired t-test over
  the seeds both models ran, marked at p < :data:`ALPHA`; below :data:`MIN_SEEDS` common
  seeds, no test. Every seed giving the very same nonzero difference is a consistent
  difference (the t statistic is infinite), marked with p = 0.
- A deterministic mean of per-cell values: the bootstrap 95% CIs over cells (or donors)
  the two records carry, combined as independent into a CI of the difference, marked
  when it excludes 0. The two models are scored on the same cells, so their values are
  positively correlated and the independent combination overstates the spread: the
  test is conservative (it marks fewer differences than a paired bootstrap would).
- Any other deterministic metric: the difference is shown, nothing is marked.
- Across the datasets of a suite: a two-sided Wilcoxon signed-rank test of the
  per-dataset differences, marked at p < :data:`ALPHA`; with fewer than
  :data:`MIN_DATASETS` datasets it cannot reach 0.05, so no test.

Every decision names its test (:attr:`Decision.test`), shown beside each mark.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Verdict = Literal["better", "worse", "same", "unknown"]
#: Significance level of every test.
ALPHA = 0.05
#: Fewest common seeds of a paired t-test.
MIN_SEEDS = 3
#: Fewest datasets of a Wilcoxon signed-rank test (below, its smallest two-sided p is 0.0625).
MIN_DATASETS = 6


@dataclass(frozen=True)
class Decision:
    """A verdict against the baseline and the test that made it.

    Attributes
    ----------
    verdict
        ``better``/``worse`` (in the metric's direction) when the test marks a
        difference, ``same`` when it does not, ``unknown`` when no test was made or the
        metric's direction is unknown.
    test
        What decided, in words: the test, or why there is none.
    p_value
        The test's p-value, where it has one.
    ci95
        95% CI of the difference, where the test has one.
    """

    verdict: Verdict
    test: str
    p_value: float | None = None
    ci95: tuple[float, float] | None = None


def _direction(difference: float, higher_is_better: bool | None) -> Verdict:
    if higher_is_better is None:
        return "unknown"
    return "better" if (difference > 0) == higher_is_better else "worse"


def _all_equal(values: np.ndarray) -> bool:
    return float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.max(np.abs(values))))


def no_test(reason: str) -> Decision:
    """No mark, and why."""
    return Decision("unknown", f"no test: {reason}")


def seed_test(model: Sequence[float], base: Sequence[float], *, higher_is_better: bool | None) -> Decision:
    """Two-sided paired t-test of ``model`` against ``base``, aligned seed by seed."""
    from scipy import stats

    a, b = np.asarray(model, dtype=np.float64), np.asarray(base, dtype=np.float64)
    n = len(a)
    if n < MIN_SEEDS:
        return Decision("unknown", f"not enough seeds ({n} < {MIN_SEEDS})")
    diffs = a - b
    if _all_equal(diffs):
        if diffs[0] == 0:
            return Decision("same", f"paired t-test over {n} seeds: no difference on any seed", 1.0)
        return Decision(_direction(float(diffs[0]), higher_is_better),
                        f"paired t-test over {n} seeds: the same difference on every seed", 0.0)
    p = float(stats.ttest_rel(a, b).pvalue)
    verdict = _direction(float(diffs.mean()), higher_is_better) if p < ALPHA else "same"
    return Decision(verdict, f"paired t-test over {n} seeds (marks at p < {ALPHA})", p)


def ci_test(
    model: tuple[float, float, float], base: tuple[float, float, float], *, over: str,
    higher_is_better: bool | None,
) -> Decision:
    """Whether the 95% CI of ``model - base`` excludes 0, from each value's own CI.

    Parameters
    ----------
    model, base
        ``(value, low, high)``: a value and its (possibly asymmetric) 95% CI.
    over
        What the CIs resampled, for the test's description (``cells``, ``donors``).
    """
    (a, a_lo, a_hi), (b, b_lo, b_hi) = model, base
    difference = a - b
    below = math.hypot(max(a - a_lo, 0.0), max(b_hi - b, 0.0))
    above = math.hypot(max(a_hi - a, 0.0), max(b - b_lo, 0.0))
    ci = (difference - below, difference + above)
    marked = ci[0] > 0 or ci[1] < 0
    verdict = _direction(difference, higher_is_better) if marked else "same"
    return Decision(verdict, f"bootstrap 95% CIs over {over}, combined as independent (conservative)",
                    None, ci)


def dataset_test(differences: Sequence[float], *, higher_is_better: bool | None) -> Decision:
    """Two-sided Wilcoxon signed-rank test of per-dataset differences from the baseline
    (zero differences dropped, as Wilcoxon did)."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    if n < MIN_DATASETS:
        return Decision("unknown", f"not enough datasets ({n} < {MIN_DATASETS})")
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        return Decision("same", f"Wilcoxon signed-rank over {n} datasets: no difference on any", 1.0)
    p = float(stats.wilcoxon(d).pvalue)
    ranks = stats.rankdata(np.abs(nonzero))
    signed = float(ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum())
    verdict = _direction(signed, higher_is_better) if p < ALPHA and signed != 0 else "same"
    return Decision(verdict, f"Wilcoxon signed-rank over {n} datasets (marks at p < {ALPHA})", p)
