"""PCA and highly variable genes of a matrix read in row chunks, never whole.

The PCA baselines (:mod:`czb.models.baselines`) use these functions when a dataset is
too large to copy into memory (atlas scale: 10^6 cells and more). Every function reads
the matrix through ``blocks``: a callable that returns a fresh iterator of
``(start, block)`` pairs, ``block`` being rows ``start .. start + len(block)`` as a
``scipy.sparse`` CSR matrix (or a dense array), so the matrix can be read several
times (one *pass* per call) from memory or from disk alike. Memory stays
O(one block + n_rows × (n_comps + n_oversamples) + n_cols × (n_comps + n_oversamples)).

- :class:`ColumnMoments` accumulates per-column mean and variance over the blocks
  (Chan, Golub & LeVeque's pairwise update, so no catastrophic cancellation);
- :func:`highly_variable_seurat` selects genes as scanpy's default ``seurat`` flavor
  does, from those per-gene moments;
- :func:`randomized_pca` is the randomized range finder with power (subspace)
  iterations of Halko, Martinsson & Tropp (2011), with implicit centering, followed by
  scikit-learn's sign convention, so the result is reproducible and comparable with
  ``scanpy.pp.pca``.

References
----------
Halko, N., Martinsson, P.-G. & Tropp, J. A. (2011). Finding structure with randomness:
probabilistic algorithms for constructing approximate matrix decompositions. SIAM Review
53(2):217–288 (Algorithms 4.3/4.4 and 5.1).

Fukaya, T., Nakatsukasa, Y., Yanagisawa, Y. & Yamamoto, Y. (2014). CholeskyQR2: a simple
and communication-avoiding algorithm for computing a tall-skinny QR factorization.
ScalA '14, 31–38.

Chan, T. F., Golub, G. H. & LeVeque, R. J. (1983). Algorithms for computing the sample
variance: analysis and recommendations. The American Statistician 37(3):242–247.

Satija, R. et al. (2015). Spatial reconstruction of single-cell gene expression data.
Nature Biotechnology 33:495–502 (the ``seurat`` dispersion-based gene selection), as
implemented by ``scanpy.pp.highly_variable_genes(flavor="seurat")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ColumnMoments",
    "PCAResult",
    "highly_variable_seurat",
    "randomized_pca",
    "svd_flip_rows",
]

#: A re-iterable source of row blocks: each call starts a new pass over the matrix.
Blocks = Callable[[], Iterable[tuple[int, Any]]]
#: :func:`randomized_pca` runs BLAS on one thread when ``n_rows * l`` is below this.
SINGLE_THREAD_BELOW = 1 << 22


def _csr64(block: Any) -> Any:
    """A block as float64 CSR (dense blocks are sparsified; never copied when already so)."""
    import scipy.sparse as sp

    if not sp.issparse(block):
        block = sp.csr_matrix(np.asarray(block))
    elif block.format != "csr":
        block = block.tocsr()
    if block.dtype != np.float64:
        block = block.astype(np.float64)
    return block


class ColumnMoments:
    """Per-column count, mean and variance of row blocks, accumulated block by block.

    Each block's mean and sum of squared deviations are computed exactly (two passes
    over the block's stored values; implicit zeros are counted, never stored), then
    merged into the running totals with the pairwise update of Chan et al. (1983).
    The result does not depend on how rows were split into blocks beyond rounding.

    Parameters
    ----------
    n_cols
        Number of columns ``p``.

    Attributes
    ----------
    n
        Rows seen so far.
    mean
        ``(p,)`` float64 column means.
    m2
        ``(p,)`` float64 sums of squared deviations from the mean.
    """

    def __init__(self, n_cols: int):
        self.n = 0
        self.mean = np.zeros(n_cols, dtype=np.float64)
        self.m2 = np.zeros(n_cols, dtype=np.float64)

    def add(self, block: Any) -> None:
        """Add a block of shape ``(n_b, p)`` (CSR sparse or dense)."""
        import scipy.sparse as sp

        n_b = block.shape[0]
        if n_b == 0:
            return
        p = self.mean.shape[0]
        if sp.issparse(block):
            block = block.tocsr()
            data = block.data.astype(np.float64, copy=False)
            cols = block.indices
            mean_b = np.bincount(cols, weights=data, minlength=p) / n_b
            stored = np.bincount(cols, minlength=p)
            # Stored values' squared deviations, plus the zeros' (n_b - stored) * mean^2.
            m2_b = np.bincount(cols, weights=(data - mean_b[cols]) ** 2, minlength=p)
            m2_b += (n_b - stored) * mean_b**2
        else:
            values = np.asarray(block, dtype=np.float64)
            mean_b = values.mean(axis=0)
            m2_b = ((values - mean_b) ** 2).sum(axis=0)
        n_a = self.n
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta**2 * (n_a * n_b / n)
        self.n = n

    @property
    def var(self) -> np.ndarray:
        """``(p,)`` unbiased (``ddof=1``) column variances, as scanpy and scikit-learn use."""
        return self.m2 / max(self.n - 1, 1)


def highly_variable_seurat(
    mean: np.ndarray, var: np.ndarray, n_top_genes: int, *, n_bins: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Highly variable genes by normalised dispersion: scanpy's ``seurat`` flavor.

    Follows ``scanpy.pp.highly_variable_genes(flavor="seurat", n_top_genes=...)``
    (single batch) step by step, from per-gene moments instead of the matrix:

    1. ``mean`` and ``var`` are moments of the *non-logarithmised* normalised values
       (scanpy takes ``expm1`` of log1p data first); a zero mean becomes ``1e-12``;
    2. dispersion ``var / mean``; zero dispersions become NaN; ``log`` of it, and
       ``log1p`` of the mean;
    3. genes are binned by that mean into ``n_bins`` equal-width bins
       (``pandas.cut``); within each bin the log dispersions are z-scored by the bin's
       mean and standard deviation (``ddof=1``, NaN skipped); a bin whose standard
       deviation is undefined (one gene) gets mean 0 and standard deviation equal to
       its mean, so its gene's normalised dispersion is 1;
    4. the ``n_top_genes``-th largest normalised dispersion (NaN excluded; fewer if
       fewer are defined) is the cut-off, and every gene at or above it is selected
       (ties included).

    Parameters
    ----------
    mean, var
        ``(n_genes,)`` per-gene mean and unbiased variance of the normalised values.
    n_top_genes
        How many genes to select (capped to the genes with a defined dispersion).
    n_bins
        Number of mean bins (scanpy's default 20).

    Returns
    -------
    highly_variable
        ``(n_genes,)`` bool mask.
    dispersions_norm
        ``(n_genes,)`` float64 normalised dispersions (NaN where undefined).
    """
    import pandas as pd

    mean = np.array(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(dispersion)
    mean = np.log1p(mean)

    frame = pd.DataFrame({"means": mean, "dispersions": dispersion})
    frame["mean_bin"] = pd.cut(frame["means"], bins=n_bins)
    stats = frame.groupby("mean_bin", observed=True)["dispersions"].agg(avg="mean", dev="std")
    single = stats["dev"].isna()
    stats.loc[single, "dev"] = stats.loc[single, "avg"]
    stats.loc[single, "avg"] = 0.0
    per_gene = stats.loc[frame["mean_bin"]]
    norm = (dispersion - per_gene["avg"].to_numpy()) / per_gene["dev"].to_numpy()

    defined = norm[~np.isnan(norm)]
    n = min(int(n_top_genes), mean.shape[0], defined.size)
    if n == 0:
        return np.zeros(mean.shape[0], dtype=bool), norm
    cutoff = np.sort(defined)[::-1][n - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cutoff, norm


def svd_flip_rows(components: np.ndarray) -> np.ndarray:
    """Signs that make each row's largest-magnitude entry positive.

    scikit-learn's ``svd_flip(u, v, u_based_decision=False)``, which its ``PCA`` (and so
    ``scanpy.pp.pca``) applies: multiply row ``i`` of ``components`` and column ``i``
    of the scores by ``signs[i]``.

    Parameters
    ----------
    components
        ``(k, p)`` principal axes.

    Returns
    -------
    ``(k,)`` array of ``+1.0`` / ``-1.0``.
    """
    pick = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), pick])
    signs[signs == 0] = 1.0
    return signs


