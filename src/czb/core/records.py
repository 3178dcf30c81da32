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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
)

from czb.core.errors import ResultsError
from czb.core.untrusted import UntrustedInputError, json_depth, parse_json, read_bounded

#: Bumped whenever a field changes meaning or is removed.
SCHEMA_VERSION = 1


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _finite_or_none(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


class BootstrapRecord(_Record):
    """Bootstrap 95% CI of a mean of per-cell values, over cells or donors."""

    ci95: list[float] = Field(min_length=2, max_length=2)
    over: Literal["cells", "donors"]
    n_units: int = Field(ge=2)
    n_resamples: int = Field(ge=1)

    @field_validator("ci95", mode="after")
    @classmethod
    def _finite_ci(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in v) or v[0] > v[1]:
            msg = "must be two finite numbers, low first"
            raise ValueError(msg)
        return v


class MetricRecord(_Record):
    """One metric; a value that is not finite (NaN, inf) is stored as ``null``."""

    name: str
    value: float | None
    value_std_dev: float | None = None
    values_raw: list[float | None] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    #: 95% confidence interval of a value estimated from sampled cells; ``None`` when exact.
    ci95: list[float] | None = None
    #: Bootstrap 95% CI over cells (or donors) of a deterministic per-cell mean; absent
    #: in records of an older czb (then the report does not test the value), and left
    #: out of the JSON when there is none, so such records read as before.
    bootstrap: BootstrapRecord | None = None

    @model_serializer(mode="wrap")
    def _without_absent_bootstrap(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("bootstrap", 0) is None:
            del data["bootstrap"]
        return data

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


#: Longest :func:`slug`: the four parts of a result file name stay well under the 255
#: bytes a file system allows in one name, whatever the names (up to 128 characters each).
MAX_SLUG = 60


def slug(text: str, max_length: int = MAX_SLUG) -> str:
    """``text`` as part of a file name: every run of characters unsafe in file names
    replaced by ``-``; a longer one cut to ``max_length`` characters, ending with a short
    hash of the whole ``text`` so that names cut alike stay apart."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "unnamed"
    if len(safe) <= max_length:
        return safe
    digest = hashlib.sha256(str(text).encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{safe[: max_length - len(digest) - 1].rstrip('-')}-{digest}"


def result_json(record: ResultRecord, *, name: str = "") -> str:
    """``record`` as the JSON text of a result file.

    Raises
    ------
    ResultsError
        It nests deeper than readers accept, or holds a value JSON cannot represent
        (what czb writes, czb must be able to read back).
    """
    name = name or "__".join((record.dataset.name, record.model.name, record.task.name))
    data = record.model_dump(mode="json")
    if json_depth(data) > MAX_RESULT_DEPTH:
        msg = f"result {name} nests more than {MAX_RESULT_DEPTH} levels deep; it would not be readable"
        raise ResultsError(msg)
    try:
        return json.dumps(data, indent=2, allow_nan=False)
    except ValueError as e:
        msg = f"result {name} holds a value JSON cannot represent: {e}"
        raise ResultsError(msg) from e


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
    stamp = slug(record.created_at.replace(":", "").replace("+0000", "Z").replace("+00:00", "Z"), 32)
    stem = "__".join(slug(s) for s in (record.dataset.name, record.model.name, record.task.name)) + "__" + stamp
    payload = result_json(record, name=stem)
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

    from czb.core.sampling import stratified_rows  # imports pandas

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


def write_embedding_sample(values: Any, output_dir: Path, **what: Any) -> str | None:
    """Write :func:`embedding_sample` under ``output_dir``, atomically.

    The sample only serves report maps: one that cannot be written (``embeddings`` is
    a file, the disk is full) is an :class:`~czb.core.errors.EmbeddingWarning`, not the loss
    of the scores it belongs to.

    Returns
    -------
    The file's path relative to ``output_dir`` (what :attr:`ResultRecord.embedding_sample`
    holds), or ``None`` when it could not be written.
    """
    import warnings

    from czb.core.errors import EmbeddingWarning

    relative, payload = embedding_sample(values, **what)
    try:
        write_atomically(Path(output_dir) / relative, payload, what="embedding sample")
    except ResultsError as e:
        warnings.warn(f"{e}; reports will have no map of it", EmbeddingWarning, stacklevel=2)
        return None
    return relative


def write_atomically(path: Path, payload: bytes, *, what: str = "file", mode: int | None = None) -> None:
    """Write czb's own file ``path`` (in a folder czb writes: results, samples, a store)
    through a temporary file in the same folder renamed over it, so readers see the old
    file or the new one, never a part. Missing folders are created. Whatever entry has
    the name is replaced, never written through (a symlink planted there cannot send
    the write elsewhere). The file gets ``mode``, by default as readable as the umask
    allows (not mkstemp's 0600).

    A path the user named is written with :func:`write_output`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        msg = f"cannot create folder {path.parent} for {what} {path.name}: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from e
    with _staged(path.parent, path.suffix, f"{what} {path}") as (fd, tmp):
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        if mode is None:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)


def write_output(path: Path, payload: bytes, *, what: str = "file") -> None:
    """Write ``payload`` to a path the user named (``czb report -o``) as a shell
    redirection would, but whole or not at all.

    - A character device or FIFO, also behind a symlink (``/dev/stdout``, ``/dev/null``,
      a named pipe): opened and written, never replaced (a device node is never turned
      into a file).
    - A symlink to a regular file (or to nothing yet): its target is replaced
      atomically; the link stays.
    - A regular file or nothing: written atomically (:func:`write_atomically`),
      keeping an existing file's permissions.

    Raises
    ------
    ResultsError
        One line naming the path: a folder, a block device or socket, a file that is
        not writable, or a folder that does not exist (none is created).
    """
    import stat

    path = Path(path)
    try:
        info = os.stat(path)  # follows links: what the path leads to
    except FileNotFoundError:
        info = None
    except OSError as e:
        msg = f"cannot write {what} {path}: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from None
    if info is not None:
        kind = info.st_mode
        if stat.S_ISCHR(kind) or stat.S_ISFIFO(kind):
            _write_stream(path, payload, what)
            return
        if stat.S_ISDIR(kind):
            msg = f"cannot write {what} {path}: it is a folder"
            raise ResultsError(msg)
        if not stat.S_ISREG(kind):
            msg = f"cannot write {what} {path}: it is a {'block device' if stat.S_ISBLK(kind) else 'socket'}"
            raise ResultsError(msg)
        if not os.access(path, os.W_OK):
            msg = f"cannot write {what} {path}: the file is not writable"
            raise ResultsError(msg)
    if info is not None and _through_proc(path):
        # An open file (/dev/stdout redirected to a file, /proc/self/fd/N): write through
        # the descriptor's file at its end, as the shell's ">" or ">>" expects.
        _write_stream(path, payload, what, append=True)
        return
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    folder = target.parent
    if not folder.is_dir():
        msg = f"cannot write {what} {path}: folder {folder} does not exist"
        raise ResultsError(msg)
    write_atomically(target, payload, what=what, mode=None if info is None else stat.S_IMODE(info.st_mode))


def _through_proc(path: Path) -> bool:
    """Whether ``path`` is, or its chain of symlinks passes, a ``/proc`` file (the magic
    links of open descriptors, which ``/dev/stdout`` and ``/dev/fd/N`` point to)."""
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a chain of links
        # Folders resolved (/dev/fd is a link to /proc/self/fd), the last part as it is.
        current = os.path.join(os.path.realpath(os.path.dirname(current)), os.path.basename(current))
        if current == "/proc" or current.startswith("/proc/"):
            return True
        if not os.path.islink(current):
            return False
        current = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
    return False


def _write_stream(path: Path, payload: bytes, what: str, *, append: bool = False) -> None:
    """Write ``payload`` into the device, FIFO or open file ``path`` leads to, in place
    (a FIFO waits for its reader, as a shell redirection does)."""
    flags = os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if append else 0
    try:
        fd = os.open(path, flags)
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
    except OSError as e:
        msg = f"cannot write {what} to {path}: {e.strerror or type(e).__name__}"
        raise ResultsError(msg) from None


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
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        shown = f"schema {version}" if version < 10**6 else "a newer schema"
        msg = f"{path}: written by a newer czb ({shown}); this czb reads schema {SCHEMA_VERSION}"
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
