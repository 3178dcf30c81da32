"""``czb bench``: run a benchmark suite on a local or Ray executor, resuming where it stopped."""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from czb.cli.common import (
    ConfigDirs,
    DebugOption,
    _console,
    _fail,
    _guarded,
    _one_line,
    _positive,
    _safe,
)


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"



def bench(
    suite: Annotated[str, typer.Argument(help="A suite YAML file, or the name of a suite in the catalog.")],
    name: Annotated[Optional[str], typer.Option("--suite", help="Which suite of the file [default: its only one].")] = None,
    store: Annotated[
        Optional[str], typer.Option(help="Folder every worker shares for outputs [default: CZB_OUTPUT_DIR/SUITE, "
                                       "else ./czb-results/SUITE].")
    ] = None,
    executor: Annotated[ExecutorName, typer.Option(help="local: processes here; ray: a Ray cluster.")] = ExecutorName.local,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address HOST:PORT (with --executor ray).")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Further attempts of a failed unit before it is recorded as failed.")] = 2,
    n_jobs: Annotated[int, typer.Option(min=1, help="Threads per scoring job.")] = 1,
    cpus: Annotated[Optional[int], typer.Option(min=1, help="Local executor: cores to use [default: all].")] = None,
    memory_gb: Annotated[
        Optional[float], typer.Option(callback=_positive, help="Local executor: memory to fill [default: 90%].")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan from the specs and show what would run; download and run nothing.")
    ] = False,
    offline: Annotated[bool, typer.Option(help="Use only cached datasets.")] = False,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Run a benchmark suite (models x datasets x tasks x seeds), resuming where it stopped.

    Every unit of work is keyed by its content; units already in the store are skipped,
    failed ones are retried a bounded number of times, then recorded as failed."""

    def body():
        from czb.bench.executors import make_executor
        from czb.core.settings import get_settings
        from czb.pipeline.execute import done_units, plan_on_workers, run_suite
        from czb.pipeline.plan import plan_suite
        from czb.pipeline.store import open_store
        from czb.specs.catalog import Catalog

        settings = get_settings()
        path = Path(suite)
        files = [path] if path.suffix in (".yaml", ".yml") or path.is_file() else []
        if files and not path.is_file():
            _fail(f"suite file {path} does not exist", 2)
        catalog = Catalog.load(config_dir or (), extra_files=files)
        if files:
            from czb.specs.loading import load_spec_file

            in_file = list(load_spec_file(path).get("suites", {}))
            if name is None and len(in_file) != 1:
                _fail(f"{path} defines {len(in_file)} suites ({', '.join(in_file) or 'none'}); pick one with --suite", 2)
            suite_name = name or in_file[0]
        else:
            suite_name = name or suite
        err = _console(stderr=True)
        with err.status("planning") as status:
            catalog.suite(suite_name)  # an unknown name fails first
            target = open_store(store or settings.output_dir / suite_name)  # checked before planning fetches
            offline_only = offline or settings.offline
            options = {"address": address} if executor is ExecutorName.ray else {"cpus": cpus, "memory_gb": memory_gb}
            runner = None if dry_run else make_executor(executor.value, **options)
            if executor is ExecutorName.ray and runner is not None:  # datasets are fetched where units run
                plan = plan_on_workers(catalog, suite_name, runner, offline=offline_only)
            else:
                plan = plan_suite(catalog, suite_name, offline=offline_only, network=not dry_run)
            done = set.union(*done_units(plan, target))
            err.print(f"suite {_safe(suite_name)}: {len(plan.embeds)} embed and {len(plan.scores)} score units "
                      f"({len(done)} already done) for {len(plan.records)} results; store {_safe(target.url)}")
            if dry_run:
                for unit in [*plan.embeds.values(), *plan.scores.values()]:
                    names = {unit.dataset.name} if unit.kind == "embed" else {d.name for d in unit.datasets}
                    if names & plan.unresolved:  # its key needs the file's checksum
                        typer.echo(f"todo  {'?' * 12}  {_one_line(unit.label)} (to be resolved)")
                        continue
                    state = "done" if unit.key in done else "todo"
                    typer.echo(f"{state}  {unit.key[:12]}  {_one_line(unit.label)}")
                if plan.unresolved:
                    err.print(f"{len(plan.unresolved)} dataset(s) not downloaded yet: their units' keys are resolved "
                              "when the suite runs", soft_wrap=True)
                return
            outcome = run_suite(plan, target, runner, retries=retries, n_jobs=n_jobs, offline=offline_only,
                                command=shlex.join(["czb", *sys.argv[1:]]),
                                progress=lambda p: status.update(p.line()))
        from czb.cli.tables import print_hierarchy, print_results

        print_results(outcome.records)  # as czb run prints them
        print_hierarchy(outcome.records)
        again = f" ({outcome.retried} after a retry)" if outcome.retried else ""
        err.print(f"{outcome.ran} units ran{again}, {outcome.cached} were done before; "
                  f"results in {target.url}/results", soft_wrap=True)
        if "://" not in target.url:  # a report is made from a folder
            err.print(f"report: czb report {shlex.quote(target.url)} -o report.html", soft_wrap=True)
        for label, reason in {**outcome.failed, **outcome.blocked}.values():
            err.print(f"[bold red]failed:[/] {_safe(f'{label}: {reason}')}", soft_wrap=True, markup=True)
        for line in outcome.unwritten:
            err.print(f"[bold red]not written:[/] {_safe(line)}", soft_wrap=True, markup=True)
        if not outcome.complete or outcome.unwritten:
            raise typer.Exit(1)

    _guarded(body)
