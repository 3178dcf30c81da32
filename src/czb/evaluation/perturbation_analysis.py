"""The data side of the perturbation-analysis hierarchy (Bendidi et al. 2024): the
screen's design, its seeded train/test1/test2 split, the four post-processings of an
embedding, and chunked access to log-normalised expression.

Reference: Bendidi I. et al. (2024) Benchmarking transcriptomics foundation models
for perturbation analysis: one PCA still rules them all. arXiv:2410.13956
(code: valence-labs/Tx-Evaluation; post-processing and recall from Recursion's EFAAR,
Celik S. et al. (2024) PLOS Comput Biol, doi:10.1371/journal.pcbi.1012463).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from czb.errors import DatasetError, NotApplicableError

PostProcessing = Literal["none", "center", "center_scale", "tvn"]
POSTPROCESSINGS: tuple[str, ...] = ("none", "center", "center_scale", "tvn")
#: Ridge added to each batch's control covariance before TVN whitening (EFAAR's value).
TVN_REGULARIZATION = 0.5


# --------------------------------------------------------------------------- design & split


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


# --------------------------------------------------------------------------- post-processing


def standard_scale_params(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population standard deviation (ddof 0) per column; zero spread → 1 (as
    scikit-learn's ``StandardScaler``)."""
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std[std < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
    return mean, std


def _inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """``cov^(-1/2)`` of a symmetric positive-definite matrix, by eigendecomposition."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors / np.sqrt(values)) @ vectors.T


def postprocess(X: np.ndarray, design: ScreenDesign, method: str) -> np.ndarray:
    """One of the four post-processings of Bendidi et al. (2024), fitted on controls.

    ``none``
        The embedding as it is.
    ``center``
        Per batch, subtract the mean of that batch's controls.
    ``center_scale``
        Per batch, subtract the mean of that batch's controls and divide by their
        standard deviation (ddof 0; a constant dimension is left unscaled), i.e. a
        ``StandardScaler`` fitted on the batch's controls.
    ``tvn`` (typical variation normalisation, EFAAR)
        1. centre-scale every cell on all controls (one scaler, all batches);
        2. rotate onto the principal axes of the controls (PCA fitted on the
           controls, every component with non-zero variance, no whitening);
        3. centre-scale again on all controls;
        4. per batch, multiply by ``(C_b + 0.5 I)^(-1/2)``, where ``C_b`` is the
           covariance (ddof 1) of the batch's controls.

    Every step is fitted on all cells' controls, as in the reference code (controls
    carry no perturbation label, so this leaks nothing the tasks score).

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    design
        Which cells are controls, and their batches.
    method
        ``none``, ``center``, ``center_scale`` or ``tvn``.

    Returns
    -------
    ``(n_cells, n_dims')`` float64 array (``n_dims' = n_dims`` except for TVN, which
    keeps the rank of the controls: fewer when controls are fewer than dimensions or
    constant along some).

    Raises
    ------
    NotApplicableError
        A batch without controls (centring needs them), or TVN with fewer than two
        controls in a batch.
    """
    if method not in POSTPROCESSINGS:
        msg = f"unknown post-processing {method!r}; known: {', '.join(POSTPROCESSINGS)}"
        raise ValueError(msg)
    X = np.asarray(X, dtype=np.float64)
    if method == "none":
        return X
    batches = design.batches
    controls = design.controls
    groups = {b: np.flatnonzero(batches == b) for b in np.unique(batches)}
    for b, rows in groups.items():
        n_ctrl = int(controls[rows].sum())
        if n_ctrl < (2 if method == "tvn" else 1):
            msg = f"batch {str(b)!r} has {n_ctrl} control cell(s); {method} post-processing needs controls in every batch"
            raise NotApplicableError(msg)
    if method in ("center", "center_scale"):
        out = np.empty_like(X)
        for rows in groups.values():
            ref = X[rows[controls[rows]]]
            mean, std = standard_scale_params(ref)
            out[rows] = X[rows] - mean
            if method == "center_scale":
                out[rows] /= std
        return out

    mean, std = standard_scale_params(X[controls])
    out = (X - mean) / std
    ref = out[controls]
    ref_centered = ref - ref.mean(axis=0)
    _, singular, vt = np.linalg.svd(ref_centered, full_matrices=False)
    # Axes without control variation (rank deficiency: a dimension constant among
    # controls, or fewer controls than dimensions) cannot be normalised on controls:
    # scaling them would divide by rounding noise, so they are dropped (the reference
    # keeps them and can emit values around 1e15).
    rank = int(np.sum(singular > singular[0] * max(ref.shape) * np.finfo(np.float64).eps)) if singular[0] > 0 else 0
    if rank == 0:
        msg = "every control cell has the same embedding: TVN has no control variation to normalise by"
        raise NotApplicableError(msg)
    out = (out - ref.mean(axis=0)) @ vt[:rank].T
    mean, std = standard_scale_params(out[controls])
    out = (out - mean) / std
    eye = np.eye(out.shape[1])
    for rows in groups.values():
        ref = out[rows[controls[rows]]]
        cov = np.cov(ref, rowvar=False, ddof=1).reshape(out.shape[1], out.shape[1])
        out[rows] = out[rows] @ _inverse_sqrt(cov + TVN_REGULARIZATION * eye)
    return out


# --------------------------------------------------------------------------- expression


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


@dataclass
class Expression:
    """The screen's expression matrix, read in row chunks, log-normalised on the fly.

    Never copies the whole matrix: row blocks are normalised as they are read
    (``log1p`` of counts per 10,000 for raw counts; as stored for log-normalised data).

    Attributes
    ----------
    X
        ``(n_cells, n_genes)`` sparse (CSR) or dense matrix, rows aligned with the embedding.
    gene_symbols
        ``(n_genes,)`` gene symbols (to find perturbed genes), or ``None``.
    kind
        ``raw_counts`` or ``log_normalized``.
    """

    X: Any
    gene_symbols: np.ndarray | None
    kind: str = "raw_counts"
    target_sum: float = 1e4
    chunk_rows: int = 4096

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    def rows(self, index: np.ndarray) -> sp.csr_matrix:
        """Log-normalised rows ``index`` as a float64 CSR matrix."""
        from czb.evaluation.metrics.perturbation import log_normalize

        block = sp.csr_matrix(self.X[index])
        if self.kind == "raw_counts":
            return log_normalize(block, self.target_sum)
        return block.astype(np.float64)

    def iter_rows(self, index: np.ndarray) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """``(row indices, log-normalised block)`` over ``index`` in chunks."""
        for start in range(0, len(index), self.chunk_rows):
            chunk = index[start:start + self.chunk_rows]
            yield chunk, self.rows(chunk)

    def gene_means(self, index: np.ndarray | None = None) -> np.ndarray:
        """Mean log-normalised expression of every gene over ``index`` (default: all cells)."""
        index = np.arange(self.X.shape[0]) if index is None else index
        total = np.zeros(self.n_genes)
        for _, block in self.iter_rows(index):
            total += np.asarray(block.sum(axis=0, dtype=np.float64)).ravel()
        return total / max(len(index), 1)
