"""The ``czb`` command line: a thin Typer layer over :mod:`czb.runner` and :mod:`czb.evaluation`.

This is the only place that turns exceptions into exit codes: 2 for unknown names
and bad usage, 1 for any other czb error (one line; the traceback with ``--debug``).
Heavy modules are imported inside commands so ``czb --version`` stays instant.
"""

from __future__ import annotations

import json
import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

import czb

app = typer.Typer(
    name="czb",
    help="Benchmark single-cell foundation models honestly and fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(help="Manage datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


class _State:
    debug = False


class Kind(str, Enum):
    datasets = "datasets"
    models = "models"
    tasks = "tasks"


class Format(str, Enum):
    table = "table"
    json = "json"


ConfigDirs = Annotated[
    Optional[list[Path]],
    typer.Option("--config-dir", help="Extra spec folder (repeatable); its entries override ours."),
]
OutputFormat = Annotated[Format, typer.Option("--format", help="table for people, json for programs.")]


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _fail(message: str, code: int) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _guarded(fn):
    """Run a command body, mapping czb's exceptions to exit codes."""
    from czb.errors import CzbError, UnknownNameError

    try:
        return fn()
    except typer.Exit:
        raise
    except UnknownNameError as e:
        if _State.debug:
            raise
        _fail(str(e), 2)
    except CzbError as e:
        if _State.debug:
            raise
        _fail(str(e), 1)


def _catalog(config_dirs: list[Path] | None):
    from czb.runner.specs import Catalog

    return Catalog.load(config_dirs or ())


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"czb {czb.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
) -> None:
    _State.debug = debug
    _route_warnings()


def _route_warnings() -> None:
    """Show czb's own warnings as one ``warning:`` line on stderr; leave others alone."""
    import warnings

    from czb.errors import CzbWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CzbWarning):
            _console(stderr=True).print(f"[yellow]warning:[/] {message}", soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


@app.command("list")
def list_(
    kind: Annotated[Kind, typer.Argument(help="What to list.")],
    fmt: OutputFormat = Format.table,
    config_dir: ConfigDirs = None,
) -> None:
    """List the datasets, models or tasks czb knows."""

    def body():
        catalog = _catalog(config_dir)
        rows = _list_rows(catalog, kind)
        if fmt is Format.json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"{len(rows)} {kind.value}")
        for column in rows[0] if rows else ["name"]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(_cell(v) for v in row.values()))
        _console().print(table)

    _guarded(body)


