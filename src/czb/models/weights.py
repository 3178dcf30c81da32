"""Model weights, staged on the host before a container runs (containers have no network).

``czb models fetch-weights MODEL [--variant V]`` downloads each published file of the
variant (:class:`~czb.specs.schema.WeightFile`) through the dataset cache, verifies its
sha256 when the spec gives one, and lays the files out under
``<cache>/weights/<model>/<variant>/`` exactly as the container expects them at
``/weights``. A manifest beside that folder (``<variant>.json``) records the files, their
licence, the folder's checksum, which identifies the weights in cache keys and result
files, a stamp of every entry (size, times, inode), so a staged folder changed afterwards
is noticed, and sha256s:

* each published file's own (``files[i].sha256``; for an archive, ``extract: true``, the
  archive's, which is what a spec's ``sha256`` names), with how it was checked
  (``verified_by``: ``spec``, ``pin`` or ``first fetch``);
* each file of the staged folder (``hashes``, relative path -> sha256; for an archive,
  every file unpacked from it). When the stamps of a staged folder change, the files
  whose stamps changed are hashed again and compared one by one: a file edited, added or
  removed is named (never its content); the folder is staged again by ``fetch-weights``
  and refused by a run.

Trust on first use (:mod:`czb.models.weight_pins`): a file whose spec gives no sha256 is
pinned on its first fetch, in ``<cache>/weights/.pins/<model>/<variant>.json`` (``uri`` ->
sha256; a dot folder no model name can take, so removing a staged folder, or a model's
whole folder, keeps the pins). Staging it again (after the staged folder was removed or
changed) must give the same bytes, or fails naming the file; ``--repin`` (``repin=True``)
accepts the file as it is published now. A spec's own sha256 always wins and is checked.
``czb models pin`` writes the sha256s into a model spec, and ``czb list models`` says per
variant whether its sha256s are published in the spec, pinned here, or neither
(:mod:`czb.models.weight_specs`).

``--weights DIR`` uses a local copy instead.

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
import os
import re
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czb.core.errors import EmbeddingError, EmbeddingWarning, FetchError, SpecError
from czb.io.cache import file_sha256
from czb.models.archives import extract_archive
from czb.models.weight_pins import (
    MAX_RECORD_BYTES,
    check_pin,
    inside,
    pin_files,
    pins_path,
    read_pins,
    require_inside,
    write_json,
)
from czb.models.workdirs import TAG_PATTERN, process_tag, remove_tree, stale_folders
from czb.specs.names import NAME_RULE, is_valid_name, shown
from czb.specs.schema import ModelSpec, WeightFile


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
    return _tree_digests(path)[0]


def _tree_files(path: Path) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file under ``path`` (links to files
    included), sorted: the files :func:`directory_checksum` covers, in its order."""
    path = Path(path)
    return [(p.relative_to(path).as_posix(), p) for p in sorted(p for p in path.rglob("*") if p.is_file())]


def _tree_digests(path: Path) -> tuple[str | None, dict[str, str]]:
    """:func:`directory_checksum` of ``path`` and the sha256 of each of its files, each
    file read once."""
    files = _tree_files(path)
    if not files:
        return None, {}
    digest, hashes = hashlib.sha256(), {}
    for relative, file in files:
        own = hashlib.sha256()
        digest.update(relative.encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
                own.update(chunk)
        digest.update(b"\0")
        hashes[relative] = own.hexdigest()
    return digest.hexdigest(), hashes


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


def _manifest_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".json")


