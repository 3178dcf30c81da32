"""Model weights, staged on the host before a container runs (containers have no network).

``czb models fetch-weights MODEL [--variant V]`` downloads each published file of the
variant (:class:`~czb.specs.schema.WeightFile`) through the dataset cache, verifies its
sha256 when the spec gives one, and lays the files out under
``<cache>/weights/<model>/<variant>/`` exactly as the container expects them at
``/weights``. A manifest beside that folder records the files, their licence, the
folder's checksum, which identifies the weights in cache keys and result files, and a
stamp of every entry (size, times, inode), so a staged folder changed afterwards is
noticed. ``--weights DIR`` uses a local copy instead.

A spec may name a local file (a path or ``file://``). The model's image reads whatever is
staged, and can write it into ``meta.json`` and so into results: a spec and an image
together could carry any file the user can read (``~/.ssh/id_rsa``) into a result. So a
local source must be a regular file that anyone on the machine may read (mode ``o+r``),
and it is copied (never linked: the user's file keeps its mode, and editing it later does
not change what is staged); its sha256 is checked on the copy.

Archives (``extract: true``) are unpacked by :mod:`czb.models.archives`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czb.core.errors import EmbeddingError, FetchError, SpecError
from czb.models.archives import extract_archive
from czb.models.workdirs import TAG_PATTERN, process_tag, remove_tree, stale_folders
from czb.specs.names import NAME_RULE, is_valid_name
from czb.specs.schema import ModelSpec


@dataclass(frozen=True)
class StagedWeights:
    """Weights ready to mount at ``/weights``.

    Attributes
    ----------
    path
        The folder, or ``None`` for a model that needs no weights.
    checksum
        :func:`directory_checksum` of the folder (``None`` without weights).
    variant
        The variant name.
    license
        The variant's licence as the spec declares it.
    """

    path: Path | None
    checksum: str | None
    variant: str
    license: str = ""


def directory_checksum(path: Path) -> str | None:
    """sha256 over the relative paths and contents of every file under ``path``.

    The same digest as ``czb_container.weights_checksum`` inside an image, so the host's
    record and the container's ``meta.json`` can be compared. ``None`` for an empty folder.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from czb.core.settings import get_settings

        cache_dir = get_settings().cache_dir
    return Path(cache_dir)


def staged_path(spec: ModelSpec, variant: str, *, cache_dir: Path | None = None) -> Path:
    """Where the weights of ``spec``'s ``variant`` are (or would be) staged.

    Raises
    ------
    SpecError
        The model or variant name is not a valid name, or the folder would not be
        ``<cache>/weights/<model>/<variant>`` once resolved (names are checked when
        specs are loaded; this guards specs built some other way).
    """
    for what, name in (("model", spec.name), ("weights variant", variant)):
        if not is_valid_name(name):
            msg = f"{what} name {name!r:.60} cannot name a folder ({NAME_RULE})"
            raise SpecError(msg)
    root = _cache_dir(cache_dir) / "weights"
    folder = root / spec.name / variant
    if folder.resolve().parent.parent != root.resolve():
        msg = f"weights folder {folder} is not inside {root} once resolved"
        raise SpecError(msg)
    return folder


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves to somewhere strictly under ``root`` (resolved too)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    return resolved != base and base in resolved.parents


def _require_inside(path: Path, root: Path, what: str) -> None:
    if not _inside(path, root):
        msg = f"refusing to touch {what} {path}: it is not inside {root} once resolved"
        raise SpecError(msg)


def _manifest_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".json")


