"""Self-describing result files: one JSON per (model, dataset, task), written atomically."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from czb.errors import ResultsError
from czb.untrusted import UntrustedInputError, parse_json, read_bounded

#: Bumped whenever a field changes meaning or is removed.
SCHEMA_VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite_or_none(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


class MetricRecord(_Record):
    """One metric; a value that is not finite (NaN, inf) is stored as ``null``."""

    name: str
    value: float | None
    value_std_dev: float | None = None
    values_raw: list[float | None] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    #: 95% confidence interval of a value estimated from sampled cells; ``None`` when exact.
    ci95: list[float] | None = None

    @field_validator("value", "value_std_dev", mode="after")
    @classmethod
    def _finite_value(cls, v: float | None) -> float | None:
        return _finite_or_none(v)

    @field_validator("values_raw", mode="after")
    @classmethod
    def _finite_values(cls, values: list[float | None]) -> list[float | None]:
        return [_finite_or_none(v) for v in values]


class HostRecord(_Record):
    python: str
    platform: str
    n_threads: int


class DatasetRecord(_Record):
    """The dataset scored; for a task over several datasets (cross-species), their group:
    ``name`` joins the members' names with ``+``, ``n_cells``/``n_genes`` are totals and
    ``members`` lists each one."""

    name: str
    uri: str
    sha256: str | None
    n_cells: int
    n_genes: int
    members: list[DatasetRecord] = Field(default_factory=list)


class ModelRecord(_Record):
    name: str
    kind: str
    #: Docker image digest, or ``"in-process"`` for baselines and files.
    image_digest: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)


class TaskRecord(_Record):
    name: str
    implementation: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class ResultRecord(_Record):
    """Everything needed to trust, compare and reproduce one score."""

    schema_version: int = SCHEMA_VERSION
    czb_version: str
    created_at: str
    command: str
    host: HostRecord
    dataset: DatasetRecord
    model: ModelRecord
    task: TaskRecord
    seeds: list[int]
    status: Literal["ok", "failed", "not_applicable"]
    error: str | None = None
    metrics: list[MetricRecord] = Field(default_factory=list)
    #: Seconds spent scoring (the task) and producing the embedding.
    runtime_s: float = 0.0
    embedding_runtime_s: float = 0.0
    peak_memory_mb: float = 0.0
    #: How estimable intermediates were computed: ``neighbors`` (exact, or approximate
    #: with its measured recall) and silhouettes (exact, or sampled with a CI).
    computation: dict[str, Any] = Field(default_factory=dict)
    #: The scored embedding's sample for report maps (:func:`write_embedding_sample`),
    #: relative to the result file's folder; ``None`` when none was kept.
    embedding_sample: str | None = None

    def metric(self, name: str, **params: Any) -> MetricRecord | None:
        """The first metric called ``name`` whose params include ``params``."""
        for m in self.metrics:
            if m.name == name and all(m.params.get(k) == v for k, v in params.items()):
                return m
        return None


def host_record() -> HostRecord:
    return HostRecord(python=sys.version.split()[0], platform=platform.platform(), n_threads=os.cpu_count() or 1)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def slug(text: str) -> str:
    """``text`` with every run of characters unsafe in file names replaced by ``-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "unnamed"


def write_result(record: ResultRecord, output_dir: Path) -> Path:
    """Write ``record`` to ``output_dir`` atomically, never replacing an existing file.

    The name is ``{dataset}__{model}__{task}__{created_at}.json``; a name already
    taken gets ``-1``, ``-2``... The JSON goes to a temporary file first and is
    hard-linked into place, which fails rather than overwrites if the name exists.

    Returns
    -------
    The path written.
    """
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create output folder {output_dir}: {e.strerror}"
        raise ResultsError(msg) from e
    stamp = record.created_at.replace(":", "").replace("+0000", "Z").replace("+00:00", "Z")
    stem = "__".join(slug(s) for s in (record.dataset.name, record.model.name, record.task.name, stamp))
    try:
        payload = json.dumps(record.model_dump(mode="json"), indent=2, allow_nan=False)
    except ValueError as e:
        msg = f"result {stem} holds a value JSON cannot represent: {e}"
        raise ResultsError(msg) from e
    with _staged(output_dir, ".json", f"result to {output_dir}") as (fd, tmp):
        with os.fdopen(fd, "w") as f:
            f.write(payload + "\n")
            f.flush()
            os.fsync(f.fileno())
        for attempt in range(1000):
            path = output_dir / (f"{stem}.json" if attempt == 0 else f"{stem}-{attempt}.json")
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                continue
        msg = f"could not find a free file name for {stem} in {output_dir}"
        raise ResultsError(msg)