def stage_weights(
    spec: ModelSpec,
    variant: str | None = None,
    *,
    cache_dir: Path | None = None,
    offline: bool | None = None,
    progress: bool = False,
    repin: bool = False,
) -> StagedWeights:
    """Download and lay out the weights of a model variant; a no-op when already staged.

    The staged folder is reused while it holds what its manifest records (files whose
    stamps changed are hashed again), the manifest names the files the spec names now
    (same ``uri``, ``path``, ``extract``, and the spec's sha256 where it gives one) and
    agrees with the pins. Otherwise the variant is staged again, with a warning naming
    what changed when a staged folder was there.

    Parameters
    ----------
    repin
        Stage again, and pin each file without a sha256 in the spec as it is published
        now (trust on first use, again); without it a file whose bytes differ from its
        pin is refused.

    Returns
    -------
    The staged weights.

    Raises
    ------
    FetchError
        A file cannot be downloaded, fails the spec's sha256, or differs from its pin
        (one line naming the file; the hint gives ``--repin``).
    EmbeddingError
        An archive is corrupt or tries to write outside its folder.
    """
    from czb.io.cache import known_sha256
    from czb.io.fetch import fetch, is_remote

    name, chosen = spec.variant(variant)
    if not chosen.weights:
        return StagedWeights(None, None, name, chosen.license)
    folder = staged_path(spec, name, cache_dir=cache_dir)
    root = _cache_dir(cache_dir) / "weights"
    pins_at = pins_file(spec, name, cache_dir=cache_dir)
    pins = {} if repin else read_pins(pins_at)  # --repin replaces them, even a damaged file
    manifest = read_manifest(folder)
    if manifest is not None and not repin:
        why = _why_not_reusable(folder, manifest, chosen.weights, pins, root=root)
        if why is None:
            manifest = read_manifest(folder) or manifest  # with the sha256s an older czb did not keep
            pin_files(pins_at, spec.name, name, manifest["files"], pins, root=root)
            return StagedWeights(folder, manifest["checksum"], name, chosen.license)
        warnings.warn(f"the staged weights of {spec.name} (variant {name}): {why}; staging them again",
                      EmbeddingWarning, stacklevel=2)
    # Not staged yet, or changed since: stage again (the old folder is replaced).

    folder.parent.mkdir(parents=True, exist_ok=True)
    require_inside(folder.parent, root, "weights folder")
    _remove_stale_staging(folder.parent, name)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_staging_prefix(name)))
    try:
        files = []
        for item in chosen.weights:
            target = staging / item.path
            require_inside(target, staging, f"weights file {item.path!r:.60} of")
            target.parent.mkdir(parents=True, exist_ok=True)
            if is_remote(item.uri):
                # A download: czb's own file in its cache, checked against sha256 by fetch.
                local = Path(fetch(item.uri, sha256=item.sha256, cache_dir=cache_dir, offline=offline,
                                   progress=progress))
                digest = known_sha256(local, cache_dir=cache_dir)  # recorded by fetch: not read again
                check_pin(spec.name, name, item, digest, pins.get(item.uri))
                if item.extract:
                    extract_archive(local, target)
                else:
                    _link_or_copy(local, target)
            else:
                source = Path(fetch(item.uri, cache_dir=cache_dir, offline=offline))  # resolves file://
                if item.extract:
                    # Unpacked from czb's own copy: what was checked is what is unpacked.
                    archive = staging / f".archive-{len(files)}"
                    digest = _copy_local_source(source, archive, sha256=item.sha256, model=spec.name,
                                                variant=name)
                    check_pin(spec.name, name, item, digest, pins.get(item.uri))
                    extract_archive(archive, target, shown=source)
                    archive.unlink()
                else:
                    digest = _copy_local_source(source, target, sha256=item.sha256, model=spec.name,
                                                variant=name)
                    check_pin(spec.name, name, item, digest, pins.get(item.uri))
            verified_by = ("spec" if item.sha256 else "repin" if repin
                           else "pin" if pins.get(item.uri) == digest else "first fetch")
            files.append({"uri": item.uri, "path": item.path, "sha256": digest, "extract": item.extract,
                          "verified_by": verified_by})
        checksum, hashes = _tree_digests(staging)
        _make_readable(staging)  # containers read it as a non-root user
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.exists():
            require_inside(folder, root, "weights folder")
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
        "hashes": hashes,
        "stamps": _stamps(folder),
    }, root=root)
    pin_files(pins_at, spec.name, name, files, pins, root=root)
    return StagedWeights(folder, checksum, name, chosen.license)


