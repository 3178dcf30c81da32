"""``czb list``: the datasets, models or tasks of the catalog, as a table or JSON."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from czb.cli.common import ConfigDirs, Format, OutputFormat, _catalog, _console, _guarded, _safe


class Kind(str, Enum):
    datasets = "datasets"
    models = "models"
    tasks = "tasks"



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
             "variants": list(m.variants), "description": m.description,
             "parameters": {k: v.model_dump(exclude_none=True) for k, v in m.parameters.items()}}
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
