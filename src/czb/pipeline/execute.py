"""Run a plan on an executor: skip finished units, retry failed ones a bounded number of
times, record what still fails, and assemble the result records. ``czb bench`` runs a
suite's plan on worker processes or Ray; ``czb run`` its own plan in-process
(:class:`~czb.pipeline.executors.InProcessExecutor`), through this same code.

Embed units run first; as each embedding lands in the store, the score units that read
it start as one job (sharing one evaluation context). A job that dies (a killed worker,
a lost node) is retried for the units it had not yet written. A unit that fails
``retries + 1`` times is recorded in ``failures/`` with its reason and the suite goes
on; the suite's records then show it as failed, so a gap is never silent. Failed units
are tried again by the next run of the suite.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from czb.core import records as R
from czb.core.errors import CzbError
from czb.pipeline.assemble import assemble_records, read_score
from czb.pipeline.executors import Executor, Job
from czb.pipeline.plan import Plan, ScoreUnit, dataset_checksum, plan_suite
from czb.pipeline.progress import SuiteProgress
from czb.pipeline.store import UNIT_FILE, Store
from czb.pipeline.work import (
    not_applicable_output,
    run_embed_unit,
    run_score_units,
    say_warnings,
    with_warnings,
)

if TYPE_CHECKING:
    from czb.models.docker.request import RunOptions
    from czb.specs.catalog import Catalog

DEFAULT_RETRIES = 2


@dataclass
class SuiteOutcome:
    """What a run of a suite did and found."""

    plan: Plan
    store: str
    #: Units done before this run (skipped), and finished by it.
    cached: int
    ran: int
    #: Units that ran out of retries: key → (label, reason).
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)
    #: Units never attempted because a unit they need failed: key → (label, reason).
    blocked: dict[str, tuple[str, str]] = field(default_factory=dict)
    records: list[R.ResultRecord] = field(default_factory=list)
    #: Units that finished after failing at least once.
    retried: int = 0
    #: Records that could not be written to the store (one line each).
    unwritten: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed and not self.blocked


def run_suite(
    plan: Plan,
    store: Store,
    executor: Executor,
    *,
    retries: int = DEFAULT_RETRIES,
    n_jobs: int = 1,
    offline: bool | None = None,
    command: str = "",
    progress: Callable[[SuiteProgress], None] | None = None,
    poll_s: float = 1.0,
    options: RunOptions | None = None,
    raise_errors: bool = False,
    redo: Collection[str] = (),
) -> SuiteOutcome:
    """Run every unit of ``plan`` not yet in ``store``; see the module docstring.

    Parameters
    ----------
    retries
        Further attempts of a failed unit before it is recorded as failed.
    n_jobs
        Threads per score job (it declares that many CPUs to the executor).
    progress
        Called with the suite's counts whenever they change (and every ``poll_s``).
    options
        The run's choices for docker models (:func:`czb.pipeline.work.run_options`);
        they travel with each job, so only an in-process executor takes ones that
        cannot be pickled (a log callback).
    raise_errors
        A failing model or task raises in its job instead of failing its unit.
    redo
        Keys of units to run even when their outputs are in the store (``czb run
        --no-cache``).

    The executor is shut down when the run ends, whether it finished or was interrupted.
    """
    work = {"offline": offline, "options": options, "raise_errors": raise_errors}
    run = _SuiteRun(plan, store, executor, retries=retries, n_jobs=n_jobs, work=work, redo=redo)
    show = progress or (lambda _p: None)
    try:
        run.start()
        while executor.running() or executor.queued():
            run.tracker.running = sum(run.running_units.values())
            show(run.tracker)
            for job, result, error in executor.wait(timeout=poll_s):
                run.finished(job, result, error)
        run.tracker.running = 0
        show(run.tracker)
    finally:
        executor.shutdown()
    records, unwritten = assemble_records(plan, store, command=command)
    retried = sum(1 for key in run.attempts if key not in run.failed)
    return SuiteOutcome(plan, store.url, run.tracker.cached, run.tracker.done - run.tracker.cached,
                        run.failed, run.blocked, records, retried, unwritten)


def plan_on_workers(catalog: Catalog, name: str, executor: Executor, *, offline: bool | None = None,
                    poll_s: float = 1.0) -> Plan:
    """Plan suite ``name`` without downloading any dataset here: the checksum of each
    dataset this machine does not hold is computed by a job on ``executor`` (which
    fetches it into that worker's cache, where its units will read it), then the suite
    is planned with those checksums.

    Raises
    ------
    DatasetError
        A worker could not fetch or check a dataset (the first such error).
    """
    plan = plan_suite(catalog, name, offline=offline, network=False)
    for dataset in sorted(plan.unresolved):
        executor.submit(Job(dataset_checksum, (plan.datasets[dataset],), {"offline": offline, "fetch_remote": True},
                            label=f"{dataset}: checksum", tag=("checksum", [dataset])))
    known: dict[str, str] = {}
    while executor.running() or executor.queued():
        for job, result, error in executor.wait(timeout=poll_s):
            if error is not None:
                raise error
            known[job.tag[1][0]] = result
    return plan_suite(catalog, name, offline=offline, checksums=known) if known else plan


def done_units(plan: Plan, store: Store, *, repair: bool = False) -> tuple[set[str], set[str]]:
    """Keys of the plan's embed and score units whose outputs are in ``store`` and can
    be read. An output that cannot (a truncated ``embedding.npz``, a damaged JSON) is
    named in a one-line :class:`~czb.pipeline.store.StoreWarning`, and its unit is not
    done: it runs again. With ``repair`` (when the suite runs) such files are deleted."""
    embeds = {k for k in store.done_embeddings() & set(plan.embeds) if store.readable_embedding(k, repair=repair)}
    scores = {k for k in store.done_scores() & set(plan.scores) if read_score(store, k, repair=repair) is not None}
    return embeds, scores


class _SuiteRun:
    """The bookkeeping of one run: what is pending, running, retried and given up."""

    def __init__(self, plan: Plan, store: Store, executor: Executor, *, retries: int, n_jobs: int,
                 work: dict[str, Any], redo: Collection[str]):
        self.plan, self.store, self.executor = plan, store, executor
        self.retries, self.n_jobs, self.work = retries, n_jobs, work
        store.write_json("suite.json", _describe(plan))
        self.done_embeds, done_scores = (done - set(redo) for done in done_units(plan, store, repair=True))
        cached = len(self.done_embeds) + len(done_scores)
        self.tracker = SuiteProgress(total=plan.n_units, cached=cached, done=cached, slots=executor.slots)
        self.attempts: Counter[str] = Counter()
        self.failed: dict[str, tuple[str, str]] = {}
        self.blocked: dict[str, tuple[str, str]] = {}
        #: Score units not yet done, by the embed units they wait for (:attr:`ScoreUnit.needs`).
        self.waiting: dict[tuple[str, ...], list[ScoreUnit]] = defaultdict(list)
        for key, unit in plan.scores.items():
            if key not in done_scores:
                self.waiting[unit.needs].append(unit)
        self.embedded: set[str] = set()  # embed units done, before or in this run
        #: Embed units only read as a pre-integration PCA: started when a unit needs one.
        needed = {k for unit in plan.scores.values() for k in unit.embed_keys}
        self.lazy = {u.pre_integration for u in plan.scores.values() if u.pre_integration} - needed
        self.submitted: set[str] = set()
        self.running_units: dict[int, int] = {}  # id(job) -> units in it
        #: Embed units run again because their output became unreadable: key -> times.
        self.redone: Counter[str] = Counter()

    def start(self) -> None:
        predictions: dict[tuple[str, str], list[ScoreUnit]] = defaultdict(list)
        for unit in self.waiting.pop((), []):  # perturbation tasks: they read no embedding
            predictions[unit.model, unit.dataset_name].append(unit)
        for units in predictions.values():
            self.submit_scores(units)
        for key in self.plan.embeds:
            if key in self.done_embeds:
                self.embedding_ready(key)
            elif key not in self.lazy and key not in self.submitted:
                self.submit_embed(key)

    # submitting -------------------------------------------------------------------

    def _submit(self, job: Job, n_units: int) -> None:
        self.executor.submit(job)
        self.running_units[id(job)] = n_units

    def submit_embed(self, key: str) -> None:
        self.submitted.add(key)
        unit = self.plan.embeds[key]
        self._submit(Job(with_warnings, (run_embed_unit, unit, self.store.url), self.work, label=unit.label,
                         gpus=unit.gpus, memory_gb=unit.memory_gb, tag=("embed", [key])), 1)

    def submit_scores(self, units: Sequence[ScoreUnit]) -> None:
        units = sorted(units, key=lambda u: (u.task.name, u.seed))  # a task's seeds share memoised values
        label = f"{units[0].dataset_name}/{units[0].model}: {len(units)} score unit(s)"
        kwargs = {"n_jobs": self.n_jobs, **self.work}
        predictor = units[0].predictor  # a perturbation predictor runs inside the job: its needs count
        gpus = 1 if predictor is not None and predictor.resources.gpu else 0
        memory_gb = predictor.resources.memory_gb if predictor is not None else None
        self._submit(Job(with_warnings, (run_score_units, units, self.store.url), kwargs, label=label,
                         cpus=self.n_jobs, gpus=gpus, memory_gb=memory_gb, tag=("score", [u.key for u in units])),
                     len(units))

    def embedding_ready(self, key: str) -> None:
        """Start (or settle) the score units whose embeddings are now all done."""
        self.embedded.add(key)
        for keys in [k for k in self.waiting if key in k]:
            self._release(keys)

    def _release(self, keys: tuple[str, ...]) -> None:
        """Start (or settle) the units waiting for ``keys`` once their embeddings are done;
        their pre-integration PCA is started then (when they can be scored), and the
        units once it is done too."""
        units = self.waiting.get(keys)
        own = units[0].embed_keys if units else keys
        if not units or not self.embedded.issuperset(own):
            return
        metas = [self.store.read_output(f"embeddings/{k}/{UNIT_FILE}", keys=("status", "error", "dataset"))
                 for k in own]
        if any(m is None for m in metas):  # gone or unreadable since: embed again
            self.redo_embeddings([k for k, m in zip(own, metas) if m is None])
            return
        if all(m["status"] == "ok" for m in metas):
            pending = [k for k in keys if k not in self.embedded]
            for key in pending:  # one done before this run is released when start() reaches it
                if key not in self.submitted and key not in self.done_embeds:
                    self.submit_embed(key)
            if not pending:
                self.submit_scores(self.waiting.pop(keys))
            return
        units = self.waiting.pop(keys)
        # No embedding to score: each unit's outcome is the model's.
        odd = [m for m in metas if m["status"] != "ok"]
        reason = odd[0]["error"] if len(metas) == 1 else "; ".join(
            f"{m['dataset']['name']}: {m['error']}" for m in odd)
        for unit in units:
            self.store.write_json(f"scores/{unit.key}.json", not_applicable_output(unit, reason))
        self.tracker.finished(len(units), 0.0)

    # outcomes ---------------------------------------------------------------------

    def finished(self, job: Job, result: Any, error: BaseException | None) -> None:
        n_units = self.running_units.pop(id(job), 0)
        kind, keys = job.tag
        if error is None:  # every job runs through with_warnings
            result, said = result
            say_warnings(said, job.label)
        if kind == "embed":
            self._embed_finished(keys[0], job.seconds, error)
        else:
            self._scores_finished(keys, n_units, job.seconds, result, error)

    def _embed_finished(self, key: str, seconds: float, error: BaseException | None) -> None:
        if error is None:
            self.store.delete(f"failures/{key}.json")
            self.tracker.finished(1, seconds)
            self.embedding_ready(key)
            return
        self.attempts[key] += 1
        if self.attempts[key] <= self.retries:
            self.submit_embed(key)
        else:
            self.give_up(key, self.plan.embeds[key].label, _reason(error), getattr(error, "log_tail", ()),
                         model=getattr(error, "model", None))

    def redo_embeddings(self, keys: Sequence[str]) -> bool:
        """Run embed units ``keys`` again (their output was found unreadable and removed),
        at most ``retries + 1`` times each, else give them up; the score units waiting on
        them wait on. Returns whether all were resubmitted."""
        resubmitted = True
        for key in keys:
            self.store.forget_embedding(key)
            if key not in self.embedded:  # already being redone
                continue
            self.embedded.discard(key)
            self.redone[key] += 1
            self.tracker.done -= 1  # no longer done; counted again when it finishes
            if key in self.done_embeds:
                self.done_embeds.discard(key)
                self.tracker.cached -= 1
            if self.redone[key] > self.retries + 1:
                self.give_up(key, self.plan.embeds[key].label, "its output in the store could not be read")
                resubmitted = False
            else:
                self.submit_embed(key)
        return resubmitted

    def _scores_finished(self, keys: Sequence[str], n_units: int, seconds: float, result: Any,
                         error: BaseException | None) -> None:
        outcomes = result or {}
        if error is None:  # the job says which units it wrote
            written = {k for k in keys if outcomes.get(k, {}).get("status") not in (None, "failed")}
        else:  # it died: the store says which units it wrote before
            written = {k for k in keys if self.store.exists(f"scores/{k}.json")}
        # An embedding that turned out unreadable was removed by the job: embed it again,
        # and its units wait for it (no attempt counted against them).
        unread = {k for key in keys if key not in written for k in self.plan.scores[key].embed_keys
                  if not self.store.exists(f"embeddings/{k}/{UNIT_FILE}")}
        if unread and self.redo_embeddings(sorted(unread)):
            for key in [k for k in keys if k not in written]:
                unit = self.plan.scores[key]
                if set(unit.embed_keys) & unread:
                    self.waiting[tuple(k for k in unit.needs if k not in self.failed)].append(unit)
            keys = [k for k in keys if k in written or not set(self.plan.scores[k].embed_keys) & unread]
        again: list[ScoreUnit] = []
        for key in keys:
            if key in written:
                if self.attempts[key]:
                    self.store.delete(f"failures/{key}.json")
                continue
            self.attempts[key] += 1
            why = outcomes.get(key, {}).get("error") or (_reason(error) if error else "no output")
            if self.attempts[key] <= self.retries:
                again.append(self.plan.scores[key])
            else:
                self.give_up(key, self.plan.scores[key].label, why)
        self.tracker.finished(len(written), seconds * len(written) / max(n_units, 1))
        if again:
            self.submit_scores(again)

    def give_up(self, key: str, label: str, reason: str, log_tail: Sequence[str] = (),
                model: dict[str, Any] | None = None) -> None:
        """Record a unit that ran out of retries (with the model as its run described
        it, when it got that far), and block the units that need it."""
        self.failed[key] = (label, reason)
        self.tracker.failed += 1
        self.store.write_json(f"failures/{key}.json", {
            "key": key, "label": label, "error": reason, "attempts": self.attempts[key],
            "log_tail": list(log_tail), "model": model, "at": R.now_utc(),
        })
        for keys in [k for k in self.waiting if key in k]:
            for unit in self.waiting.pop(keys):
                if key not in unit.embed_keys:  # its pre-integration PCA: scored without it
                    self.waiting[tuple(k for k in keys if k != key)].append(unit)
                    continue
                self.blocked[unit.key] = (unit.label, f"embedding failed: {reason}")
                self.tracker.failed += 1
            rest = tuple(k for k in keys if k != key)
            if rest in self.waiting:
                self._release(rest)


def _reason(error: BaseException) -> str:
    return str(error) if isinstance(error, CzbError) else f"{type(error).__name__}: {error}"


def _describe(plan: Plan) -> dict[str, Any]:
    return {
        "suite": plan.suite,
        "embed_units": {k: u.label for k, u in plan.embeds.items()},
        "score_units": {k: u.label for k, u in plan.scores.items()},
        "records": [asdict(r) for r in plan.records],
    }
