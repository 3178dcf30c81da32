"""``czb list``: the datasets, models or tasks of the catalog, as a table or JSON."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated

import typer

from czb.cli.common import (
    ConfigDirs,
    DebugOption,
    Format,
    OutputFormat,
    _catalog,
    _guarded,
)


class Kind(str, Enum):
    datasets = "datasets"
    models = "models"
    tasks = "tasks"



def list_(
    kind: Annotated[Kind, typer.Argument(help="What to list.")],
    fmt: OutputFormat = Format.table,
    wide: Annotated[
        bool,
        typer.Option("--wide", help="Every field --format json has (tasks' metrics and parameters...), each "
                     "dataset on its own row [default: main columns; a family of datasets on one row, e.g. "
                     "tsv2_{bladder, blood, ...}]."),
    ] = False,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """List the datasets, models or tasks czb knows."""

    def body():
        catalog = _catalog(config_dir)
        rows = _list_rows(catalog, kind)
        if fmt is Format.json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from czb.cli.tables import print_listing

        title, note, whole = f"{len(rows)} {kind.value}", "", ["name"]
        if wide:
            rows = [{k: _cell(v) for k, v in row.items()} for row in rows]
        elif kind is Kind.datasets:
            rows, note = _dataset_table_rows(rows)
            whole = []  # a family's row wraps within the name column
        elif kind is Kind.models:
            rows = [_model_table_row(row) for row in rows]
            note = SHA256_NOTE
        else:
            rows = [_task_table_row(row) for row in rows]
        print_listing(title, rows, whole=whole, note=note)

    _guarded(body)


#: Fewest datasets that share a row of ``czb list datasets`` as a family.
FAMILY_MIN = 3


def _families(rows: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """Datasets to list on one row: ``(prefix|suffix, part, members)`` for each first or
    last ``_``-separated part of names (``tsv2``, ``spermatogenesis``) shared by
    :data:`FAMILY_MIN` or more datasets that all have the same tags, label and batch keys
    (so the family row's columns hold for each); a dataset joins the largest family."""
    candidates: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        parts = row["name"].split("_")
        if len(parts) > 1:
            candidates.setdefault(("prefix", parts[0]), []).append(row)
            candidates.setdefault(("suffix", parts[-1]), []).append(row)
    taken: set[str] = set()
    families = []
    for (where, part), members in sorted(candidates.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        alike = {(tuple(m["tags"]), str(m["label_key"]), str(m["batch_key"])) for m in members}
        if len(members) >= FAMILY_MIN and len(alike) == 1 and not taken & {m["name"] for m in members}:
            taken.update(m["name"] for m in members)
            families.append((where, part, members))
    return families


def _dataset_table_rows(rows: list[dict]) -> tuple[list[dict], str]:
    """The rows of ``czb list datasets`` (name, organism, tags), each family on one row
    as ``tsv2_{bladder, blood, ...}``, and a note saying what the braces stand for."""
    families = _families(rows)
    in_family = {m["name"] for _, _, members in families for m in members}
    out = {row["name"]: {"name": row["name"], "organism": row["organism"], "tags": _cell(row["tags"])}
           for row in rows if row["name"] not in in_family}
    for where, part, members in families:
        stems = ", ".join(m["name"][len(part) + 1:] if where == "prefix" else m["name"][:-len(part) - 1]
                          for m in members)
        name = f"{part}_{{{stems}}}" if where == "prefix" else f"{{{stems}}}_{part}"
        organisms = sorted({m["organism"] for m in members})
        out[name] = {"name": name, "organism": ", ".join(organisms) if len(organisms) < 3
                     else f"{len(organisms)} organisms", "tags": _cell(members[0]["tags"])}
    note = ""
    if families:
        where, part, members = families[0]
        example = members[0]["name"]
        note = (f"{{a, b}} in a name stands for one dataset each, e.g. {example}; "
                "--wide lists every dataset with its description, --format json too.")
    return [out[k] for k in sorted(out, key=lambda k: k.strip("{").lower())], note


def _task_table_row(row: dict) -> dict:
    """A task's row for the terminal: what it needs and does; ``--wide`` has its metrics
    and parameters."""
    about = [row["description"] or "", "needs: " + (_cell(row["requires"]) or "nothing")]
    if row["implementation"].startswith("suite: "):
        about.append("runs: " + row["implementation"].removeprefix("suite: "))
    if row.get("cost"):
        about.append("cost: " + row["cost"])
    return {"name": row["name"], "about": about}


def _model_table_row(row: dict) -> dict:
    """A model's row for the terminal: short columns; ``--format json`` has everything."""
    resources = ["GPU" if row["gpu"] else "CPU"]
    if row["memory_gb"]:
        resources.append(f"{row['memory_gb']:g}G")
    if row["timeout_s"]:
        resources.append(f"{row['timeout_s'] / 3600:g}h")

    def short(items: list, n: int = 2) -> str:
        return ", ".join(map(str, items[:n])) + (f" +{len(items) - n}" if len(items) > n else "")

    variants = row["variants"]
    more = [f"+{len(variants) - 1}"] if len(variants) > 1 else []
    return {
        "name": row["name"],
        # An image czb's CI never builds (its build needs more than CI reaches) says so.
        "kind": row["kind"] if row["ci_built"] is not False else [row["kind"], "(not built in CI)"],
        "genes": row["gene_id_type"],
        "species": short(row["organisms"]), "dim": _cell(row["output_dim"]),
        "needs": " ".join(resources),  # a short header: the table fits 80 columns
        # The default variant, then how many more and their checksums' state (long names
        # would push the table past 80 columns on one line).
        "variants": [variants[0], " ".join(more + _sha256_cell(row["checksums"]))] if variants else "",
    }


#: What the line under a model's variants in ``czb list models`` says.
SHA256_NOTE = ("(published), (pinned) or (unverified) under variants: the sha256s of their weight files are in "
               "the spec, were pinned in this cache on first fetch (`czb models pin MODEL` writes them into a "
               "spec), or neither; --format json has each variant's.")


def _checksums(model) -> dict[str, str]:
    """Per variant of a docker model: ``published``, ``pinned``, ``unverified`` or ``no
    weights`` (:func:`czb.models.weight_specs.checksum_states`)."""
    if model.kind != "docker":
        return {}
    from czb.models.weight_specs import checksum_states

    return checksum_states(model)


def _sha256_cell(states: dict[str, str]) -> list[str]:
    """The line under a model's variants: ``(state)`` of all its variants with weights,
    else how many variants are in each state; none without weights."""
    counts: dict[str, int] = {}
    for state in states.values():
        if state != "no weights":
            counts[state] = counts.get(state, 0) + 1
    if not counts:
        return []
    if len(counts) == 1:
        return [f"({next(iter(counts))})"]
    return ["(" + ", ".join(f"{n} {state}" for state, n in counts.items()) + ")"]


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
            {"name": m.name, "kind": m.kind, "image": m.image or "in-process",
             "ci_built": m.ci_built if m.kind == "docker" else None, "input": m.input,
             "gene_id_type": m.gene_id_type, "organisms": m.organisms or ["any"],
             "output_dim": m.output_dim, "gpu": m.resources.gpu, "memory_gb": m.resources.memory_gb,
             "shm_gb": m.resources.shm_gb, "timeout_s": m.resources.timeout_s,
             "variants": list(m.variants), "checksums": _checksums(m), "description": m.description,
             "parameters": {k: v.model_dump(exclude_none=True) for k, v in m.parameters.items()}}
            for m in sorted(catalog.models.values(), key=lambda m: (m.kind != "baseline", m.name))
        ]
    from czb.evaluation.registry import METRICS, get_task

    def references(metrics: list[str]) -> dict[str, str]:  # each metric's definition followed
        return {m: METRICS[m].reference for m in metrics if m in METRICS}

    rows = []
    for t in sorted(catalog.tasks.values(), key=lambda t: t.name):
        if t.includes:  # a suite: list what it runs
            members = [get_task(m.implementation).info for m in catalog.resolve("task", [t.name])]
            rows.append({"name": t.name, "implementation": "suite: " + ", ".join(t.includes),
                         "requires": sorted({r for i in members for r in i.requires}),
                         "metrics": (metrics := list(dict.fromkeys(m for i in members for m in i.metrics))),
                         "references": references(metrics), "parameters": {}, "description": t.description,
                         "cost": "; ".join(f"{i.name}: {i.cost}" for i in members if i.cost)})
            continue
        impl = get_task(t.implementation)
        rows.append({"name": t.name, "implementation": t.implementation, "requires": list(impl.info.requires),
                     "metrics": list(impl.info.metrics), "references": references(list(impl.info.metrics)),
                     "parameters": t.parameters,
                     "description": t.description or impl.info.description, "cost": impl.info.cost})
    return rows
