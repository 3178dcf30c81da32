"""The ``czb`` command line: a thin Typer layer over :mod:`czb.pipeline` and :mod:`czb.evaluation`.

This module builds the app from one module per command (:mod:`czb.cli.list`,
:mod:`czb.cli.run`, :mod:`czb.cli.report`, :mod:`czb.cli.bench`, :mod:`czb.cli.datasets`,
:mod:`czb.cli.models`); :func:`czb.cli.common._guarded` is the only place that turns
exceptions into exit codes. Heavy modules are imported inside commands so
``czb --version`` stays instant.
"""

from __future__ import annotations

from typing import Annotated

import typer

import czb
from czb.cli import bench, datasets, models, report, run
from czb.cli import list as listing  # `list` alone would read as the builtin
from czb.cli.common import _route_warnings, _State

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
models_app = typer.Typer(help="Build model images, stage their weights and pin their sha256s.",
                         no_args_is_help=True,
                         rich_markup_mode=None)
app.add_typer(models_app, name="models")


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


app.command("list")(listing.list_)
app.command()(run.run)
app.command()(report.report)
app.command()(bench.bench)
datasets_app.command("fetch")(datasets.datasets_fetch)
models_app.command("build")(models.models_build)
models_app.command("fetch-weights")(models.models_fetch_weights)
models_app.command("pin")(models.models_pin)


def main() -> None:
    """Console-script entry point."""
    app()