@contextmanager
def _staged(folder: Path, suffix: str, what: str):
    """A temporary file in ``folder``, as ``(fd, path)``, removed on exit (once linked or
    renamed into place, only its temporary name goes); an ``OSError`` becomes a
    :class:`ResultsError` saying it could not write ``what``."""
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
        yield fd, tmp
    except OSError as e:
        msg = f"cannot write {what}: {e.strerror}"
        raise ResultsError(msg) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


#: Cells of each embedding kept for report maps (stratified by label, rare labels whole).
MAP_SAMPLE_CELLS = 10_000


def embedding_sample(
    values: Any, *, dataset: str, model: str, labels: Any = None, batches: Any = None,
) -> tuple[str, bytes]:
    """A label-stratified sample of an embedding's rows for report maps, as an ``.npz``.

    Arrays ``X`` (float32), ``cells`` (row indices), and ``labels``/``batches`` (strings)
    when given.

    Returns
    -------
    Its relative path, ``embeddings/{dataset}__{model}__{digest}.npz`` (the digest is of
    the content, so the same embedding is kept once), and the file's bytes.
    """
    import hashlib
    import io

    import numpy as np

    from czb.evaluation.estimates import stratified_rows

    values = np.asarray(values)
    rows = stratified_rows(len(values), labels, MAP_SAMPLE_CELLS)
    arrays = {"X": values[rows].astype(np.float32), "cells": rows}
    for name, column in (("labels", labels), ("batches", batches)):
        if column is not None:
            arrays[name] = np.asarray(column)[rows].astype(str)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    digest = hashlib.sha256(arrays["X"].tobytes() + rows.tobytes()).hexdigest()[:12]
    relative = Path("embeddings") / f"{slug(dataset)}__{slug(model)}__{digest}.npz"
    return relative.as_posix(), buffer.getvalue()


def write_embedding_sample(values: Any, output_dir: Path, **what: Any) -> str:
    """Write :func:`embedding_sample` under ``output_dir``, atomically.

    Returns
    -------
    The file's path relative to ``output_dir`` (what :attr:`ResultRecord.embedding_sample` holds).
    """
    relative, payload = embedding_sample(values, **what)
    write_atomically(Path(output_dir) / relative, payload, what="embedding sample")
    return relative


def write_atomically(path: Path, payload: bytes, *, what: str = "file") -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder renamed
    over it, so readers see the old file or the new one, never a part; the file is
    readable as the umask allows (not mkstemp's 0600)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create folder {path.parent} for {what} {path.name}: {e.strerror}"
        raise ResultsError(msg) from e
    with _staged(path.parent, path.suffix, f"{what} {path}") as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)


#: Largest result JSON :func:`read_result` reads (records are kilobytes).
MAX_RESULT_BYTES = 16 << 20
#: Deepest nesting of lists and objects a result JSON may have (records need under 10).
MAX_RESULT_DEPTH = 64


def read_result(path: Path) -> ResultRecord:
    """Read and validate a result JSON; a corrupt or foreign file raises :class:`ResultsError`.

    Result files are untrusted input: only a regular file of at most
    :data:`MAX_RESULT_BYTES` is read, nesting deeper than :data:`MAX_RESULT_DEPTH` is
    refused, and no error message quotes the file's content.
    """
    problem = None
    try:
        data = parse_json(read_bounded(path, MAX_RESULT_BYTES), max_depth=MAX_RESULT_DEPTH)
    except OSError as e:
        problem = e.strerror or type(e).__name__
    except UntrustedInputError as e:
        problem = str(e)
    if problem is not None:
        msg = f"{path}: not a readable result JSON ({problem})"
        raise ResultsError(msg)
    try:
        return ResultRecord.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or p in _FIELD_NAMES)
        msg = f"{path}: not a czb result (schema {SCHEMA_VERSION}): {where + ': ' if where else ''}{first['msg']}"
        raise ResultsError(msg) from None


#: Field names of the records, the only keys of a result file an error message names.
_FIELD_NAMES = frozenset(
    name for cls in (ResultRecord, MetricRecord, HostRecord, DatasetRecord, ModelRecord, TaskRecord)
    for name in cls.model_fields
)
