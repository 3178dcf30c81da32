"""Leiden clustering of the shared neighbour graph, and agreement with labels (ARI, NMI)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
from scipy import sparse

from czb.evaluation.registry import MetricInfo, register_metric

ADJUSTED_RAND_INDEX = register_metric(
    MetricInfo(
        name="adjusted_rand_index",
        description="Adjusted Rand index between Leiden clusters (resolution 1.0) and labels.",
        reference="doi:10.1007/BF01908075",
        range=(-0.5, 1.0),
        stochastic=True,
    )
)
NORMALIZED_MUTUAL_INFO = register_metric(
    MetricInfo(
        name="normalized_mutual_info",
        description="Normalised mutual information (arithmetic mean) between Leiden clusters "
        "(resolution 1.0) and labels.",
        reference="doi:10.1186/1471-2105-7-S1-S1",
        stochastic=True,
    )
)
SCIB_LEIDEN_NMI = register_metric(
    MetricInfo(
        name="scib_leiden_nmi",
        description="NMI of Leiden clusters at the resolution in 0.2..2.0 that maximises NMI "
        "(scib-metrics' nmi_ari_cluster_labels_leiden).",
        reference="doi:10.1038/s41592-021-01336-8",
        stochastic=True,
    )
)
SCIB_LEIDEN_ARI = register_metric(
    MetricInfo(
        name="scib_leiden_ari",
        description="ARI of Leiden clusters at the NMI-optimal resolution of the 0.2..2.0 sweep.",
        reference="doi:10.1038/s41592-021-01336-8",
        range=(-0.5, 1.0),
        stochastic=True,
    )
)

#: Resolutions scib-metrics sweeps: 0.2, 0.4, ..., 2.0.
SCIB_RESOLUTIONS = tuple(round(2 * x / 10, 1) for x in range(1, 11))


class _IgraphRNG:
    """numpy-backed RNG for igraph, seeded per call (as scanpy's ``set_igraph_random_state``).

    scanpy's wrapper calls ``RandomState.tomaxint()`` for ``getrandbits`` and
    ``random_sample()`` for ``random``; Leiden makes ~10^7 such calls at 5x10^4 cells, each
    a numpy call from Python. Both consume exactly two 32-bit Mersenne-Twister words (the
    first the high half), so the values of :data:`BLOCK` consecutive calls of either kind
    are computed at once from the raw stream, as integers and as doubles, and each call
    takes the next one: the same stream, 2.5x less time per draw. ``randint`` and
    ``gauss`` consume a variable number of words; the first such call hands the exact
    stream position over to a ``RandomState`` that serves every later call.
    """

    BLOCK = 1 << 16

    def __init__(self, seed: int):
        self._bits = np.random.MT19937()
        self._bits.state = np.random.RandomState(seed).get_state(legacy=False)
        self._block_state = self._bits.state
        self._draws: Iterator[tuple[int, float]] = iter(())
        self._legacy: np.random.RandomState | None = None

    def _refill(self) -> None:
        self._block_state = self._bits.state
        words = self._bits.random_raw(2 * self.BLOCK)
        high, low = words[0::2], words[1::2]
        ints = ((high << np.uint64(32)) | low) >> np.uint64(1)  # tomaxint
        doubles = ((high >> np.uint64(5)).astype(np.float64) * 67108864.0
                   + (low >> np.uint64(6)).astype(np.float64)) / 9007199254740992.0  # random_sample
        self._draws = zip(ints.tolist(), doubles.tolist())

    def getrandbits(self, k: int) -> int:
        for value, _ in self._draws:  # a ``for`` over one item: the cheapest next() in Python
            return value & ((1 << k) - 1)
        if self._legacy is not None:
            return self._legacy.tomaxint() & ((1 << k) - 1)
        self._refill()
        return self.getrandbits(k)

    def random(self) -> float:
        for _, value in self._draws:
            return value
        if self._legacy is not None:
            return self._legacy.random_sample()
        self._refill()
        return self.random()

    def _as_legacy(self) -> np.random.RandomState:
        """A RandomState at the exact position of the draws served so far (which it serves from now on)."""
        if self._legacy is None:
            left = sum(1 for _ in self._draws)
            bits = np.random.MT19937()
            if left:  # rewind to the block's start and skip the draws served from it
                bits.state = self._block_state
                bits.random_raw(2 * (self.BLOCK - left))
            else:  # the block was used up, or none was drawn
                bits.state = self._bits.state
            self._legacy = np.random.RandomState(bits)
        return self._legacy

    def randint(self, a: int, b: int) -> int:
        return self._as_legacy().randint(a, b + 1)

    def gauss(self, mu: float, sigma: float) -> float:
        return self._as_legacy().normal(mu, sigma)


def igraph_from_adjacency(connectivities: sparse.spmatrix):
    """Weighted undirected igraph of a symmetric adjacency, as Leiden sees scanpy's.

    scanpy adds every stored entry as an edge, so each undirected edge appears twice
    (once from each of its entries). Here each appears once with twice the weight: Leiden
    only ever sums edge weights between a node and a community, so the partition for a
    given seed is the same, from half the edges (and about 30% less Leiden time). Building
    the graph costs seconds at 10^5 cells, so callers running several resolutions build it once.
    """
    import igraph as ig

    upper = sparse.triu(connectivities, k=1, format="coo")
    lower = sparse.tril(connectivities, k=-1, format="csr")
    upper_sum = upper.data.sum()  # from .data: the COO .sum() first canonicalises (0.4 s at 2x10^5 cells)
    if lower.nnz != upper.nnz or abs(lower.data.sum() - upper_sum) > 1e-9 * max(abs(upper_sum), 1.0):
        msg = "connectivities must be symmetric"
        raise ValueError(msg)
    diagonal = connectivities.diagonal()
    loops = np.flatnonzero(diagonal)  # self-loops are stored (and added) once
    graph = ig.Graph(n=upper.shape[0], directed=False)
    # ndarrays: no per-edge Python tuples
    graph.add_edges(np.column_stack([np.concatenate([upper.row, loops]), np.concatenate([upper.col, loops])]))
    graph.es["weight"] = np.concatenate([2.0 * upper.data.astype(np.float64), diagonal[loops]])
    return graph


def leiden(
    connectivities,
    resolution: float = 1.0,
    *,
    seed: int = 0,
    n_iterations: int = 2,
) -> np.ndarray:
    """Leiden communities (modularity, igraph flavour) of a weighted undirected graph.

    Same call as ``scanpy.tl.leiden(flavor="igraph", n_iterations=2)``, which
    cz-benchmarks uses: each stored edge of the symmetric matrix is added in both
    directions, and igraph's RNG is seeded the way scanpy seeds it, so for the same
    graph and seed the partition is identical.

    Parameters
    ----------
    connectivities
        Symmetric ``(n_cells, n_cells)`` weights, or the graph
        :func:`igraph_from_adjacency` made of them.
    resolution
        Modularity resolution γ.
    seed
        Seed of igraph's RNG (the global RNG is restored afterwards).
    n_iterations
        Leiden iterations (negative: until stable).

    Returns
    -------
    ``(n_cells,)`` int cluster ids.

    References
    ----------
    Traag, Waltman & van Eck (2019), doi:10.1038/s41598-019-41695-z.
    """
    import random

    import igraph as ig

    graph = connectivities if isinstance(connectivities, ig.Graph) else igraph_from_adjacency(connectivities)
    ig.set_random_number_generator(_IgraphRNG(seed))
    try:
        part = graph.community_leiden(
            objective_function="modularity",
            weights="weight",
            resolution=resolution,
            n_iterations=n_iterations,
        )
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(part.membership)


def leiden_many(connectivities, resolutions: list[float], *, seed: int = 0) -> list[np.ndarray]:
    """:func:`leiden` at each of ``resolutions`` in turn, on one graph built once."""
    graph = igraph_from_adjacency(connectivities)
    return [leiden(graph, r, seed=seed) for r in resolutions]


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """Non-zero cells of the contingency table as ``(row code, column code, count)``, in
    scikit-learn's order (sorted labels, row-major), and the row and column totals (int64).
    Labels are hashed; only the distinct ones are sorted."""
    true_codes, true_names = pd.factorize(np.asarray(labels_true), sort=True)
    pred_codes, pred_names = pd.factorize(np.asarray(labels_pred), sort=True)
    if len(true_codes) != len(pred_codes):
        msg = f"labelings differ in length: {len(true_codes)} and {len(pred_codes)}"
        raise ValueError(msg)
    if (true_codes < 0).any() or (pred_codes < 0).any():
        msg = "labelings must not contain missing values"
        raise ValueError(msg)
    pairs, counts = np.unique(true_codes.astype(np.int64) * len(pred_names) + pred_codes, return_counts=True)
    rows, cols = np.divmod(pairs, max(len(pred_names), 1))
    row_totals = np.bincount(true_codes, minlength=len(true_names)).astype(np.int64)
    col_totals = np.bincount(pred_codes, minlength=len(pred_names)).astype(np.int64)
    return rows, cols, counts.astype(np.int64), row_totals, col_totals


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """ARI between two labelings, ``(n_cells,)`` each.

    scikit-learn's ``adjusted_rand_score`` (from the pair confusion matrix, in Python
    integers so 10^6 cells cannot overflow), without importing scikit-learn (1.4 s).
    """
    rows, cols, counts, row_totals, col_totals = _contingency(labels_true, labels_pred)
    n = int(counts.sum())
    sum_squares = int((counts**2).sum())
    same_both = sum_squares - n
    same_pred_only = int((counts * col_totals[cols]).sum()) - sum_squares
    same_true_only = int((counts * row_totals[rows]).sum()) - sum_squares
    neither = n * n - same_pred_only - same_true_only - sum_squares
    if same_pred_only == 0 and same_true_only == 0:  # empty, or identical partitions
        return 1.0
    tp, tn, fp, fn = same_both, neither, same_pred_only, same_true_only
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _entropy(totals: np.ndarray) -> float:
    totals = totals[totals > 0].astype(np.float64)
    if totals.size <= 1:
        return 0.0
    total = totals.sum()
    return float(-np.sum((totals / total) * (np.log(totals) - np.log(total))))


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI with arithmetic normalisation.

    scikit-learn's ``normalized_mutual_info_score`` (the same special cases and
    round-off handling), without importing scikit-learn.
    """
    rows, cols, counts, row_totals, col_totals = _contingency(labels_true, labels_pred)
    n_true, n_pred = len(row_totals), len(col_totals)
    if n_true == n_pred == 1 or n_true == n_pred == 0:  # neither labeling splits the cells
        return 1.0
    if n_true == 1 or n_pred == 1:
        return 0.0
    total = float(counts.sum())
    p = counts / total
    # Summed in scikit-learn's order, so results agree to the last bit.
    log_outer = -np.log(row_totals[rows] * col_totals[cols]) + np.log(total) + np.log(total)
    mi = p * (np.log(counts) - np.log(total)) + p * log_outer
    mi = float(np.clip(np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi).sum(), 0.0, None))
    if mi == 0:
        return 0.0
    return float(mi / np.mean([_entropy(row_totals), _entropy(col_totals)]))
