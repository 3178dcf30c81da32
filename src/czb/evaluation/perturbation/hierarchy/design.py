"""The design of a perturbation screen (Bendidi et al. 2024): who is perturbed, who is a
control, in which batch; its seeded train/test1/test2 split; fast label codes and a
stratified subsample.

Reference: Bendidi I. et al. (2024) Benchmarking transcriptomics foundation models
for perturbation analysis: one PCA still rules them all. arXiv:2410.13956
(code: valence-labs/Tx-Evaluation; post-processing and recall from Recursion's EFAAR,
Celik S. et al. (2024) PLOS Comput Biol, doi:10.1371/journal.pcbi.1012463).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from czb.core.errors import DatasetError, NotApplicableError


@dataclass(frozen=True)
class ScreenDesign:
    """Who is who in a perturbation screen.

    Attributes
    ----------
    perturbations
        ``(n_cells,)`` perturbed gene of each cell (strings; controls carry their own label).
    controls
        ``(n_cells,)`` bool, True for control cells.
    batches
        ``(n_cells,)`` experimental batch of each cell.
    """

    perturbations: np.ndarray
    controls: np.ndarray
    batches: np.ndarray

    @classmethod
    def from_roles(cls, labels, controls, batches) -> ScreenDesign:
        controls = np.asarray(controls)
        if controls.dtype != bool:
            msg = f"the control role must be boolean; got dtype {controls.dtype}"
            raise DatasetError(msg)
        design = cls(np.asarray(labels).astype(str).astype(object), controls, np.asarray(batches).astype(str))
        if not controls.any():
            msg = "the screen has no control cells (the control flag is False everywhere)"
            raise NotApplicableError(msg)
        if controls.all():
            msg = "every cell is a control: there are no perturbations to score"
            raise NotApplicableError(msg)
        return design

    @property
    def n_cells(self) -> int:
        return len(self.controls)


@dataclass(frozen=True)
class ScreenSplit:
    """Cell indices of the three splits (each sorted, controls of its own batches included).

    ``train`` = train batches × train perturbations; ``test1`` = held-out batches ×
    train perturbations seen in train; ``test2`` = held-out batches × held-out
    perturbations. Controls of the held-out batches are in both test sets.
    """

    train: np.ndarray
    test1: np.ndarray
    test2: np.ndarray
    train_batches: tuple[str, ...]
    test_batches: tuple[str, ...]
    train_perturbations: tuple[str, ...]
    test_perturbations: tuple[str, ...]


def split_screen(design: ScreenDesign, train_fraction: float = 0.7, *, seed: int = 0) -> ScreenSplit:
    """Seeded split of batches and perturbations, as Tx-Evaluation's ``train_test1_test2_split``.

    The distinct batches of perturbed cells are shuffled with ``seed`` and the first
    ``floor(train_fraction * n)`` (at least 1, at most ``n - 1``) go to train; the
    distinct perturbations likewise, with an independent shuffle from the same
    generator. Controls are then added to each split from its own batches.

    Parameters
    ----------
    design
        The screen.
    train_fraction
        Share of batches and of perturbations in train.
    seed
        Seed of both shuffles.

    Raises
    ------
    NotApplicableError
        Fewer than two batches or two perturbations: nothing can be held out.
    """
    rng = np.random.default_rng(seed)
    perturbed = ~design.controls
    # Hash-based codes: membership tests on integers, not on a million strings.
    batch_codes, batch_names = pd.factorize(design.batches)
    pert_codes, pert_names = pd.factorize(design.perturbations)
    # Fixed-width strings: np.isin on object arrays compares Python objects one by one.
    batch_names, pert_names = np.asarray(batch_names, dtype=str), np.asarray(pert_names, dtype=str)
    batches = np.sort(batch_names[np.unique(batch_codes[perturbed])])
    perts = np.sort(pert_names[np.unique(pert_codes[perturbed])])
    if len(batches) < 2 or len(perts) < 2:
        msg = (f"the split needs at least two batches and two perturbations among perturbed cells; "
               f"found {len(batches)} batch(es) and {len(perts)} perturbation(s)")
        raise NotApplicableError(msg)

    def cut(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shuffled = values[rng.permutation(len(values))]
        n_train = min(max(int(train_fraction * len(values)), 1), len(values) - 1)
        return np.sort(shuffled[:n_train]), np.sort(shuffled[n_train:])

    train_b, test_b = cut(batches)
    train_p, test_p = cut(perts)
    in_train_b = np.isin(batch_names, train_b)[batch_codes]
    in_train_p = np.isin(pert_names, train_p)[pert_codes]
    train = perturbed & in_train_b & in_train_p
    test1 = perturbed & ~in_train_b & in_train_p
    # Only perturbations that train has seen can be recognised in test1.
    seen = np.zeros(len(pert_names), dtype=bool)
    seen[pert_codes[train]] = True
    test1 &= seen[pert_codes]
    test2 = perturbed & ~in_train_b & np.isin(pert_names, test_p)[pert_codes]
    controls_train = design.controls & in_train_b
    controls_test = design.controls & ~in_train_b
    return ScreenSplit(
        train=np.flatnonzero(train | controls_train),
        test1=np.flatnonzero(test1 | controls_test),
        test2=np.flatnonzero(test2 | controls_test),
        train_batches=tuple(map(str, train_b)), test_batches=tuple(map(str, test_b)),
        train_perturbations=tuple(map(str, train_p)), test_perturbations=tuple(map(str, test_p)),
    )


def unique_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` by hashing (pandas) instead of sorting
    every value: a million strings in a fraction of a second.

    Returns
    -------
    ``(sorted distinct values, code of each value)``, the codes int64 indices into the first.
    """
    values = np.asarray(values)
    codes, uniques = pd.factorize(values, sort=True)  # sorts only the distinct values
    return np.asarray(uniques, dtype=values.dtype), codes.astype(np.int64)


def stratified_subsample(labels: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """Indices of exactly ``min(n, len(labels))`` items, stratified by ``labels``.

    Labels with a single item are always kept (they cannot be stratified); the
    remaining quota is shared among the other labels in proportion to their size
    (largest remainders first), at least one each while the quota allows. Returns
    the *kept* subset (Tx-Evaluation's helper returned its complement).

    Returns
    -------
    Sorted ``int64`` indices.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n >= total:
        return np.arange(total)
    rng = np.random.default_rng(seed)
    uniques, codes = unique_codes(labels)
    counts = np.bincount(codes, minlength=len(uniques))
    single = counts == 1
    quota = n - int(single.sum())
    if quota < 0:  # more singletons than room: a random subset of them
        keep = rng.choice(np.flatnonzero(single[codes]), size=n, replace=False)
        return np.sort(keep)
    multi = ~single
    base = multi.astype(int) if quota >= multi.sum() else np.zeros(len(counts), int)  # one each if room
    spare = np.where(multi, counts - base, 0)
    share = spare / spare.sum() * (quota - base.sum()) if spare.sum() else np.zeros(len(counts))
    take = np.floor(share).astype(int)
    remainder = quota - base.sum() - take.sum()
    order = np.argsort(-(share - take), kind="stable")
    take[order[:remainder]] += 1
    take = np.minimum(take + base, counts)
    by_label = np.argsort(codes, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    out = [np.flatnonzero(single[codes])]
    for c in np.flatnonzero(multi):
        members = by_label[starts[c]:starts[c + 1]]
        out.append(rng.choice(members, size=take[c], replace=False))
    return np.sort(np.concatenate(out))
