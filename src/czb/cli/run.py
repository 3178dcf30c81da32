"""``czb run``: embed datasets with models (or read given embeddings), score them on
tasks, and print the results and the perturbation-analysis hierarchy."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from czb.cli.common import (
    ConfigDirs,
    DebugOption,
    Format,
    OutputFormat,
    _catalog,
    _console,
    _fail,
    _gpus_option,
    _guarded,
    _one_line,
    _parse_seeds,
    _positive,
    _safe,
    _seeds_option,
    _State,
)


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
    output_dir: Annotated[
        Optional[Path],
        typer.Option(help="Store for units and results/ (shared with czb bench --store) "
                     "[default: CZB_OUTPUT_DIR, else ./czb-results]."),
    ] = None,
    baseline: Annotated[bool, typer.Option("--baseline/--no-baseline", help="Also score the PCA baseline.")] = True,
    offline: Annotated[bool, typer.Option(help="Use only cached datasets.")] = False,
    n_jobs: Annotated[Optional[int], typer.Option(min=1, help="Worker processes [default: all cores].")] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="Exact neighbour graph and silhouettes at any size (slow on atlases) [default: exact up to "
            "50k cells (graph) and 100k cells (silhouettes), approximate above, with the error recorded].",
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
    param: Annotated[
        Optional[list[str]],
        typer.Option("--param", metavar="NAME=VALUE", callback=_params_option,
                     help="Set a parameter the docker models' specs declare (repeatable)."),
    ] = None,
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
        bool, typer.Option("--cache/--no-cache", help="Reuse finished work (--no-cache runs models and tasks again).")
    ] = True,
    fmt: OutputFormat = Format.table,
    wide: Annotated[
        bool, typer.Option("--wide", help="Print every metric [default: each task's headline metric].")
    ] = False,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Embed datasets with models (or read your embeddings) and score them on tasks."""

    def body():
        from czb.core.settings import get_settings
        from czb.pipeline.run import run_benchmark
        if not task or not dataset:
            _fail("give at least one --task and one --dataset", 2)
        if not model and embedding is None:
            _fail("nothing to score: give --model or --embedding", 2)
        from rich.text import Text

        from czb.models.docker.request import RunOptions

        settings = get_settings()
        out = output_dir or settings.output_dir
        command = "czb " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        err = _console(stderr=True)
        options = RunOptions(
            variant=variant, weights_dir=weights, gpus=gpus, memory_gb=memory_gb,
            shm_gb=shm_gb, timeout_s=timeout_s, batch_size=batch_size, parameters=_parse_params(param),
            use_cache=cache,
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
            from czb.cli.tables import print_hierarchy, print_results

            print_results(records, wide=wide)
            print_hierarchy(records)
            err.print(f"results written to {_safe(Path(out) / 'results')}", soft_wrap=True)
        failed = [r for r in records if r.status == "failed"]
        # Each distinct failure gets its own line on stderr too, where scripts read errors.
        for message in dict.fromkeys(f"{r.dataset.name}/{r.model.name}: {r.error}" for r in failed):
            err.print(f"[bold red]failed:[/] {_safe(message)}", soft_wrap=True, markup=True)
        if failed:
            raise typer.Exit(1)

    _guarded(body)


def _params_option(values: list[str] | None) -> list[str] | None:
    """Callback of ``--param``: refuse malformed ``NAME=VALUE`` items before any work."""
    _parse_params(values)
    return values


def _parse_params(values: list[str] | None) -> dict[str, str]:
    """``--param NAME=VALUE`` as ``{NAME: VALUE}``; each value is checked against the
    model spec's declaration when the run starts (before any dataset is read).

    Raises
    ------
    typer.BadParameter
        A value without ``=`` or a name given twice (bad usage: exit 2).
    """
    out: dict[str, str] = {}
    for item in values or []:
        name, equals, value = item.partition("=")
        name = name.strip()
        if not equals or not name:
            msg = f"takes NAME=VALUE, got {_one_line(item)[:60]!r}"
            raise typer.BadParameter(msg)
        if name in out:
            msg = f"{name} is given twice"
            raise typer.BadParameter(msg)
        out[name] = value
    return out