def stage_weights(
    spec: ModelSpec,
    variant: str | None = None,
    *,
    cache_dir: Path | None = None,
    offline: bool | None = None,
    progress: bool = False,
) -> StagedWeights:
    """Download and lay out the weights of a model variant; a no-op when already staged.

    Returns
    -------
    The staged weights.

    Raises
    ------
    FetchError
        A file cannot be downloaded or fails its checksum.
    EmbeddingError
        An archive is corrupt or tries to write outside its folder.
    """
    from czb.io.fetch import fetch, is_remote

    name, chosen = spec.variant(variant)
    if not chosen.weights:
        return StagedWeights(None, None, name, chosen.license)
    folder = staged_path(spec, name, cache_dir=cache_dir)
    root = _cache_dir(cache_dir) / "weights"
    manifest = _read_manifest(folder)
    if manifest is not None and _still_staged(folder, manifest, root=root):
        return StagedWeights(folder, manifest["checksum"], name, chosen.license)
    # Not staged yet, or changed since: stage again (the old folder is replaced).

    folder.parent.mkdir(parents=True, exist_ok=True)
    _require_inside(folder.parent, root, "weights folder")
    _remove_stale_staging(folder.parent, name)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_staging_prefix(name)))
    try:
        files = []
        for item in chosen.weights:
            target = staging / item.path
            _require_inside(target, staging, f"weights file {item.path!r:.60} of")
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_remote(item.uri):
                # A download: czb's own file in its cache, checked against sha256 by fetch.
                local = Path(fetch(item.uri, sha256=item.sha256, cache_dir=cache_dir, offline=offline,
                                   progress=progress))
                if item.extract:
                    extract_archive(local, target)
                else:
                    _link_or_copy(local, target)
            else:
                source = Path(fetch(item.uri, cache_dir=cache_dir, offline=offline))  # resolves file://
                if item.extract:
                    # Unpacked from czb's own copy: what was checked is what is unpacked.
                    archive = staging / f".archive-{len(files)}"
                    _copy_local_source(source, archive, sha256=item.sha256, model=spec.name, variant=name)
                    extract_archive(archive, target, shown=source)
                    archive.unlink()
                else:
                    _copy_local_source(source, target, sha256=item.sha256, model=spec.name, variant=name)
            files.append({"uri": item.uri, "path": item.path, "sha256": item.sha256, "extract": item.extract})
        checksum = directory_checksum(staging)
        _make_readable(staging)  # containers read it as a non-root user
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.exists():
            _require_inside(folder, root, "weights folder")
            _manifest_path(folder).unlink(missing_ok=True)  # never a manifest without its folder
            remove_tree(folder)  # an unfinished or changed earlier staging
        staging.rename(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_tree(staging)
        raise
    _write_manifest(folder, {
        "model": spec.name,
        "variant": name,
        "license": chosen.license,
        "files": files,
        "checksum": checksum,
        "stamps": _stamps(folder),
    }, root=root)
    return StagedWeights(folder, checksum, name, chosen.license)


def _copy_local_source(source: Path, target: Path, *, sha256: str | None, model: str, variant: str) -> None:
    """Copy the local weights file ``source`` to the new file ``target``, checking it first.

    It must be a regular file (not a folder, device, FIFO or socket; opened without
    blocking and checked on the descriptor) that others may read, and must not change
    size while it is copied (a ``/proc`` file, or one still being written). Its sha256,
    when the spec gives one, is checked on the bytes copied.

    Raises
    ------
    FetchError
        One line naming the file and what is wrong with it; its content is never read
        unless it may be staged.
    """
    shown = f"weights of {model} (variant {variant}): {source}"
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        msg = f"{shown}: cannot open ({e.strerror or type(e).__name__})"
        raise FetchError(msg) from None
    digest = hashlib.sha256()
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            msg = f"{shown} is a folder; weights are files (an archive with extract: true for a folder)"
            raise FetchError(msg)
        if not stat.S_ISREG(info.st_mode):
            msg = f"{shown} is not a regular file (a device, pipe or socket)"
            raise FetchError(msg)
        if not info.st_mode & stat.S_IROTH:
            msg = (f"{shown}: the file is private (mode {stat.S_IMODE(info.st_mode):04o}); czb hands weights to "
                   "the model's image, so it only stages files anyone on the machine may read; "
                   "copy it somewhere readable if you mean to")
            raise FetchError(msg)
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        copied = 0
        with os.fdopen(out, "wb") as f:
            while chunk := os.read(fd, 1 << 22):
                copied += len(chunk)
                if copied > info.st_size:
                    break
                f.write(chunk)
                digest.update(chunk)
        if copied != info.st_size:
            msg = (f"{shown} changed size while it was copied (a file still being written, or one "
                   "of /proc or /sys, which holds no weights); weights are staged from regular files only")
            raise FetchError(msg)
    except OSError as e:
        msg = f"{shown}: cannot copy ({e.strerror or type(e).__name__})"
        raise FetchError(msg) from None
    finally:
        os.close(fd)
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        msg = (f"{source}: sha256 mismatch: expected {sha256.lower()}, got {actual}; the file changed "
               "since the spec was written: restore it, or update the spec's sha256 if the change is intended")
        raise FetchError(msg)


def _stamps(folder: Path) -> dict[str, list[int]]:
    """``{relative path: [mode, size, mtime, ctime, inode]}`` of every entry under ``folder``
    (links not followed, walked without recursion): what tells that a staged folder was
    changed (a file edited, added or removed) without reading it. The ctime matters:
    setting size and mtime back after an edit is easy, setting the ctime back is not."""
    stamps: dict[str, list[int]] = {}
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(folder, relative) if relative else folder) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                info = entry.stat(follow_symlinks=False)
                stamps[name] = [info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
                if stat.S_ISDIR(info.st_mode):
                    pending.append(name)
    return stamps


def _still_staged(folder: Path, manifest: dict[str, Any], *, root: Path) -> bool:
    """Whether ``folder`` still holds the weights its manifest records.

    The stamps decide when they match (nothing changed); otherwise (a change, or a
    manifest of an older czb without stamps) the checksum is computed again, and the
    stamps are refreshed when the content is the same after all.
    """
    try:
        if manifest.get("stamps") == _stamps(folder):
            return True
        if directory_checksum(folder) != manifest["checksum"]:
            return False
        with contextlib.suppress(OSError, SpecError):
            _write_manifest(folder, {**manifest, "stamps": _stamps(folder)}, root=root)
    except OSError:
        return False
    return True


def _staging_prefix(variant: str) -> str:
    """``.<variant>-staging-<pid>@<host>-``: a later run can tell whether its process is gone."""
    return f".{variant}-staging-{process_tag()}-"


def _remove_stale_staging(parent: Path, variant: str) -> None:
    """Remove the staging folders of ``variant`` left by a czb process that died mid-way
    (killed while unpacking): its process is gone on this host, or the folder is more
    than a day old (another host's, or an older czb's without a process tag)."""
    pattern = rf"\.{re.escape(variant)}-staging-(?:{TAG_PATTERN}-)?[A-Za-z0-9_]+"
    for entry in stale_folders(parent, pattern, age_clears_tagged=True):
        if _inside(entry, parent):
            with contextlib.suppress(OSError):
                remove_tree(entry)


def resolve_weights(
    spec: ModelSpec,
    variant: str | None = None,
    *,
    weights_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> StagedWeights:
    """The weights a run mounts: ``weights_dir`` if given, else the staged copy.

    Raises
    ------
    EmbeddingError
        ``weights_dir`` is not a folder, or the variant's weights are not staged yet
        (the message gives the command that stages them).
    """
    name, chosen = spec.variant(variant)
    if weights_dir is not None:
        weights_dir = Path(weights_dir).resolve()
        if not weights_dir.is_dir():
            msg = f"--weights {weights_dir}: not a folder"
            raise EmbeddingError(msg)
        return StagedWeights(weights_dir, directory_checksum(weights_dir), name, chosen.license)
    if not chosen.weights:
        return StagedWeights(None, None, name, chosen.license)
    folder = staged_path(spec, name, cache_dir=cache_dir)
    manifest = _read_manifest(folder)
    if manifest is None:
        msg = (
            f"weights of {spec.name} (variant {name}) are not staged; run "
            f"`czb models fetch-weights {spec.name} --variant {name}` or pass --weights DIR"
        )
        raise EmbeddingError(msg)
    if not _still_staged(folder, manifest, root=_cache_dir(cache_dir) / "weights"):
        msg = (
            f"the staged weights of {spec.name} (variant {name}) in {folder} changed since they were "
            f"staged (their checksum no longer matches); run `czb models fetch-weights {spec.name} "
            f"--variant {name}` to stage them again"
        )
        raise EmbeddingError(msg)
    return StagedWeights(folder, manifest["checksum"], name, chosen.license)


#: Largest manifest read (a stamp is about 100 bytes a staged file).
MAX_MANIFEST_BYTES = 1 << 28


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``; ``None`` when there is none or it cannot be read (the
    weights are then staged again)."""
    from czb.core import untrusted
    path = _manifest_path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        manifest = untrusted.parse_json(untrusted.read_bounded(path, MAX_MANIFEST_BYTES), max_depth=8)
    except (OSError, ValueError):  # UntrustedInputError is a ValueError
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("checksum"), str) else None


def _write_manifest(folder: Path, manifest: dict[str, Any], *, root: Path) -> None:
    path = _manifest_path(folder)
    _require_inside(path, root, "weights manifest")
    payload = json.dumps(manifest, indent=2, sort_keys=True).encode()
    # A fresh temporary file (never an existing name, which could be a planted symlink).
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else (path.stat().st_mode | 0o444) & 0o7777)


def _link_or_copy(source: Path, target: Path) -> None:
    """A download (czb's own file in its cache) is linked when it can be: weights are large."""
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)
