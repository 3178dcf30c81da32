"""Tasks over several datasets (cross-species): the members' embeddings and roles stacked
into one, and the group's dataset and model records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from czb.core import records as R
from czb.models.embedding import Embedding
from czb.pipeline.scoring import Embedded


@dataclass
class GroupMember:
    """What a task over several datasets keeps of one member: its record, its embedding
    and its roles (the AnnData itself is released)."""

    record: R.DatasetRecord
    embedded: Embedded
    roles: dict[str, np.ndarray]


def group_record(members: Sequence[R.DatasetRecord]) -> R.DatasetRecord:
    """The record of several datasets scored together: names joined with ``+``, totals, members."""
    return R.DatasetRecord(
        name="+".join(m.name for m in members),
        uri=" ".join(m.uri for m in members),
        sha256=None,
        n_cells=sum(m.n_cells for m in members),
        n_genes=sum(m.n_genes for m in members),
        members=list(members),
    )


def group_model(names: Sequence[str], models: Sequence[R.ModelRecord]) -> R.ModelRecord:
    """A model's record for a group: the first member's, with each member's info."""
    return models[0].model_copy(update={"info": {"members": {n: m.info for n, m in zip(names, models)}}}, deep=True)


def stack_members(members: Sequence[GroupMember]) -> tuple[R.DatasetRecord, Embedded, dict[str, np.ndarray]]:
    """The group of several datasets (cross-species) as one: its record, the members'
    embeddings stacked in member order, and their roles aligned with the rows.

    Roles: ``labels``, ``species``, ``dataset`` (member name), ``batch``
    (``member|batch``, when every member has batches) and each extra role every member
    has (``donor``, ``sample``, ``time_point``...; donor and sample IDs prefixed with the
    member name so IDs of different datasets never merge). When a member has no
    embedding, or the embeddings differ in dimension, the stacked :class:`Embedded` has
    none and says why (``failed`` or ``not_applicable``), and the roles are empty.
    """
    group = group_record([m.record for m in members])
    first = members[0].embedded
    model = group_model([m.record.name for m in members], [m.embedded.model for m in members])
    runtime = sum(m.embedded.runtime_s for m in members)
    problems = [m for m in members if m.embedded.embedding is None]
    if problems:
        status = "failed" if any(m.embedded.status == "failed" for m in problems) else "not_applicable"
        error = "; ".join(f"{m.record.name}: {m.embedded.error}" for m in problems)
        return group, Embedded(model, None, status, error, runtime), {}
    dims = {m.record.name: m.embedded.embedding.dim for m in members}
    if len(set(dims.values())) > 1:
        error = "embeddings differ in dimension across datasets: " + ", ".join(f"{k} {v}" for k, v in dims.items())
        return group, Embedded(model, None, "failed", error, runtime), {}

    values = np.concatenate([m.embedded.embedding.values for m in members])
    names = [np.full(len(m.roles["labels"]), m.record.name, dtype=object) for m in members]
    roles: dict[str, np.ndarray] = {
        "labels": np.concatenate([m.roles["labels"] for m in members]).astype(object),
        "species": np.concatenate([m.roles["species"] for m in members]).astype(object),
        "dataset": np.concatenate(names),
    }
    if all(m.roles.get("batch") is not None for m in members):
        roles["batch"] = np.concatenate([_prefixed(n, "|", m.roles["batch"]) for n, m in zip(names, members)])
    shared = set.intersection(*(set(m.roles) for m in members)) - set(roles) - {"batch"}
    for role in sorted(shared):
        parts = [m.roles[role] for m in members]
        if role in ("donor", "sample"):
            parts = [_prefixed(n, ":", p) for n, p in zip(names, parts)]
        roles[role] = np.concatenate(parts)
    stacked = Embedded(model, Embedding(values=values, model=first.model.name, kind="stacked"),
                       runtime_s=runtime)
    return group, stacked, roles


def _prefixed(names: np.ndarray, separator: str, values: np.ndarray) -> np.ndarray:
    """``name + separator + value`` per cell; a cell without a value keeps none (``None``)."""
    from czb.core.missing import missing_mask

    out = names + separator + np.asarray(values).astype(str).astype(object)
    out[missing_mask(values)] = None
    return out
