"""Harmony batch correction of a low-dimensional embedding (Korsunsky et al. 2019), in numpy.

:func:`harmonize` alternates two steps on the cells' principal components:

1. soft k-means on the unit sphere (cosine distance, bandwidth ``sigma``) whose cluster
   assignments are pulled towards every batch's share of the cells by a diversity
   penalty (``theta``): cells are reassigned in random blocks of 5%, each block against
   the batch counts of all other cells;
2. within each cluster, a ridge regression (``lambda`` on the batch terms, none on the
   intercept) of the original coordinates on the batch indicators, weighted by the
   cluster assignments; every cell's batch terms are subtracted, weighted the same way.

The parameters are the paper's and harmonypy 0.0.x's (the version scIB ran): ``theta=2``,
``sigma=0.1``, ``lambda=1``, ``min(100, round(n_cells / 30))`` clusters seeded by
scikit-learn's k-means (k-means++, 10 starts, 25 iterations), at most 10 rounds of at
most 20 clustering iterations, stopping when the objective changes by less than 1e-4
(rounds) or 1e-5 (clustering, over a window of 3). Given the same seed, the block order
draws from the same legacy ``RandomState`` stream as harmonypy 0.0.10, so results agree
with it to rounding (tests/models/test_harmony.py). Cells are rows here, and the ridge
systems are solved in closed form (each is an arrow matrix), so memory is
``O(n_cells × n_clusters)`` and time linear in the number of batches. Measured with
benchmarks/harmony_scale.py on 2 cores: 50,000 cells × 50 components in ~35 s (+0.2 GB),
200,000 in ~200 s (+0.7 GB), 40-60% of it the single-threaded k-means.

Cells without a batch (code ``-1``) take part in the clustering but neither count in the
diversity penalty nor get corrected.

References
----------
Korsunsky, I. et al. (2019). Fast, sensitive and accurate integration of single-cell
data with Harmony. Nature Methods 16:1289–1296, doi:10.1038/s41592-019-0619-0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from czb.core.errors import EmbeddingError

#: Diversity penalty per batch, soft k-means bandwidth per cluster, ridge penalty.
THETA = 2.0
SIGMA = 0.1
RIDGE_LAMBDA = 1.0
#: Share of the cells reassigned together in a clustering update.
BLOCK_SIZE = 0.05
MAX_ITER_HARMONY = 10
MAX_ITER_KMEANS = 20
EPSILON_KMEANS = 1e-5
EPSILON_HARMONY = 1e-4
#: Clusters: one per this many cells, at most MAX_CLUSTERS.
CELLS_PER_CLUSTER = 30
MAX_CLUSTERS = 100
#: The k-means that seeds the cluster centroids.
KMEANS_N_INIT = 10
KMEANS_MAX_ITER = 25
#: Clustering iterations whose objectives are compared for convergence.
_WINDOW = 3


@dataclass
class HarmonyResult:
    """What :func:`harmonize` returns.

    Attributes
    ----------
    corrected
        The corrected coordinates, ``(n_cells, dim)`` float64.
    n_clusters
        Number of soft clusters.
    n_iterations
        Rounds (clustering + correction) run.
    converged
        Whether a round lowered the objective by less than EPSILON_HARMONY (relative; a
        rise counts too, as in harmonypy) before ``max_iter_harmony`` rounds.
    kmeans_rounds
        Index of the last clustering iteration of each round.
    objective
        The objective after the initial clustering and after each round.
    """

    corrected: np.ndarray
    n_clusters: int
    n_iterations: int
    converged: bool
    kmeans_rounds: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)


def n_clusters_for(n_cells: int) -> int:
    """Harmony's default number of clusters: ``min(100, round(n_cells / 30))``, at least 1."""
    return max(1, min(MAX_CLUSTERS, round(n_cells / CELLS_PER_CLUSTER)))


def kmeans_centroids(x: np.ndarray, n_clusters: int, *, seed: int) -> np.ndarray:
    """Centroids of scikit-learn's seeded k-means of ``x`` (rows), as Harmony starts.

    Run with one OpenMP thread: scikit-learn adds the threads' partial sums in the order
    they finish, so with several the centroids (and all that follows) vary in the last bits.
    """
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="openmp"):
        model = KMeans(n_clusters=n_clusters, init="k-means++", n_init=KMEANS_N_INIT,
                       max_iter=KMEANS_MAX_ITER, random_state=seed)
        model.fit(x)
    return np.asarray(model.cluster_centers_, dtype=np.float64)


