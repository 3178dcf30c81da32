"""The evaluation context of one embedding: its cell annotations, the shared neighbour
graph, memoised values (silhouettes, Leiden partitions) and the cells a task is scoped to."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from czb.core.errors import EmbeddingError, TaskError
from czb.core.missing import missing_mask
from czb.data.relationships import Relationships
from czb.evaluation.applicability import GROUP_ROLES
from czb.evaluation.neighbors import NeighborGraph, compute_neighbors
from czb.evaluation.row_subset import RowSubset
from czb.evaluation.task import Task, TaskContext

#: From this many cells, a Leiden partition started early (:meth:`EvaluationContext.start_leiden`)
#: runs in a worker process; below, starting the process costs more than the overlap saves.
BACKGROUND_LEIDEN_MIN_CELLS = 50_000


class EvaluationContext(TaskContext):
    """One embedding with its cell annotations, and everything tasks share.

    The neighbour graph is computed once, with the largest ``k`` any planned task
    needs (:meth:`plan`); Leiden partitions and other costly values are memoised
    (:meth:`memo`) so clustering, embedding and batch integration reuse each other's work.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` cell labels (e.g. cell types), or ``None``.
    batches
        ``(n_cells,)`` batch labels, or ``None``.
    roles
        Further per-cell annotations by role (``time_point``, ``donor``, ``control``...).
    expression
        The cells' expression (:class:`~czb.evaluation.perturbation.expression.Expression`,
        rows aligned with ``X``) for tasks that read it, or ``None``.
    relationship_sources
        Known-relationship sources the dataset declares (perturbation recall), or ``None``.
    relationships
        Known relationships by source name, loaded by the caller for the tasks that read
        them (:meth:`~czb.evaluation.task.Task.relationship_sources`); a source that
        could not be loaded maps to the error raised, so only the tasks reading it fail.
    n_jobs
        Processes/threads tasks may use.
    exact
        ``True``: exact neighbour graph and silhouettes at any size; ``False``: the
        approximate/estimated ones at any size; ``None``: by size
        (:data:`czb.evaluation.neighbors.EXACT_MAX_CELLS`,
        :data:`czb.evaluation.metrics.silhouette.EXACT_MAX_CELLS`).
    pre_integration
        ``(n_cells, d)`` representation of the same cells before integration (the
        dataset's PCA), rows aligned with ``X``, for metrics that compare with it
        (``pcr_comparison``); or ``None``.
    """

    def __init__(
        self,
        X: np.ndarray,
        *,
        labels: np.ndarray | None = None,
        batches: np.ndarray | None = None,
        roles: Mapping[str, np.ndarray] | None = None,
        expression: Any = None,
        relationship_sources: Sequence[str] | None = None,
        relationships: Mapping[str, Relationships | Exception] | None = None,
        n_jobs: int = 1,
        exact: bool | None = None,
        pre_integration: np.ndarray | None = None,
    ):
        X = _checked_matrix(X, "embedding")
        if pre_integration is not None:
            pre_integration = _checked_matrix(pre_integration, "pre-integration representation")
            if pre_integration.shape[0] != X.shape[0]:
                msg = (f"pre-integration representation has {pre_integration.shape[0]} rows, expected "
                       f"{X.shape[0]} to match the embedding")
                raise EmbeddingError(msg)
        self.pre_integration = pre_integration
        self.X = X
        self._roles: dict[str, np.ndarray] = {}
        #: Cells without a value, per grouping role that has some (see :meth:`scoped`).
        self._missing: dict[str, np.ndarray] = {}
        for role, values in {"labels": labels, "batch": batches, **(roles or {})}.items():
            if values is None:
                continue
            values = np.asarray(values)
            if values.shape != (X.shape[0],):
                msg = f"{role} has shape {values.shape}, expected ({X.shape[0]},) to match the embedding"
                raise EmbeddingError(msg)
            if role in GROUP_ROLES:
                missing = missing_mask(values)
                if missing.any():
                    self._missing[role] = missing
            self._roles[role] = values
        self.excluded: dict[str, int] = {}
        if expression is not None and expression.X.shape[0] != X.shape[0]:
            msg = f"expression has {expression.X.shape[0]} rows, expected {X.shape[0]} to match the embedding"
            raise EmbeddingError(msg)
        self.expression = expression
        self.relationship_sources = list(relationship_sources) if relationship_sources else None
        self.relationships = dict(relationships or {})
        self.n_jobs = n_jobs
        self.exact = exact
        self.notes = {}
        self._k_planned = 0
        self._k_neighborhoods = 0
        self._graph: NeighborGraph | None = None
        self._memo: dict[tuple, Any] = {}
        # memo key -> (future of the worker's list of partitions, position in that list)
        self._background: dict[tuple, tuple[Any, int]] = {}
        self._worker: Any = None  # the process background partitions run in
        self._planned: list[Task] = []

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    def scoped(self, task: Task) -> EvaluationContext:
        """The context ``task`` runs on: this one, or when some cells lack a grouping
        role the task needs (a label, a batch: :data:`~czb.evaluation.applicability.GROUP_ROLES`),
        a context of the other cells only, shared by every task that leaves out the same
        cells (its own graph and memo). Its :attr:`excluded` counts the cells left out
        (``cells_without_label``, ``cells_without_batch``). Control cells of a screen need
        no label (their perturbation is the control).

        Missing labels thus never become a class, and never silently shrink a score:
        the count goes into the result's ``computation``.
        """
        lacking: dict[str, np.ndarray] = {}
        for role, missing in self._missing.items():
            if role not in task.info.requires:
                continue
            controls = self.role("control")
            if role == "labels" and "control" in task.info.requires and controls is not None:
                missing = missing & ~np.asarray(controls, dtype=bool)
            if missing.any():
                lacking[role] = missing
        if not lacking:
            return self
        keep = ~np.logical_or.reduce(list(lacking.values()))
        key = ("scoped", hashlib.sha256(np.packbits(keep).tobytes()).hexdigest(), int(keep.sum()))

        def restrict() -> EvaluationContext:
            rows = np.flatnonzero(keep)
            expression = self.expression
            if expression is not None:
                expression = dataclasses.replace(expression, X=RowSubset(expression.X, rows))
            sub = EvaluationContext(
                self.X[rows],
                roles={role: values[rows] for role, values in self._roles.items()},
                expression=expression,
                relationship_sources=self.relationship_sources,
                relationships=self.relationships,
                n_jobs=self.n_jobs,
                exact=self.exact,
                pre_integration=None if self.pre_integration is None else self.pre_integration[rows],
            )
            sub.plan(self._planned)
            return sub

        sub = self.memo(key, restrict)
        sub.excluded = {f"cells_without_{GROUP_ROLES[role]}": int(m.sum()) for role, m in lacking.items()}
        return sub

    def relationship(self, source: str) -> Relationships:
        """The known relationships of ``source``, as the caller loaded them.

        Raises
        ------
        Exception
            The error loading the source raised; :class:`TaskError` when it was not loaded.
        """
        loaded = self.relationships.get(source)
        if loaded is None:
            msg = (f"relationship source {source!r} was not loaded for this embedding "
                   f"(loaded: {', '.join(self.relationships) or 'none'}); pass "
                   "relationships=czb.data.relationship_sources.load_sources([...]) to the context")
            raise TaskError(msg)
        if isinstance(loaded, Exception):
            raise loaded
        return loaded

    def plan(self, tasks: Iterable[Task]) -> None:
        """Note the largest neighbourhoods the tasks will ask for, so the graph (and the
        sampled cells' scan, :meth:`cell_neighborhoods`) is computed once."""
        tasks = list(tasks)
        self._planned += tasks
        self._k_planned = max([self._k_planned, *(t.neighbors_needed(self.n_cells) for t in tasks)])
        self._k_neighborhoods = max([self._k_neighborhoods, *(t.neighborhoods_needed(self.n_cells) for t in tasks)])

    def neighbors(self, k: int) -> NeighborGraph:
        """The shared graph with at least ``min(k, n_cells)`` neighbours per cell."""
        k = min(k, self.n_cells)
        if self._graph is None or self._graph.k < k:
            self._graph = compute_neighbors(self.X, max(k, min(self._k_planned, self.n_cells)), exact=self.exact)
        self.note("neighbors", self._graph.describe())
        return self._graph

    def cell_neighborhoods(self, k: int) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """``k``-neighbourhoods (self included) for metrics that average over cells
        (entropy, LISI).

        Up to :data:`czb.evaluation.metrics.mixing.EXACT_MAX_CELLS` cells (or with
        ``exact=True``): every cell's, from the shared graph. Above: the exact
        neighbourhoods of a seeded random sample of ``estimates.SAMPLE_SIZE`` cells, so a
        10^6-cell embedding needs a 15-neighbour graph for all cells, not a 200-neighbour
        one. They come from the same pass of distances as the estimated label silhouette
        (:meth:`_sampled_cells`).

        Returns
        -------
        rows
            The sampled cells ``(n_sampled,)``, or ``None`` for all cells in order.
        indices, distances
            ``(n_rows, k)`` neighbours, nearest first.
        """
        if not self._neighborhoods_sampled():
            graph = self.neighbors(k)
            idx, dist = graph.knn(min(k, graph.k))
            return None, idx, dist
        sample = self._sampled_cells(k=k)
        k = min(k, sample.k)
        self.note("neighborhoods", {"method": "exact, of sampled cells", "k": k, "n_sampled": len(sample.rows)})
        return sample.rows, sample.indices[:, :k], sample.distances[:, :k]

    def _sampled_cells(self, *, k: int = 0, silhouette: bool = False) -> Any:
        """The context's sample of cells (:func:`czb.evaluation.metrics.silhouette.scan_sample`),
        scanned once for everything the planned tasks read from it: the label silhouette
        where it is estimated and the neighbourhoods where they are sampled. Rescanned
        only if an unplanned call asks for more."""
        from czb.evaluation import estimates
        from czb.evaluation.metrics import silhouette as sil

        labels = self.role("labels")
        want_silhouette = labels is not None and not sil.is_exact(self.n_cells, self.exact)
        want_k = max(k, self._k_neighborhoods) if self._neighborhoods_sampled() else k
        held = self._memo.get(("sampled_cells",))
        if held is None or (silhouette and held.silhouette is None) or held.k < min(k, self.n_cells):
            held = sil.scan_sample(self.X, labels, silhouette=want_silhouette or silhouette, k=want_k,
                                   sample_size=estimates.SAMPLE_SIZE)
            self._memo[("sampled_cells",)] = held
        return held

    def _neighborhoods_sampled(self) -> bool:
        from czb.evaluation.metrics import mixing

        return not ((self.n_cells <= mixing.EXACT_MAX_CELLS) if self.exact is None else self.exact)

    def label_silhouettes(self) -> np.ndarray | None:
        """Every cell's silhouette of the ``labels`` role, ``(n_cells,)`` in [-1, 1], from
        one exact scan (memoised): the label silhouette and isolated labels both read it.
        ``None`` where silhouettes are estimated from a sample (:attr:`exact`, by size)."""
        from czb.evaluation.metrics import silhouette as sil

        labels = self.role("labels")
        if labels is None or not sil.is_exact(self.n_cells, self.exact):
            return None
        return self.memo(("silhouette_samples", "labels"), lambda: sil.silhouette_samples(self.X, labels))

    def silhouette(
        self,
        name: str,
        labels: np.ndarray,
        *,
        batches: np.ndarray | None = None,
        cells: np.ndarray | None = None,
    ) -> Any:
        """A silhouette of this embedding, memoised and noted under ``name``.

        Exact or estimated by size (:attr:`exact`). ``name`` identifies the value (e.g.
        ``silhouette_label``, ``silhouette_batch[species]``), so tasks asking for the same
        one share it.

        Parameters
        ----------
        labels
            ``(n_cells,)`` labels (or ``(len(cells),)`` with ``cells``).
        batches
            Batch labels aligned with ``labels``: scIB's batch silhouette within labels;
            ``None``: the rescaled [0, 1] label silhouette.
        cells
            Restrict to these cells (index or boolean mask of the embedding's rows).

        Returns
        -------
        :class:`~czb.evaluation.metrics.silhouette.Estimate`.
        """
        from czb.evaluation import estimates
        from czb.evaluation.metrics import silhouette as sil

        def compute():
            X = self.X if cells is None else self.X[cells]
            if batches is None:
                if cells is None and labels is self.role("labels"):
                    if not sil.is_exact(self.n_cells, self.exact):
                        # The same sampled cells (and pass of distances) as the sampled neighbourhoods.
                        return self._sampled_cells(silhouette=True).silhouette.map(lambda s: (s + 1.0) / 2.0)
                    return estimates.mean_estimate(self.label_silhouettes()).map(lambda s: (s + 1.0) / 2.0)
                return sil.silhouette_label(X, labels, exact=self.exact)
            return sil.silhouette_batch(X, labels, batches, exact=self.exact)

        estimate = self.memo(("silhouette", name), compute)
        self.note(name, estimate.describe())
        return estimate

    def start_leiden(self, resolutions: float | Sequence[float], *, seed: int, k: int = 15) -> None:
        """Begin computing partitions later :meth:`leiden` calls return.

        Leiden is single-threaded, so on large embeddings (at least
        :data:`BACKGROUND_LEIDEN_MIN_CELLS` cells, ``n_jobs >= 2``) the partitions of
        ``resolutions`` run one after another in a worker process on one core while the
        caller works on the others (batch integration's distance work; the other half of
        clustering's resolution sweep). The partitions are the same as computed in this
        process. Smaller or single-job runs, and runs on a machine whose every core is
        already busy (:func:`_cores_busy`), compute them when asked: a worker would only
        add its start-up there.
        """
        from czb.evaluation.metrics.clustering import leiden_many

        known = self._memo.keys() | self._background.keys()
        todo = [float(r) for r in np.atleast_1d(resolutions) if _leiden_key(r, seed, k) not in known]
        if not todo or self.n_jobs < 2 or self.n_cells < BACKGROUND_LEIDEN_MIN_CELLS or _cores_busy():
            return
        from joblib.externals.loky.process_executor import ProcessPoolExecutor

        connectivities = self.neighbors(k).connectivities(k)
        if self._worker is None:  # one per task: its seeds reuse it
            self._worker = ProcessPoolExecutor(max_workers=1)
        future = self._worker.submit(leiden_many, connectivities, todo, seed=seed)
        for position, resolution in enumerate(todo):
            self._background[_leiden_key(resolution, seed, k)] = (future, position)

    def leiden(self, resolution: float, *, seed: int, k: int = 15) -> np.ndarray:
        """Leiden clusters of the ``k``-neighbour UMAP graph (cached)."""
        from czb.evaluation.metrics.clustering import igraph_from_adjacency, leiden

        graph = self.neighbors(k)  # noted for every task that clusters, even from the memo
        key = _leiden_key(resolution, seed, k)
        if key in self._background:
            future, position = self._background.pop(key)
            self._memo[key] = future.result()[position]
        return self.memo(
            key,
            lambda: leiden(
                self.memo(("igraph", k), lambda: igraph_from_adjacency(graph.connectivities(k))),
                resolution,
                seed=seed,
            ),
        )

    def drop_background(self) -> None:
        """End the task's worker; partitions it was computing that no one took are dropped."""
        uncollected = {id(future): future for future, _ in self._background.values()}.values()
        for future in uncollected:
            future.cancel()
        if self._worker is not None:
            self._worker.shutdown(wait=False, kill_workers=bool(uncollected))
            self._worker = None
        self._background.clear()


_LOADAVG = "/proc/loadavg"
_BUSY_SAMPLES = 5


def _cores_busy() -> bool:
    """Whether other processes keep every core but one busy right now.

    The kernel's count of runnable threads at this instant (``/proc/loadavg``) less this
    process's own (BLAS threads spinning after a product count there too); not the load
    averages, which trail by a minute and count this process's own parallel work just
    before. ``False`` where unknown.
    """
    import os
    import time

    others = []
    for _ in range(_BUSY_SAMPLES):  # the two reads race this process's threads: busy only if busy every time
        try:
            with open(_LOADAVG) as f:
                running = int(f.read().split()[3].split("/")[0])
            others.append(running - _own_running_threads())
        except (OSError, ValueError, IndexError):
            return False
        time.sleep(0.01)
    return min(others) >= max((os.cpu_count() or 1) - 1, 1)


def _own_running_threads() -> int:
    """This process's threads in state R (running or runnable), this one included."""
    import os

    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:  # the thread ended meanwhile
            continue
    return count


def _checked_matrix(X: np.ndarray, what: str) -> np.ndarray:
    """``X`` as a 2-D numeric array of finite values; :class:`EmbeddingError` otherwise."""
    X = np.asarray(X)
    if X.ndim != 2:
        msg = f"{what} must be 2-D (cells x dims); got shape {X.shape}"
        raise EmbeddingError(msg)
    if not np.issubdtype(X.dtype, np.number):
        msg = f"{what} must be numeric; got dtype {X.dtype}"
        raise EmbeddingError(msg)
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        msg = f"{what} has {int(bad.sum())} rows with NaN or inf (first: {np.flatnonzero(bad)[:5].tolist()})"
        raise EmbeddingError(msg)
    return X


def _leiden_key(resolution: float, seed: int, k: int) -> tuple:
    """The memo key of a Leiden partition (shared by :meth:`EvaluationContext.start_leiden`)."""
    return ("leiden", k, float(resolution), seed)
