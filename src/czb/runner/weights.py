"""Model weights, staged on the host before a container runs (containers have no network).

``czb models fetch-weights MODEL [--variant V]`` downloads each published file of the
variant (:class:`~czb.runner.specs.WeightFile`) through the dataset cache, verifies its
sha256 when the spec gives one, and lays the files out under
``<cache>/weights/<model>/<variant>/`` exactly as the container expects them at
``/weights``. A manifest beside that folder records the files, their licence and the
folder's checksum, which identifies the weights in cache keys and result files.
``--weights DIR`` uses a local copy instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czb.errors import EmbeddingError, FetchError
from czb.runner.specs import ModelSpec


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
        from czb.settings import get_settings

        cache_dir = get_settings().cache_dir
    return Path(cache_dir)


def staged_path(spec: ModelSpec, variant: str, *, cache_dir: Path | None = None) -> Path:
    """Where the weights of ``spec``'s ``variant`` are (or would be) staged."""
    return _cache_dir(cache_dir) / "weights" / spec.name / variant


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
    from czb.runner.fetch import fetch

    name, chosen = spec.variant(variant)
    if not chosen.weights:
        return StagedWeights(None, None, name, chosen.license)
    folder = staged_path(spec, name, cache_dir=cache_dir)
    manifest = _read_manifest(folder)
    if manifest is not None:
        return StagedWeights(folder, manifest["checksum"], name, chosen.license)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-staging-"))
    try:
        files = []
        for item in chosen.weights:
            local = Path(fetch(item.uri, sha256=item.sha256, cache_dir=cache_dir, offline=offline,
                               progress=progress))
            target = staging / item.path
            if item.extract:
                _extract(local, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(local, target)
            files.append({"uri": item.uri, "path": item.path, "sha256": item.sha256, "extract": item.extract})
        checksum = directory_checksum(staging)
        _make_readable(staging)  # containers read it as a non-root user
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished earlier staging without a manifest
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_manifest(folder, {
        "model": spec.name,
        "variant": name,
        "license": chosen.license,
        "files": files,
        "checksum": checksum,
    })
    return StagedWeights(folder, checksum, name, chosen.license)


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
    return StagedWeights(folder, manifest["checksum"], name, chosen.license)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = _manifest_path(folder)
    if not folder.is_dir() or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and "checksum" in manifest else None


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = _manifest_path(folder)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(path)


def _make_readable(folder: Path) -> None:
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else (path.stat().st_mode | 0o444) & 0o7777)


def _link_or_copy(source: Path, target: Path) -> None:
    # A hard link shares the mode bits, and the staged folder is made readable by others:
    # copy a file that is private, so the user's own file keeps its permissions.
    if not source.stat().st_mode & stat.S_IROTH:
        shutil.copy2(source, target)
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


def _extract(archive: Path, target: Path) -> None:
    """Unpack a tar or zip archive into ``target``, refusing members that escape it."""
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()

    def safe(member: str) -> Path:
        dest = (root / member).resolve()
        if dest != root and root not in dest.parents:
            msg = f"{archive}: archive member {member!r} would be written outside {target}"
            raise EmbeddingError(msg)
        return dest

    try:
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    safe(member.name)
                    if member.issym() or member.islnk():
                        safe(os.path.join(os.path.dirname(member.name), member.linkname))
                tar.extractall(root, filter="data")
        elif zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    safe(member)
                zf.extractall(root)
        else:
            msg = f"{archive}: marked extract: true but is neither a tar nor a zip archive"
            raise EmbeddingError(msg)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        msg = f"{archive}: cannot unpack weights archive ({e})"
        raise FetchError(msg) from e