def _cell(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return "" if value is None else str(value)


def _list_rows(catalog, kind: Kind) -> list[dict]:
    if kind is Kind.datasets:
        return [
            {"name": d.name, "organism": d.organism, "label_key": d.label_key, "batch_key": d.batch_key,
             "uri": d.uri, "tags": d.tags, "description": d.description}
            for d in sorted(catalog.datasets.values(), key=lambda d: d.name)
        ]
    if kind is Kind.models:
        return [
            {"name": m.name, "kind": m.kind, "input": m.input, "gene_id_type": m.gene_id_type,
             "output_dim": m.output_dim, "gpu": m.resources.gpu, "memory_gb": m.resources.memory_gb,
             "description": m.description}
            for m in sorted(catalog.models.values(), key=lambda m: m.name)
        ]
    from czb.evaluation.registry import get_task

    rows = []
    for t in sorted(catalog.tasks.values(), key=lambda t: t.name):
        impl = get_task(t.implementation)
        rows.append({"name": t.name, "implementation": t.implementation, "requires": list(impl.info.requires),
                     "metrics": list(impl.info.metrics), "parameters": t.parameters,
                     "description": t.description or impl.info.description})
    return rows


def _parse_seeds(text: str) -> list[int]:
    from czb.errors import CzbError

    try:
        seeds = [int(s) for s in text.replace(",", " ").split()]
    except ValueError:
        msg = f"--seeds must be integers separated by commas, got {text!r}"
        raise CzbError(msg) from None
    if not seeds or min(seeds) < 0:
        msg = f"--seeds needs one or more non-negative integers, got {text!r}"
        raise CzbError(msg)
    return seeds


@app.command()
def run(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model name (repeatable).")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="Task name (repeatable, or 'all').")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", "-d", help="Dataset name (repeatable).")] = None,
    embedding: Annotated[
        Optional[Path], typer.Option(help="Your own embeddings: .npy, .npz, .parquet or .h5ad.")
    ] = None,
    embedding_key: Annotated[Optional[str], typer.Option(help="Array/obsm key inside --embedding.")] = None,
    seeds: Annotated[str, typer.Option(help="Seeds of stochastic steps, e.g. 0,1,2.")] = "0,1,2",
    output_dir: Annotated[Optional[Path], typer.Option(help="Folder for result JSONs [default: CZB_OUTPUT_DIR].")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also score the PCA baseline.")] = True,
    offline: Annotated[bool, typer.Option(help="Use only cached datasets.")] = False,
    n_jobs: Annotated[Optional[int], typer.Option(help="Worker processes [default: all cores].")] = None,
    fmt: OutputFormat = Format.table,
    config_dir: ConfigDirs = None,
) -> None:
    """Embed datasets with models (or read your embeddings) and score them on tasks."""

    def body():
        from czb.runner.run import run_benchmark
        from czb.settings import get_settings

        if not task or not dataset:
            _fail("give at least one --task and one --dataset", 2)
        settings = get_settings()
        out = output_dir or settings.output_dir
        command = "czb " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        err = _console(stderr=True)
        with err.status("starting") as status:
            records = run_benchmark(
                _catalog(config_dir),
                datasets=dataset,
                tasks=task,
                models=model or [],
                embedding=embedding,
                embedding_key=embedding_key,
                baseline=baseline,
                seeds=_parse_seeds(seeds),
                output_dir=out,
                offline=offline or settings.offline,
                n_jobs=n_jobs,
                command=command,
                progress=lambda message: status.update(message),
                raise_errors=_State.debug,
            )
        if fmt is Format.json:
            typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        else:
            _print_results(records)
            err.print(f"results written to {out}", soft_wrap=True)
        failed = [r for r in records if r.status == "failed"]
        # The table cell may be too narrow to read; each distinct failure gets its own line.
        for message in dict.fromkeys(f"{r.dataset.name}/{r.model.name}: {r.error}" for r in failed):
            err.print(f"[bold red]failed:[/] {message}", soft_wrap=True, markup=True)
        if failed:
            raise typer.Exit(1)

    _guarded(body)


def _print_results(records) -> None:
    from rich.table import Table

    from czb.runner.run import BASELINE_MODEL, baseline_differences

    diffs = baseline_differences(records)
    table = Table(title="czb results (mean ± sd over seeds; Δ = model - pca)")
    for column in ("dataset", "task", "model", "metric", "value", f"Δ {BASELINE_MODEL}", "status"):
        numeric = column in ("value", f"Δ {BASELINE_MODEL}")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "status")
    for r in records:
        if r.status != "ok":
            table.add_row(r.dataset.name, r.task.name, r.model.name, "", "", "", f"{r.status}: {r.error}")
            continue
        for m in r.metrics:
            label = m.name + (f" [{m.params['classifier']}]" if "classifier" in m.params else "")
            value = "n/a" if m.value is None else f"{m.value:.4f}"
            if m.value_std_dev is not None:
                value += f" ± {m.value_std_dev:.4f}"
            key = (r.dataset.name, r.task.name, m.name,
                   tuple(sorted((k, str(v)) for k, v in m.params.items())), r.model.name)
            d = diffs.get(key)
            table.add_row(r.dataset.name, r.task.name, r.model.name, label, value,
                          "" if d is None else f"{d:+.4f}", r.status)
    _console().print(table)


@datasets_app.command("fetch")
def datasets_fetch(
    names: Annotated[list[str], typer.Argument(help="Dataset names, or 'all'.")],
    config_dir: ConfigDirs = None,
) -> None:
    """Download datasets into the cache (CZB_CACHE_DIR) so later runs work offline."""

    def body():
        from czb.runner.fetch import fetch, is_remote

        catalog = _catalog(config_dir)
        for spec in catalog.resolve("dataset", names):
            if not is_remote(spec.uri):
                _console(stderr=True).print(f"{spec.name}: nothing to fetch ({spec.uri})")
                continue
            path = fetch(spec.uri, sha256=spec.sha256, progress=True)
            _console().print(f"{spec.name}: {path}")

    _guarded(body)


def main() -> None:
    """Console-script entry point."""
    app()
