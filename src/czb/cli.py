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
    rich_markup_mode=None,  # help texts are plain: "[default: ...]" must print, not parse as markup
)
datasets_app = typer.Typer(help="Manage datasets.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(datasets_app, name="datasets")
models_app = typer.Typer(help="Build model images and stage their weights.", no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(models_app, name="models")


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


def _one_line(text: object) -> str:
    """``text`` as one line safe on a terminal (:func:`czb.terminal.printable`): names,
    errors and paths come from records, specs and containers, and may hold escape
    sequences."""
    from czb.terminal import printable

    return printable(text).strip()


def _safe(text: object) -> str:
    """:func:`_one_line` for a rich markup string: its brackets are not read as markup."""
    from rich.markup import escape

    return escape(_one_line(text))


def _fail(message: str, code: int) -> None:
    _console(stderr=True).print(f"[bold red]error:[/] {_safe(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _internal_error(e: BaseException) -> str:
    """One line for an exception czb did not expect: its type and a short message with
    quoted parts elided (they may be someone's data)."""
    import re

    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", _one_line(str(e)))
    text = text if len(text) <= 120 else text[:117] + "..."
    what = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return f"internal error ({what}) — rerun with --debug for the traceback"


def _guarded(fn):
    """Run a command body, mapping exceptions to exit codes: 2 for unknown names and bad
    settings, 1 for other czb errors and, as a last resort, for anything unexpected
    (one line; ``--debug`` shows the traceback)."""
    from czb.errors import CzbError, SettingsError, UnknownNameError

    try:
        return fn()
    except typer.Exit:
        raise
    except (UnknownNameError, SettingsError) as e:
        if _State.debug:
            raise
        _fail(str(e), 2)
    except CzbError as e:
        if _State.debug:
            raise
        _fail(str(e), 1)
    except Exception as e:  # RecursionError, MemoryError, bugs: still no traceback for users
        if _State.debug:
            raise
        _fail(_internal_error(e), 1)


def _positive(value: float | None) -> float | None:
    """Callback of options that make no sense at or below 0 (sizes, durations)."""
    if value is not None and not value > 0:
        msg = f"must be greater than 0, got {value:g}"
        raise typer.BadParameter(msg)
    return value


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
            _console(stderr=True).print(f"[yellow]warning:[/] {_safe(message)}", soft_wrap=True)
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

        if kind is Kind.models:
            rows = [_model_table_row(row) for row in rows]
        table = Table(title=f"{len(rows)} {kind.value}")
        for column in rows[0] if rows else ["name"]:
            table.add_column(column, no_wrap=column == "name")
        for row in rows:
            table.add_row(*(_safe(_cell(v)) for v in row.values()))
        _console().print(table)

    _guarded(body)


def _model_table_row(row: dict) -> dict:
    """A model's row for the terminal: short columns; ``--format json`` has everything."""
    resources = ["GPU" if row["gpu"] else "CPU"]
    if row["memory_gb"]:
        resources.append(f"{row['memory_gb']:g}G")
    if row["timeout_s"]:
        resources.append(f"{row['timeout_s'] / 3600:g}h")

    def short(items: list, n: int = 2) -> str:
        return ", ".join(map(str, items[:n])) + (f" +{len(items) - n}" if len(items) > n else "")

    return {
        "name": row["name"], "kind": row["kind"], "genes": row["gene_id_type"],
        "organisms": short(row["organisms"]), "dim": row["output_dim"],
        "resources": " ".join(resources), "variants": short(row["variants"], 1),
    }


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
            {"name": m.name, "kind": m.kind, "image": m.image or "in-process", "input": m.input,
             "gene_id_type": m.gene_id_type, "organisms": m.organisms or ["any"],
             "output_dim": m.output_dim, "gpu": m.resources.gpu, "memory_gb": m.resources.memory_gb,
             "shm_gb": m.resources.shm_gb, "timeout_s": m.resources.timeout_s,
             "variants": list(m.variants), "description": m.description}
            for m in sorted(catalog.models.values(), key=lambda m: (m.kind != "baseline", m.name))
        ]
    from czb.evaluation.registry import get_task

    rows = []
    for t in sorted(catalog.tasks.values(), key=lambda t: t.name):
        if t.includes:  # a suite: list what it runs
            members = [get_task(m.implementation).info for m in catalog.resolve("task", [t.name])]
            rows.append({"name": t.name, "implementation": "suite: " + ", ".join(t.includes),
                         "requires": sorted({r for i in members for r in i.requires}),
                         "metrics": list(dict.fromkeys(m for i in members for m in i.metrics)),
                         "parameters": {}, "description": t.description})
            continue
        impl = get_task(t.implementation)
        rows.append({"name": t.name, "implementation": t.implementation, "requires": list(impl.info.requires),
                     "metrics": list(impl.info.metrics), "parameters": t.parameters,
                     "description": t.description or impl.info.description})
    return rows


#: Largest seed: numpy's random generators take seeds below 2**32.
MAX_SEED = 2**32 - 1


def _parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds 0,1,2``: distinct integers from 0 to :data:`MAX_SEED`
    (a repeated seed would pass the same run off as a spread over seeds).

    Raises
    ------
    typer.BadParameter
        Naming what is wrong (bad usage: exit 2).
    """
    parts = text.replace(",", " ").split()
    if not parts:
        msg = "needs one or more seeds, e.g. 0,1,2"
        raise typer.BadParameter(msg)
    bad = [p for p in parts if not (p.isascii() and p.isdigit() and len(p) <= 10) or int(p) > MAX_SEED]
    if bad:
        shown = ", ".join(_one_line(p)[:40] for p in bad[:3])
        msg = f"seeds are integers from 0 to {MAX_SEED} separated by commas; not: {shown}"
        raise typer.BadParameter(msg)
    seeds = [int(p) for p in parts]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        msg = f"each seed once; repeated: {', '.join(map(str, repeated))}"
        raise typer.BadParameter(msg)
    return seeds


def _seeds_option(text: str) -> str:
    """Callback of ``--seeds``: refuse bad seeds before any work."""
    _parse_seeds(text)
    return text


def _gpus_option(text: str | None) -> str | None:
    """Callback of ``--gpus``: ``all``, ``none`` or a number (``0`` is ``none``)."""
    if text is None or text in ("all", "none") or (text.isascii() and text.isdigit() and len(text) <= 4):
        return "none" if text is not None and text.isdigit() and not text.strip("0") else text
    msg = f"GPUs are all, none or a number, got {_one_line(text)[:40]!r}"
    raise typer.BadParameter(msg)


@app.command()
def run(
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", help="Model name (repeatable).")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="Task name (repeatable, or 'all').")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", "-d", help="Dataset name (repeatable).")] = None,
    embedding: Annotated[
        Optional[Path], typer.Option(help="Your own embeddings: .npy, .npz, .parquet or .h5ad.")
    ] = None,
    embedding_key: Annotated[Optional[str], typer.Option(help="Array/obsm key inside --embedding.")] = None,
    seeds: Annotated[
        str, typer.Option(callback=_seeds_option, help="Seeds of stochastic steps, distinct, e.g. 0,1,2.")
    ] = "0,1,2",
    output_dir: Annotated[Optional[Path], typer.Option(help="Folder for result JSONs [default: CZB_OUTPUT_DIR].")] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also score the PCA baseline.")] = True,
    offline: Annotated[bool, typer.Option(help="Use only cached datasets.")] = False,
    n_jobs: Annotated[Optional[int], typer.Option(min=1, help="Worker processes [default: all cores].")] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Exact neighbour graph and silhouettes at any size (slow on atlases) [default: exact up to "
            "50k cells (graph) and 200k cells (silhouettes), approximate above, with the error recorded].",
        ),
    ] = False,
    gpus: Annotated[
        Optional[str],
        typer.Option(callback=_gpus_option,
                     help="GPUs for model containers: all, none or a number [default: from the model spec]."),
    ] = None,
    weights: Annotated[
        Optional[Path], typer.Option(help="Local weights folder, mounted at /weights instead of the staged copy.")
    ] = None,
    variant: Annotated[Optional[str], typer.Option(help="Weights variant [default: the model's default].")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Cells per forward pass in the container.")] = None,
    memory_gb: Annotated[
        Optional[float], typer.Option(callback=_positive, help="Container memory limit [default: from the model spec].")
    ] = None,
    shm_gb: Annotated[
        Optional[float], typer.Option(callback=_positive, help="Container shared memory (/dev/shm) size.")
    ] = None,
    timeout_s: Annotated[
        Optional[int], typer.Option(min=1, help="Kill a model container after this many seconds.")
    ] = None,
    cache: Annotated[
        bool, typer.Option("--cache/--no-cache", help="Reuse finished model runs (--no-cache runs the model again).")
    ] = True,
    fmt: OutputFormat = Format.table,
    config_dir: ConfigDirs = None,
) -> None:
    """Embed datasets with models (or read your embeddings) and score them on tasks."""

    def body():
        from czb.runner.run import run_benchmark
        from czb.settings import get_settings

        if not task or not dataset:
            _fail("give at least one --task and one --dataset", 2)
        if not model and embedding is None:
            _fail("nothing to score: give --model or --embedding", 2)
        from rich.text import Text

        from czb.runner.containers import RunOptions

        settings = get_settings()
        out = output_dir or settings.output_dir
        command = "czb " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        err = _console(stderr=True)
        options = RunOptions(
            variant=variant, weights_dir=weights, gpus=gpus, memory_gb=memory_gb,
            shm_gb=shm_gb, timeout_s=timeout_s, batch_size=batch_size, use_cache=cache,
            log=lambda line: err.print(Text(f"  | {_one_line(line)}", style="dim"), soft_wrap=True),
        )
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
                progress=lambda message: status.update(_safe(message)),
                raise_errors=_State.debug,
                model_options=options,
                exact=True if exact else None,
            )
        if fmt is Format.json:
            typer.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        else:
            _print_results(records)
            _print_hierarchy(records)
            err.print(f"results written to {_safe(out)}", soft_wrap=True)
        failed = [r for r in records if r.status == "failed"]
        # The table cell may be too narrow to read; each distinct failure gets its own line.
        for message in dict.fromkeys(f"{r.dataset.name}/{r.model.name}: {r.error}" for r in failed):
            err.print(f"[bold red]failed:[/] {_safe(message)}", soft_wrap=True, markup=True)
        if failed:
            raise typer.Exit(1)

    _guarded(body)


def _print_results(records) -> None:
    from rich.table import Table

    from czb.report.tables import metric_label
    from czb.runner.run import baseline_differences

    diffs = baseline_differences(records)
    table = Table(title="czb results (mean ± sd over seeds; Δ = model - pca; for perturbations, model - control_mean)")
    for column in ("dataset", "task", "model", "metric", "value", "Δ", "status"):
        numeric = column in ("value", "Δ")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column != "status")
    for r in records:
        if r.status != "ok":
            table.add_row(_safe(r.dataset.name), _safe(r.task.name), _safe(r.model.name), "", "", "",
                          _safe(f"{r.status}: {r.error}"))
            continue
        for m in r.metrics:
            label = _safe(metric_label(m.name, m.params))
            value = "n/a" if m.value is None else f"{m.value:.4f}"
            if m.value_std_dev is not None:
                value += f" ± {m.value_std_dev:.4f}"
            key = (r.dataset.name, r.task.name, m.name,
                   tuple(sorted((k, str(v)) for k, v in m.params.items())), r.model.name)
            d = diffs.get(key)
            table.add_row(_safe(r.dataset.name), _safe(r.task.name), _safe(r.model.name), label, value,
                          "" if d is None else f"{d:+.4f}", r.status)
    _console().print(table)


def _print_hierarchy(records) -> None:
    """Table 2 of Bendidi et al. (2024): best post-processing per model and metric."""
    from rich.table import Table

    from czb.runner.summary import hierarchy_grid

    models, grid = hierarchy_grid(records)
    if not grid:
        return
    table = Table(title="perturbation-analysis hierarchy (best post-processing per model; * best model)")
    table.add_column("dataset")
    table.add_column("metric")
    for model in models:
        table.add_column(_safe(model), justify="right")
    for row, cells, best in grid:
        values = []
        for cell, is_best in zip(cells, best):
            text = "" if cell is None else _safe(f"{cell.value:.3f} ({cell.postprocessing})")
            values.append(f"[bold]{text} *[/bold]" if is_best else text)
        table.add_row(_safe(row.dataset), _safe(row.label + ("" if row.higher_is_better else " ↓")), *values)
    _console().print(table)


class ReportFormat(str, Enum):
    html = "html"
    csv = "csv"
    md = "md"
    table = "table"


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="Result JSONs, or folders of them (searched recursively).")],
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="File to write [default: stdout; html needs a file].")
    ] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="html, csv, md, or table (terminal).")] = ReportFormat.html,
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="2-D UMAP maps of the embeddings (html).")] = True,
    map_cells: Annotated[int, typer.Option(min=10, help="Cells per 2-D map (a label-stratified sample).")] = 5000,
) -> None:
    """Merge result files into one report: an scIB-style table against the baseline,
    metric charts, embedding maps, failed runs and provenance."""

    def body():
        from czb.report.build import make_report
        from czb.report.exports import print_table
        from czb.report.tables import compare, read_results

        if fmt is ReportFormat.table:
            if output is not None:
                _fail("--format table prints to the terminal; write a file with --format md, csv or html", 2)
            print_table(compare([r for _, r in read_results(results)]), _console())
            return
        if fmt is ReportFormat.html and output is None:
            _fail("an HTML report needs --output FILE", 2)
        command = shlex.join(["czb", *sys.argv[1:]])
        text = make_report(results, output, fmt=fmt.value, command=command, max_map_cells=map_cells, maps=maps)
        if output is None:
            typer.echo(text, nl=False)
        else:
            _console(stderr=True).print(f"wrote {_safe(output)}", soft_wrap=True)

    _guarded(body)


class ExecutorName(str, Enum):
    local = "local"
    ray = "ray"


@app.command()
def bench(
    suite: Annotated[str, typer.Argument(help="A suite YAML file, or the name of a suite in the catalog.")],
    name: Annotated[Optional[str], typer.Option("--suite", help="Which suite of the file [default: its only one].")] = None,
    store: Annotated[
        Optional[str], typer.Option(help="Folder every worker shares for outputs [default: CZB_OUTPUT_DIR/SUITE].")
    ] = None,
    executor: Annotated[ExecutorName, typer.Option(help="local: processes here; ray: a Ray cluster.")] = ExecutorName.local,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address HOST:PORT (with --executor ray).")] = None,
    retries: Annotated[int, typer.Option(min=0, help="Further attempts of a failed unit before it is recorded as failed.")] = 2,
    n_jobs: Annotated[int, typer.Option(min=1, help="Threads per scoring job.")] = 1,
    cpus: Annotated[Optional[int], typer.Option(min=1, help="Local executor: cores to use [default: all].")] = None,
    memory_gb: Annotated[
        Optional[float], typer.Option(callback=_positive, help="Local executor: memory to fill [default: 90%].")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and show what would run; run nothing.")] = False,
    offline: Annotated[bool, typer.Option(help="Use only cached datasets.")] = False,
    config_dir: ConfigDirs = None,
) -> None:
    """Run a benchmark suite (models x datasets x tasks x seeds), resuming where it stopped.

    Every unit of work is keyed by its content; units already in the store are skipped,
    failed ones are retried a bounded number of times, then recorded as failed."""

    def body():
        from czb.bench.executors import make_executor
        from czb.bench.plan import plan_suite
        from czb.bench.run import done_units, run_suite
        from czb.bench.store import open_store
        from czb.runner.specs import Catalog
        from czb.settings import get_settings

        settings = get_settings()
        path = Path(suite)
        files = [path] if path.suffix in (".yaml", ".yml") or path.is_file() else []
        if files and not path.is_file():
            _fail(f"suite file {path} does not exist", 2)
        catalog = Catalog.load(config_dir or (), extra_files=files)
        if files:
            from czb.runner.specs import load_spec_file

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
            plan = plan_suite(catalog, suite_name, offline=offline or settings.offline)
            done = set.union(*done_units(plan, target))
            err.print(f"suite {_safe(suite_name)}: {len(plan.embeds)} embed and {len(plan.scores)} score units "
                      f"({len(done)} already done) for {len(plan.records)} results; store {_safe(target.url)}")
            if dry_run:
                for unit in [*plan.embeds.values(), *plan.scores.values()]:
                    state = "done" if unit.key in done else "todo"
                    typer.echo(f"{state}  {unit.key[:12]}  {_one_line(unit.label)}")
                return
            options = {"address": address} if executor is ExecutorName.ray else {"cpus": cpus, "memory_gb": memory_gb}
            outcome = run_suite(plan, target, make_executor(executor.value, **options), retries=retries,
                                n_jobs=n_jobs, offline=offline or settings.offline,
                                command=shlex.join(["czb", *sys.argv[1:]]),
                                progress=lambda p: status.update(p.line()))
        again = f" ({outcome.retried} after a retry)" if outcome.retried else ""
        err.print(f"{outcome.ran} units ran{again}, {outcome.cached} were done before; "
                  f"results in {target.url}/results")
        for label, reason in {**outcome.failed, **outcome.blocked}.values():
            err.print(f"[bold red]failed:[/] {_safe(f'{label}: {reason}')}", soft_wrap=True, markup=True)
        if not outcome.complete:
            raise typer.Exit(1)

    _guarded(body)


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
                _console(stderr=True).print(_safe(f"{spec.name}: nothing to fetch ({spec.uri})"), soft_wrap=True)
                continue
            path = fetch(spec.uri, sha256=spec.sha256, progress=True)
            _console().print(_safe(f"{spec.name}: {path}"), soft_wrap=True)

    _guarded(body)


@models_app.command("build")
def models_build(
    name: Annotated[str, typer.Argument(help="A docker model, e.g. scvi.")],
    base_image: Annotated[
        Optional[str], typer.Option(help="BASE_IMAGE build argument (a CUDA runtime for GPUs; a local base offline).")
    ] = None,
    torch: Annotated[Optional[str], typer.Option(help="TORCH_SPEC build argument, e.g. torch==2.13.0.")] = None,
    find_links: Annotated[
        Optional[Path], typer.Option(help="Folder of local wheels copied into the build [default: PIP_FIND_LINKS].")
    ] = None,
    tag: Annotated[Optional[str], typer.Option(help="Image tag [default: the spec's image].")] = None,
    config_dir: ConfigDirs = None,
) -> None:
    """Build a model's image from its container folder (Dockerfile + entrypoint)."""

    def body():
        from rich.text import Text

        from czb.runner.containers import build_model_image

        spec = _catalog(config_dir).model(name)
        if spec.kind != "docker":
            _fail(f"{name} is a {spec.kind} model; only docker models have images", 2)
        err = _console(stderr=True)
        image = build_model_image(
            spec, base_image=base_image, torch_spec=torch, find_links=find_links, tag=tag,
            log=lambda line: err.print(Text(f"  | {_one_line(line)}", style="dim"), soft_wrap=True),
        )
        _console().print(_safe(f"{name}: built {image.tag} ({image.id})"), soft_wrap=True)

    _guarded(body)


@models_app.command("fetch-weights")
def models_fetch_weights(
    names: Annotated[list[str], typer.Argument(help="Docker models, or 'all'.")],
    variant: Annotated[Optional[str], typer.Option(help="Weights variant [default: the model's default].")] = None,
    all_variants: Annotated[bool, typer.Option("--all-variants", help="Stage every variant.")] = False,
    config_dir: ConfigDirs = None,
) -> None:
    """Stage published weights into the cache (containers have no network)."""

    def body():
        from czb.runner.weights import stage_weights

        for spec in _catalog(config_dir).resolve("model", names):
            if spec.kind != "docker":
                continue
            chosen = list(spec.variants) if all_variants else [variant]
            for v in chosen:
                staged = stage_weights(spec, v, progress=True)
                where = staged.path or "no weights needed"
                licence = f" (licence: {staged.license})" if staged.license else ""
                _console().print(_safe(f"{spec.name}/{staged.variant}: {where}{licence}"), soft_wrap=True)

    _guarded(body)


def main() -> None:
    """Console-script entry point."""
    app()
