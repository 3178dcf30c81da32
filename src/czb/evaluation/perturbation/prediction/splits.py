"""The seeded split of a screen's conditions into training and test conditions
(expression-shift formulation, GEARS' "combo seen 2" or held-out singles)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from czb.core.errors import NotApplicableError
from czb.evaluation.perturbation.prediction import baselines as pb


@dataclass
class ConditionSplit:
    """Training and test conditions of the expression-shift formulation.

    Attributes
    ----------
    train, test
        Condition labels (sorted), the control label in neither.
    mode
        ``"combo_seen2"``: test conditions are combinations whose every gene has a
        single-gene condition, all of which are in training (GEARS' "combo seen 2");
        ``"single"``: test conditions are single-gene conditions.
    """

    train: list[str]
    test: list[str]
    mode: Literal["combo_seen2", "single"]


def _share(n: int, fraction: float) -> int:
    """``round(fraction * n)`` (halves up), at least 1."""
    return max(1, int(np.floor(fraction * n + 0.5)))


def split_conditions(
    conditions: Sequence[str], control_label: str, *, test_fraction: float, seed: int
) -> ConditionSplit:
    """Seeded split of the non-control conditions into training and test conditions.

    With ``parts(c)`` the perturbed genes of a label (``"A+B" -> A, B``;
    :func:`~czb.evaluation.perturbation.prediction.baselines.split_condition`):

    - singles are conditions with one part, combinations those with more;
    - a combination is *eligible* when each of its parts has a single-gene condition;
    - if any combination is eligible: ``n_test = max(1, round(test_fraction *
      n_eligible))`` eligible combinations are drawn as test conditions; every other
      condition (all singles, the remaining combinations) trains. Each test
      combination's singles are thus in training (mode ``"combo_seen2"``);
    - otherwise: ``n_test = min(max(1, round(test_fraction * n_singles)), n_singles - 1)``
      singles are drawn as test conditions, everything else trains (mode ``"single"``).

    The draw is ``numpy.random.default_rng(seed).choice`` without replacement over the
    candidates in sorted order, so it depends only on the labels and the seed.

    Raises
    ------
    NotApplicableError
        Fewer than two non-control conditions, or no eligible combination and fewer
        than two singles.
    """
    labels = sorted({str(c) for c in conditions} - {str(control_label)})
    if len(labels) < 2:
        msg = (
            "a perturbation screen needs at least 2 non-control conditions to split; "
            f"found {len(labels)}"
        )
        raise NotApplicableError(msg)
    parts = {c: pb.split_condition(c, control_label=control_label) for c in labels}
    singles = [c for c in labels if len(parts[c]) == 1]
    single_genes = {parts[c][0] for c in singles}
    combos = [c for c in labels if len(parts[c]) > 1]
    eligible = [c for c in combos if all(p in single_genes for p in parts[c])]
    rng = np.random.default_rng(seed)
    if eligible:
        n_test = min(_share(len(eligible), test_fraction), len(eligible))
        test = sorted(rng.choice(eligible, size=n_test, replace=False).tolist())
        mode = "combo_seen2"
    else:
        if len(singles) < 2:
            msg = (
                f"cannot split the screen: {len(singles)} single-gene condition(s) and no combination "
                "whose genes all have single-gene conditions"
            )
            raise NotApplicableError(msg)
        n_test = min(_share(len(singles), test_fraction), len(singles) - 1)
        test = sorted(rng.choice(singles, size=n_test, replace=False).tolist())
        mode = "single"
    held = set(test)
    return ConditionSplit(train=[c for c in labels if c not in held], test=test, mode=mode)
