"""``czb run``: one comparison planned and executed in this process, through the same
planner (:mod:`czb.pipeline.plan`), executor protocol, store and record assembly as
``czb bench``.

Order of work, so bad input fails before anything heavy runs:

1. resolve every name and build every task (unknown names, bad parameters, a task over
   several datasets given one);
2. check the output folder is writable; hash the datasets (fetching them if needed)
   and a user's embedding file;
3. execute the plan (:func:`czb.pipeline.execute.run_suite`) on an
   :class:`~czb.pipeline.executors.InProcessExecutor` with no retries: the user's file
   first, then per dataset each model's embedding and its scores, tasks over several
   datasets last.

Units already in the output folder are reused, whichever command computed them, and a
record's file there is the same for both: ``czb run --output-dir D`` and ``czb bench
--store D`` share their work.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from czb.core import records as R
from czb.core.errors import ResultsError, UsageError
from czb.evaluation.runner import DEFAULT_SEEDS
from czb.pipeline.execute import SuiteOutcome, run_suite
from czb.pipeline.executors import InProcessExecutor, Job
from czb.pipeline.plan import EmbeddingFile, Matrix, Plan, plan_matrices, resolve_matrix
from czb.pipeline.progress import SuiteProgress
from czb.pipeline.store import Store, open_store
from czb.pipeline.work import DatasetUnusable, keep_last_dataset
from czb.specs.catalog import Catalog

if TYPE_CHECKING:
    from czb.models.docker.request import RunOptions

#: Receives one line per step of the run.
Progress = Callable[[str], None]


def run_benchmark(
    catalog: Catalog,
    *,
    datasets: Sequence[str],
    tasks: Sequence[str],
    models: Sequence[str] = (),
    embedding: Path | None = None,
    embedding_key: str | None = None,
    baseline: bool = True,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    output_dir: Path | None = None,
    offline: bool | None = None,
    n_jobs: int | None = None,
    command: str = "",
    progress: Progress | None = None,
    raise_errors: bool = False,
    model_options: RunOptions | None = None,
    exact: bool | None = None,
) -> list[R.ResultRecord]:
    """Score models (or a user's embedding file) on datasets and tasks.

    Parameters
    ----------
    catalog
        Where names are looked up.
    datasets, tasks, models
        Names in the catalog (``["all"]`` expands to every entry).
    embedding, embedding_key
        A file of precomputed embeddings (one dataset only) and its key.
    baseline
        Also score the baselines the tasks are compared with (``pca``; ``control_mean``
        and ``additive_linear`` for perturbation predictions), unless already asked for.
    seeds
        Seeds of stochastic steps.
    output_dir
        The store the units' outputs and the result records go to (``results/``),
        shared with ``czb bench --store``: units already there are reused. Created and
        checked writable before any work. ``None``: a temporary store, removed after.
    raise_errors
        Let a failing model or task raise instead of becoming a ``failed`` record.
    model_options
        The run's choices for docker models (GPUs, weights, variant, parameters, limits;
        ``use_cache=False`` runs every unit again).
    exact
        Exact neighbour graphs and silhouettes at any size (``True``); ``None``: exact
        up to the documented sizes, approximate/estimated above (recorded in each
        result's ``computation``).

    Returns
    -------
    Every record, in order: per dataset, per model (the file first, baselines last),
    per task; tasks over several datasets last. When ``embedding`` cannot be used on the
    dataset (unreadable, wrong shape, constant...), its records only: it runs first, and
    nothing else runs.

    Raises
    ------
    ResultsError
        Some records could not be written (the others were).
    """
    from czb.core.settings import get_settings

    if not seeds:
        msg = "at least one seed is needed"
        raise UsageError(msg)
    if embedding is None and not models:
        msg = "nothing to score: give --model or --embedding"
        raise UsageError(msg)
    matrix = Matrix("run", tuple(datasets), tuple(models), tuple(tasks), tuple(seeds), baseline, exact)
    resolved, *_ = resolve_matrix(catalog, matrix, warn=False)  # unknown names and bad parameters first
    if embedding is not None and len(resolved) != 1:
        msg = f"--embedding scores one dataset; {len(resolved)} were given"
        raise UsageError(msg)
    store = open_store(output_dir, what="output folder") if output_dir is not None else None  # before any work
    if embedding is not None:
        matrix = replace(matrix, file=EmbeddingFile.open(embedding, embedding_key))
    plan = plan_matrices(catalog, [matrix], name="run", offline=offline, options=model_options, fetch_remote=True,
                         progress=progress is not None)
    rerun = model_options is not None and not model_options.use_cache
    say = progress or (lambda _m: None)
    execution = _Execution(n_jobs=n_jobs or get_settings().n_jobs, offline=offline, command=command, say=say,
                           raise_errors=raise_errors, options=model_options)
    with ExitStack() as stack:
        if store is None:
            store = open_store(stack.enter_context(tempfile.TemporaryDirectory(prefix="czb-run-")))
        stack.enter_context(keep_last_dataset(show_download=progress is not None))
        if matrix.file is not None:
            # The user's own file first: one that does not fit stops the run before the baselines.
            first = plan.only(matrix.file.name)
            outcome = execution(first, store, redo=first.unit_keys if rerun else ())
            if outcome.failed.keys() & first.embeds.keys():
                return _finished(outcome, kept=output_dir is not None)
            done = first.unit_keys
        else:
            done = set()
        outcome = execution(plan, store, redo=plan.unit_keys - done if rerun else ())
        return _finished(outcome, kept=output_dir is not None)


@dataclass(frozen=True)
class _Execution:
    """How ``czb run`` executes a plan: in this process, no retries."""

    n_jobs: int
    offline: bool | None
    command: str
    say: Progress
    raise_errors: bool
    options: RunOptions | None

    def __call__(self, plan: Plan, store: Store, *, redo: Collection[str]) -> SuiteOutcome:
        latest: dict[str, SuiteProgress] = {}

        def started(job: Job) -> None:
            counts = latest.get("counts")
            self.say(f"[{counts.done}/{counts.total}] {job.label}" if counts else job.label)

        # A dataset that cannot be used stops the run with its error, as bad input should.
        executor = InProcessExecutor(raise_errors=self.raise_errors, fatal=(DatasetUnusable,), on_start=started)
        return run_suite(plan, store, executor, retries=0, n_jobs=self.n_jobs, offline=self.offline,
                         command=self.command, progress=lambda p: latest.update(counts=p), poll_s=0.0, options=self.options,
                         raise_errors=self.raise_errors, redo=redo)


def _finished(outcome: SuiteOutcome, *, kept: bool) -> list[R.ResultRecord]:
    """The run's records; their embedding samples named only when the store is kept."""
    if outcome.unwritten:
        msg = (f"{len(outcome.unwritten)} result(s) could not be written (the others were): "
               f"{outcome.unwritten[0]}")
        raise ResultsError(msg)
    if not kept:  # the samples went with the temporary store
        return [r.model_copy(update={"embedding_sample": None}) for r in outcome.records]
    return outcome.records
