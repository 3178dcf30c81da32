"""Leiden clustering of the shared neighbour graph, and agreement with labels (ARI, NMI)."""

from __future__ import annotations

import numpy as np
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
    """numpy-backed RNG for igraph, seeded per call (as scanpy's ``set_igraph_random_state``)."""

    def __init__(self, seed: int):
        self._rng = np.random.RandomState(seed)

    def getrandbits(self, k: int) -> int:
        return self._rng.tomaxint() & ((1 << k) - 1)

    def randint(self, a: int, b: int) -> int:
        return self._rng.randint(a, b + 1)

    def random(self) -> float:
        return self._rng.random_sample()

    def gauss(self, mu: float, sigma: float) -> float:
        return self._rng.normal(mu, sigma)


def igraph_from_adjacency(connectivities: sparse.spmatrix):
    """Weighted undirected igraph of a symmetric adjacency, as scanpy builds it.

    Every stored entry becomes an edge (so each undirected edge appears twice, from
    both of its stored entries), which is what ``scanpy.tl.leiden`` hands to igraph;
    the same graph and seed then give the same partition. Building it costs seconds
    at 10^5 cells, so callers running several resolutions build it once.
    """
    import igraph as ig

    coo = sparse.coo_matrix(connectivities)
    graph = ig.Graph(n=coo.shape[0], directed=False)
    graph.add_edges(np.column_stack([coo.row, coo.col]))  # ndarray: no per-edge Python tuples
    graph.es["weight"] = coo.data.astype(np.float64)
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


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """ARI between two labelings, ``(n_cells,)`` each (scikit-learn's definition)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(labels_true, labels_pred))


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI with arithmetic normalisation (scikit-learn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(labels_true, labels_pred, average_method="arithmetic"))