@dataclass
class PCAResult:
    """Output of :func:`randomized_pca`.

    Attributes
    ----------
    scores
        ``(n_rows, n_comps)`` float32 coordinates of the rows (``U * S``).
    components
        ``(n_comps, n_cols)`` float64 principal axes (rows orthonormal).
    singular_values
        ``(n_comps,)`` of the centred matrix, decreasing.
    explained_variance
        ``(n_comps,)`` ``singular_values**2 / (n_rows - 1)``.
    explained_variance_ratio
        ``(n_comps,)`` explained variance over the total variance (sum of the column
        variances), or NaN when no total was given.
    n_passes
        How many times the blocks were read.
    """

    scores: np.ndarray
    components: np.ndarray
    singular_values: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_passes: int


def _orthonormal(y: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the columns of ``y`` (``n × l``, ``n ≥ l``; may overwrite ``y``).

    CholeskyQR2 (Fukaya et al. 2014): twice ``G = yᵀy = L Lᵀ``, ``y ← y L⁻ᵀ`` -- two
    Gram products and two triangular solves, in place, several times faster than
    Householder QR on tall matrices. Accurate to machine precision while
    ``cond(y) < ~1e7``; when the Cholesky factorisation fails or the result is not
    orthonormal to 1e-8, Householder QR is used instead.
    """
    import scipy.linalg

    q = y
    for step in range(2):
        gram = q.T @ q
        try:
            lower = np.linalg.cholesky(gram)
        except np.linalg.LinAlgError:
            break
        # q @ inv(Lᵀ), solved on qᵀ (a Fortran-ordered view of C-ordered q); the first
        # solve leaves y intact for the fallback, the second works in place.
        q = scipy.linalg.solve_triangular(
            lower, q.T, lower=True, overwrite_b=step > 0, check_finite=False
        ).T
    else:
        error = np.abs(q.T @ q - np.eye(q.shape[1])).max()
        if np.isfinite(error) and error < 1e-8:
            return q
    q, _ = scipy.linalg.qr(y, mode="economic", overwrite_a=True, check_finite=False)
    return q


def randomized_pca(
    blocks: Blocks,
    *,
    n_rows: int,
    n_cols: int,
    mean: np.ndarray,
    n_comps: int,
    seed: int = 0,
    n_oversamples: int = 20,
    n_power_iterations: int = 3,
    total_variance: float | None = None,
) -> PCAResult:
    """Truncated PCA of the column-centred matrix ``A_c = A - 1 mean^T``, streamed.

    Randomized subspace iteration (Halko et al. 2011, Algorithm 4.4 followed by 5.1)
    with ``l = n_comps + n_oversamples`` Gaussian test vectors drawn from ``seed``:
    ``Y = A_c Ω``, ``Q = qr(Y)``; then ``n_power_iterations`` times
    ``Z = qr(A_cᵀ Q)``, ``Q = qr(A_c Z)``; finally ``B = Qᵀ A_c`` (``l × p``) and its
    SVD ``B = Ũ Σ Vᵀ`` give ``U = Q Ũ``. Centering is implicit, so sparse blocks stay
    sparse: ``A_c Ω = A Ω − 1 (meanᵀ Ω)`` and ``A_cᵀ Q = Aᵀ Q − mean (1ᵀ Q)``. Signs
    are flipped with :func:`svd_flip_rows`, as scikit-learn's ``PCA`` does.

    Each product is one pass over ``blocks``: ``2 * n_power_iterations + 2`` passes in
    all. Memory: ``Q`` and one ``Y`` block (``n_rows × l`` float64 each), ``Z``
    (``n_cols × l``) and one block.

    Parameters
    ----------
    blocks
        Callable returning a fresh iterator of ``(start, block)``; blocks are
        ``(n_b, n_cols)`` CSR sparse or dense, consecutive and covering all rows.
    n_rows, n_cols
        Shape ``(n, p)`` of ``A``.
    mean
        ``(p,)`` column means of ``A`` (from :class:`ColumnMoments`).
    n_comps
        Number of components ``k``; at most ``min(n, p)``.
    seed
        Seed of the test matrix Ω; the same seed and blocks give the same result.
    n_oversamples
        Extra test vectors beyond ``k`` (``l`` is capped to ``min(n, p)``).
    n_power_iterations
        Subspace iterations ``q``; the error of component ``j`` shrinks like
        ``(σ_{l+1} / σ_j)^(2q+1)``.
    total_variance
        Sum of the column variances (``ddof=1``), for ``explained_variance_ratio``.

    Returns
    -------
    :class:`PCAResult`.
    """
    if not 1 <= n_comps <= min(n_rows, n_cols):
        most = min(n_rows, n_cols)
        msg = f"randomized_pca: n_comps={n_comps} must be in 1..min(n_rows, n_cols)={most}"
        raise ValueError(msg)
    mean = np.asarray(mean, dtype=np.float64)
    width = min(n_comps + n_oversamples, n_rows, n_cols)
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((n_cols, width))
    passes = 0

    def times(right: np.ndarray) -> np.ndarray:
        """``A_c @ right`` for ``right`` of shape ``(p, l)``: one pass."""
        nonlocal passes
        passes += 1
        out = np.empty((n_rows, right.shape[1]), dtype=np.float64)
        offset = mean @ right
        seen = 0
        for start, block in blocks():
            block = _csr64(block)
            stop = start + block.shape[0]
            out[start:stop] = block @ right
            out[start:stop] -= offset
            seen += block.shape[0]
        _check_covered(seen, n_rows)
        return out

    def transposed_times(left: np.ndarray) -> np.ndarray:
        """``A_cᵀ @ left`` for ``left`` of shape ``(n, l)``: one pass."""
        nonlocal passes
        passes += 1
        out = np.zeros((n_cols, left.shape[1]), dtype=np.float64)
        seen = 0
        for start, block in blocks():
            block = _csr64(block)
            stop = start + block.shape[0]
            out += block.T @ left[start:stop]
            seen += block.shape[0]
        _check_covered(seen, n_rows)
        out -= np.outer(mean, left.sum(axis=0))
        return out

    # Multi-threaded BLAS gains nothing on small dense products and, on a busy machine,
    # spinning threads can make them 10-20x slower: one thread below ~32 MB of Q.
    small = n_rows * width < SINGLE_THREAD_BELOW
    with _one_blas_thread() if small else contextlib.nullcontext():
        q = _orthonormal(times(omega))
        for _ in range(n_power_iterations):
            z = _orthonormal(transposed_times(q))
            q = _orthonormal(times(z))
        b = transposed_times(q).T  # (l, p) = Qᵀ A_c
        u_small, s, vt = np.linalg.svd(b, full_matrices=False)
        u_small, s, vt = u_small[:, :n_comps], s[:n_comps], vt[:n_comps]
        signs = svd_flip_rows(vt)
        vt *= signs[:, None]
        u_small *= signs[None, :]
        scores = (q @ (u_small * s[None, :])).astype(np.float32)
        del q
    explained = s**2 / max(n_rows - 1, 1)
    ratio = (
        explained / total_variance
        if total_variance is not None and total_variance > 0
        else np.full(n_comps, np.nan)
    )
    return PCAResult(
        scores=scores,
        components=vt,
        singular_values=s,
        explained_variance=explained,
        explained_variance_ratio=ratio,
        n_passes=passes,
    )


def _one_blas_thread() -> Any:
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _check_covered(seen: int, n_rows: int) -> None:
    if seen != n_rows:
        msg = f"randomized_pca: the blocks covered {seen} rows, expected {n_rows}"
        raise ValueError(msg)
