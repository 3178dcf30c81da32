"""``czb report``: merge result files into an HTML, CSV or Markdown report, or a terminal table."""

from __future__ import annotations

import shlex
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from czb.cli.common import DebugOption, _console, _fail, _guarded, _safe


class ReportFormat(str, Enum):
    html = "html"
    csv = "csv"
    md = "md"
    table = "table"



def report(
    results: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Result JSONs, folders of them (searched recursively) or czb stores "
                       "[default: CZB_OUTPUT_DIR, where czb run writes: ./czb-results]."),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="File to write [default: stdout; html needs a file].")
    ] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", help="html, csv, md, or table (terminal).")] = ReportFormat.html,
    maps: Annotated[bool, typer.Option("--maps/--no-maps", help="2-D UMAP maps of the embeddings (html).")] = True,
    map_cells: Annotated[int, typer.Option(min=10, help="Cells per 2-D map (a label-stratified sample).")] = 5000,
    debug: DebugOption = False,
) -> None:
    """Merge result files into one report: an scIB-style table against the baseline,
    metric charts, embedding maps, failed runs and provenance."""

    def body():
        from czb.core.settings import get_settings
        from czb.report.build import make_report
        paths = results or [get_settings().output_dir]
        from czb.report.exports import print_table
        from czb.report.tables import compare, read_results

        if fmt is ReportFormat.table:
            if output is not None:
                _fail("--format table prints to the terminal; write a file with --format md, csv or html", 2)
            print_table(compare([r for _, r in read_results(paths)]), _console())
            return
        if fmt is ReportFormat.html and output is None:
            _fail("an HTML report needs --output FILE", 2)
        command = shlex.join(["czb", *sys.argv[1:]])
        text = make_report(paths, output, fmt=fmt.value, command=command, max_map_cells=map_cells, maps=maps)
        if output is None:
            typer.echo(text, nl=False)
        else:
            _console(stderr=True).print(f"wrote {_safe(output)}", soft_wrap=True)

    _guarded(body)