def _copy_local_source(source: Path, target: Path, *, sha256: str | None, model: str, variant: str) -> str:
    """Copy the local weights file ``source`` to the new file ``target``, checking it
    first; return the sha256 of what was copied.

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
    return actual


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


def _changed(folder: Path, manifest: dict[str, Any], *, root: Path) -> str | None:
    """What changed in ``folder`` since its manifest was written, or ``None``: one line
    naming the first file edited, added or removed (never its content).

    The stamps decide when they match (nothing changed). Otherwise each file whose stamp
    changed (and each link) is hashed again and compared with its recorded sha256; a
    manifest of an older czb without them is checked by the folder's checksum (once:
    each file's sha256 is recorded then). When the content is the same after all, the
    stamps (and missing sha256s) are recorded again.
    """
    try:
        stamps = _stamps(folder)
        hashes = manifest.get("hashes")
        if manifest.get("stamps") == stamps and isinstance(hashes, dict):
            return None
        if isinstance(hashes, dict):
            recorded = manifest.get("stamps") if isinstance(manifest.get("stamps"), dict) else {}
            files = _tree_files(folder)
            names = {relative for relative, _ in files}
            added = sorted(names - set(hashes))
            if added:
                return f"{shown(added[0])} was added"
            missing = sorted(set(hashes) - names)
            if missing:
                return f"{shown(missing[0])} is missing"
            for relative, path in files:
                if path.is_symlink() or recorded.get(relative) != stamps.get(relative):
                    if file_sha256(path) != hashes[relative]:
                        return f"{shown(relative)} no longer matches the sha256 recorded when it was staged"
            refreshed = {**manifest, "stamps": stamps}
        else:
            checksum, hashes = _tree_digests(folder)
            if checksum != manifest["checksum"]:
                return "their checksum no longer matches the one recorded when they were staged"
            refreshed = {**manifest, "hashes": hashes, "stamps": stamps}
    except OSError as e:
        return f"they cannot be read ({e.strerror or type(e).__name__})"
    with contextlib.suppress(OSError, SpecError):
        _write_manifest(folder, refreshed, root=root)
    return None


def names_other_files(manifest: dict[str, Any], weights: list[WeightFile]) -> bool:
    """Whether the manifest records other files than ``weights`` names now (another
    ``uri``, ``path`` or ``extract``, or another sha256 where the spec gives one)."""
    recorded = manifest.get("files")
    if not isinstance(recorded, list) or len(recorded) != len(weights):
        return True
    for entry, item in zip(recorded, weights):
        if not isinstance(entry, dict):
            return True
        if (entry.get("uri"), entry.get("path"), bool(entry.get("extract"))) != (item.uri, item.path, item.extract):
            return True
        if item.sha256 is not None and entry.get("sha256") != item.sha256:
            return True
    return False


def _why_not_reusable(folder: Path, manifest: dict[str, Any], weights: list[WeightFile],
                      pins: dict[str, str], *, root: Path) -> str | None:
    """Why the staged ``folder`` cannot be used as it is for ``weights``, or ``None``."""
    if names_other_files(manifest, weights):
        return "they were staged from other files than the spec names now (another uri, path or sha256)"
    recorded = manifest["files"]
    unknown = [entry for entry in recorded if not isinstance(entry.get("sha256"), str)]
    if any(entry.get("extract") for entry in unknown):
        return "they were staged by an older czb, which kept no sha256 of an archive"
    why = _changed(folder, manifest, root=root)
    if why is not None:
        return why
    if unknown:
        # Staged by an older czb: a file is staged as published, so the sha256 of its
        # staged copy (checked just now against the folder's checksum) is its own.
        manifest = read_manifest(folder) or manifest
        hashes = manifest.get("hashes") if isinstance(manifest.get("hashes"), dict) else {}
        filled = []
        for entry in manifest["files"]:
            if not isinstance(entry.get("sha256"), str):
                digest = hashes.get(Path(entry["path"]).as_posix())
                if not isinstance(digest, str):
                    return "they were staged by an older czb, which kept no sha256 of each file"
                entry = {**entry, "sha256": digest, "verified_by": "first fetch"}
            filled.append(entry)
        recorded = filled
        with contextlib.suppress(OSError, SpecError):
            _write_manifest(folder, {**manifest, "files": filled}, root=root)
    for entry, item in zip(recorded, weights):
        pinned = pins.get(item.uri)
        if item.sha256 is None and pinned is not None and entry["sha256"] != pinned:
            return f"{shown(item.path)} is not the file pinned when it was first fetched"
    return None


def _staging_prefix(variant: str) -> str:
    """``.<variant>-staging-<pid>@<host>-``: a later run can tell whether its process is gone."""
    return f".{variant}-staging-{process_tag()}-"


def _remove_stale_staging(parent: Path, variant: str) -> None:
    """Remove the staging folders of ``variant`` left by a czb process that died mid-way
    (killed while unpacking): its process is gone on this host, or the folder is more
    than a day old (another host's, or an older czb's without a process tag)."""
    pattern = rf"\.{re.escape(variant)}-staging-(?:{TAG_PATTERN}-)?[A-Za-z0-9_]+"
    for entry in stale_folders(parent, pattern, age_clears_tagged=True):
        if inside(entry, parent):
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
        ``weights_dir`` is not a folder, or the variant's weights are not staged, were
        staged from other files than the spec names now, or changed since (the message
        names the file and gives the command that stages them).
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
    manifest = read_manifest(folder)
    if manifest is None:
        msg = (
            f"weights of {spec.name} (variant {name}) are not staged; run "
            f"`czb models fetch-weights {spec.name} --variant {name}` or pass --weights DIR"
        )
        raise EmbeddingError(msg)
    again = f"run `czb models fetch-weights {spec.name} --variant {name}` to stage them again"
    if names_other_files(manifest, chosen.weights):
        msg = (f"the staged weights of {spec.name} (variant {name}) in {folder} were staged from other files "
               f"than its spec names now (another uri, path or sha256); {again}")
        raise EmbeddingError(msg)
    why = _changed(folder, manifest, root=_cache_dir(cache_dir) / "weights")
    if why is not None:
        msg = (f"the staged weights of {spec.name} (variant {name}) in {folder} changed since they were "
               f"staged ({why}); {again}")
        raise EmbeddingError(msg)
    return StagedWeights(folder, manifest["checksum"], name, chosen.license)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of ``folder``; ``None`` when there is none or it cannot be read (the
    weights are then staged again)."""
    from czb.core import untrusted
    path = _manifest_path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        manifest = untrusted.parse_json(untrusted.read_bounded(path, MAX_RECORD_BYTES), max_depth=8)
    except (OSError, ValueError):  # UntrustedInputError is a ValueError
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("checksum"), str) else None


def _write_manifest(folder: Path, manifest: dict[str, Any], *, root: Path) -> None:
    write_json(_manifest_path(folder), manifest, root=root, what="weights manifest")


def pins_file(spec: ModelSpec, variant: str, *, cache_dir: Path | None = None) -> Path:
    """The pins of ``spec``'s ``variant``: ``<cache>/weights/.pins/<model>/<variant>.json``
    (:mod:`czb.models.weight_pins`; names checked as by :func:`staged_path`)."""
    staged_path(spec, variant, cache_dir=cache_dir)
    return pins_path(_cache_dir(cache_dir) / "weights", spec.name, variant)


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