def harmonize(
    z: np.ndarray,
    batch_codes: np.ndarray,
    *,
    seed: int,
    max_iter_harmony: int = MAX_ITER_HARMONY,
    n_clusters: int | None = None,
    centroids: np.ndarray | None = None,
) -> HarmonyResult:
    """Harmony-correct the rows of ``z`` for the batches in ``batch_codes``.

    Parameters
    ----------
    z
        Cell coordinates (e.g. 50 principal components), ``(n_cells, dim)``, finite.
    batch_codes
        ``(n_cells,)`` integers: each cell's batch, ``0 .. n_batches - 1``, or ``-1`` for a
        cell without one.
    seed
        Seeds the k-means and the order of the block updates.
    max_iter_harmony
        Most rounds of clustering and correction.
    n_clusters
        Soft clusters (default :func:`n_clusters_for` ``(n_cells)``).
    centroids
        Initial centroids ``(n_clusters, dim)``, instead of the seeded k-means (tests).

    Returns
    -------
    HarmonyResult
        The corrected coordinates and how the run went.

    Raises
    ------
    EmbeddingError
        ``z`` not finite 2-D with at least 2 rows, ``batch_codes`` not one integer
        ``>= -1`` per row, or no cell with a batch.
    """
    z = np.array(z, dtype=np.float64)
    codes = np.asarray(batch_codes)
    if z.ndim != 2 or z.shape[0] < 2 or not np.isfinite(z).all():
        msg = f"harmony: expected finite coordinates of at least 2 cells, got shape {z.shape}"
        raise EmbeddingError(msg)
    if codes.shape != (z.shape[0],) or codes.dtype.kind not in "iu" or (codes.size and codes.min() < -1):
        msg = f"harmony: batch_codes must be {z.shape[0]} integers >= -1"
        raise EmbeddingError(msg)
    if not (codes >= 0).any():
        msg = "harmony: no cell has a batch"
        raise EmbeddingError(msg)
    n_clusters = n_clusters_for(len(z)) if n_clusters is None else int(n_clusters)
    state = _Harmony(z, codes.astype(np.int64), n_clusters, seed=seed)
    if centroids is None:
        centroids = kmeans_centroids(state.z_cos, n_clusters, seed=seed)
    state.start(np.asarray(centroids, dtype=np.float64))
    converged, n_iter = False, 0
    for n_iter in range(1, max_iter_harmony + 1):
        state.cluster()
        state.correct()
        old, new = state.objective_harmony[-2:]
        if (old - new) / abs(old) < EPSILON_HARMONY:
            converged = True
            break
    return HarmonyResult(state.z_corr, n_clusters, n_iter, converged, state.kmeans_rounds,
                         [float(v) for v in state.objective_harmony])


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero rather than becoming NaN)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class _Harmony:
    """The state of one run: cells are rows; per-batch tables are ``(n_batches, n_clusters)``."""

    def __init__(self, z: np.ndarray, codes: np.ndarray, n_clusters: int, *, seed: int):
        import scipy.sparse as sp

        self.z, self.z_corr, self.z_cos = z, z.copy(), _unit_rows(z)
        self.codes, self.k = codes, n_clusters
        self.n_batches = int(codes.max()) + 1 if codes.size else 0
        batched = np.flatnonzero(codes >= 0)
        self.unbatched = np.flatnonzero(codes < 0)
        counts = np.bincount(codes[batched], minlength=self.n_batches).astype(np.float64)
        self.pr_b = counts / max(len(batched), 1)
        self.theta = np.full(self.n_batches, THETA)
        self.sigma = np.full(n_clusters, SIGMA)
        # Cell indices of each batch, and the batch one-hot (batches × cells).
        order = batched[np.argsort(codes[batched], kind="stable")]
        self.members = np.split(order, np.cumsum(counts[:-1]).astype(np.int64))
        self.phi = sp.csr_matrix((np.ones(len(batched)), (codes[batched], batched)),
                                 shape=(self.n_batches, len(z)))
        self.rng = np.random.RandomState(seed)  # harmonypy's stream: same blocks for a seed
        self.objective_kmeans: list[float] = []
        self.objective_harmony: list[float] = []
        self.kmeans_rounds: list[int] = []

    def start(self, centroids: np.ndarray) -> None:
        """Soft assignments to the initial centroids and the batch tables they give."""
        if centroids.shape != (self.k, self.z.shape[1]):
            msg = f"harmony: centroids must be {(self.k, self.z.shape[1])}, got {centroids.shape}"
            raise EmbeddingError(msg)
        self.y = _unit_rows(centroids)
        self.dist = 2 * (1 - self.z_cos @ self.y.T)
        r = -self.dist / self.sigma
        r -= r.max(axis=1, keepdims=True)
        np.exp(r, out=r)
        r /= r.sum(axis=1, keepdims=True)
        self.r = r
        self.o = self.phi @ r  # observed cluster mass per batch
        self.e = np.outer(self.pr_b, self.o.sum(axis=0))  # expected from the batch's share
        self._objective()
        self.objective_harmony.append(self.objective_kmeans[-1])

    def _objective(self) -> None:
        """k-means error + sigma-weighted entropy + the diversity (cross-entropy) term."""
        from scipy.special import xlogy

        error = float(np.vdot(self.r, self.dist))
        entropy = float(np.sum(xlogy(self.r, self.r) @ self.sigma))
        mass = self.phi @ self.r
        penalty = self.theta[:, None] * np.log((self.o + 1) / (self.e + 1)) * self.sigma[None, :]
        self.objective_kmeans.append(error + entropy + float(np.sum(penalty * mass)))

    def cluster(self) -> None:
        """Up to MAX_ITER_KMEANS centroid and assignment updates; ends a round's clustering."""
        it = 0
        for it in range(MAX_ITER_KMEANS):
            self.y = _unit_rows(self.r.T @ self.z_cos)
            dist = np.matmul(self.z_cos, self.y.T, out=self.dist)  # 2 (1 - cosine), in place
            dist *= -2
            dist += 2
            self._update_assignments()
            self._objective()
            if it > _WINDOW and self._kmeans_converged():
                break
        self.kmeans_rounds.append(it)
        self.objective_harmony.append(self.objective_kmeans[-1])

    def _kmeans_converged(self) -> bool:
        obj = self.objective_kmeans
        old = sum(obj[-2 - i] for i in range(_WINDOW))
        new = sum(obj[-1 - i] for i in range(_WINDOW))
        return abs(old - new) / abs(old) < EPSILON_KMEANS

    def _update_assignments(self) -> None:
        """Reassign the cells in random blocks, each against the others' batch counts."""
        import scipy.sparse as sp

        scale = np.divide(self.dist, -self.sigma)
        scale -= scale.max(axis=1, keepdims=True)
        np.exp(scale, out=scale)
        order = np.arange(len(self.r))
        self.rng.shuffle(order)
        for block in np.array_split(order, int(np.ceil(1 / BLOCK_SIZE))):
            codes = self.codes[block]
            has = np.flatnonzero(codes >= 0)
            onehot = sp.csr_matrix((np.ones(len(has)), (codes[has], has)),
                                   shape=(self.n_batches, len(block)))
            old = onehot @ self.r[block]
            self.o -= old
            self.e -= np.outer(self.pr_b, old.sum(axis=0))
            r = scale[block]
            penalty = ((self.e + 1) / (self.o + 1)) ** self.theta[:, None]
            r[has] *= penalty[codes[has]]
            r /= r.sum(axis=1, keepdims=True)
            self.r[block] = r
            new = onehot @ r
            self.o += new
            self.e += np.outer(self.pr_b, new.sum(axis=0))

    def correct(self) -> None:
        """Per cluster, ridge-regress the original coordinates on the batches (intercept
        unpenalised) and subtract each cell's assignment-weighted batch terms."""
        r, z, lam = self.r, self.z, RIDGE_LAMBDA
        mass = self.phi @ r  # (batches, clusters)
        loose = r[self.unbatched].sum(axis=0)  # mass of cells without a batch
        rz_total = r.T @ z  # (clusters, dim)
        rz = np.stack([r[idx].T @ z[idx] for idx in self.members])  # (batches, clusters, dim)
        # The system [[sum r, mass^T], [mass, diag(mass + lam)]] w = [rz_total; rz] per
        # cluster, by its Schur complement: s = sum r - sum mass^2 / (mass + lam).
        d = mass + lam
        s = loose + np.sum(mass * lam / d, axis=0)
        w0 = (rz_total - np.einsum("bk,bkd->kd", mass / d, rz)) / s[:, None]
        w = (rz - mass[:, :, None] * w0[None]) / d[:, :, None]  # the batch terms
        z_corr = z.copy()
        for b, idx in enumerate(self.members):
            z_corr[idx] -= r[idx] @ w[b]
        self.z_corr, self.z_cos = z_corr, _unit_rows(z_corr)


def batch_codes(batches: Any) -> tuple[np.ndarray, list[str]]:
    """Integer codes of batch labels (sorted), ``-1`` for ``None``; and the batch names."""
    values = np.asarray(batches, dtype=object)
    missing = np.array([v is None for v in values], dtype=bool)
    names, inverse = np.unique(values[~missing].astype(str), return_inverse=True)
    codes = np.full(len(values), -1, dtype=np.int64)
    codes[~missing] = inverse.reshape(-1)
    return codes, [str(n) for n in names]
