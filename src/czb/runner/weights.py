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

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from czb.errors import EmbeddingError, FetchError, SpecError
from czb.runner.specs import NAME_RULE, ModelSpec, is_valid_name

#: A staging folder this old is removed whoever made it (no unpacking takes a day).
STALE_STAGING_S = 24 * 3600


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
    from czb.runner.fetch import fetch

    name, chosen = spec.variant(variant)
    if not chosen.weights:
        return StagedWeights(None, None, name, chosen.license)
    folder = staged_path(spec, name, cache_dir=cache_dir)
    manifest = _read_manifest(folder)
    if manifest is not None:
        return StagedWeights(folder, manifest["checksum"], name, chosen.license)

    root = _cache_dir(cache_dir) / "weights"
    folder.parent.mkdir(parents=True, exist_ok=True)
    _require_inside(folder.parent, root, "weights folder")
    _remove_stale_staging(folder.parent, name)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=_staging_prefix(name)))
    try:
        files = []
        for item in chosen.weights:
            local = Path(fetch(item.uri, sha256=item.sha256, cache_dir=cache_dir, offline=offline,
                               progress=progress))
            target = staging / item.path
            _require_inside(target, staging, f"weights file {item.path!r:.60} of")
            if item.extract:
                _extract(local, target)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(local, target)
            files.append({"uri": item.uri, "path": item.path, "sha256": item.sha256, "extract": item.extract})
        checksum = directory_checksum(staging)
        _make_readable(staging)  # containers read it as a non-root user
        if folder.is_symlink() or folder.is_file():
            folder.unlink()
        elif folder.exists():
            _require_inside(folder, root, "weights folder")
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
    }, root=root)
    return StagedWeights(folder, checksum, name, chosen.license)


def _staging_prefix(variant: str) -> str:
    """``.<variant>-staging-<pid>@<host>-``: a later run can tell whether its process is gone."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    return f".{variant}-staging-{os.getpid()}@{host}-"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):  # alive (another user's), or cannot tell
        return False
    return False


def _remove_stale_staging(parent: Path, variant: str) -> None:
    """Remove the staging folders of ``variant`` left by a czb process that died mid-way
    (killed while unpacking): its process is gone on this host, or the folder is more
    than a day old (another host's, or an older czb's without a process ID in its name)."""
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
    pattern = re.compile(rf"\.{re.escape(variant)}-staging-(?:(\d+)@(.+)-)?[A-Za-z0-9_]+")
    for entry in parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid, where = match.group(1), match.group(2)
        stale = time.time() - entry.stat().st_mtime > STALE_STAGING_S or (
            pid is not None and where == host and int(pid) != os.getpid() and _process_gone(int(pid)))
        if stale and _inside(entry, parent):
            shutil.rmtree(entry, ignore_errors=True)


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
    # A hard link shares the mode bits, and the staged folder is made readable by others:
    # copy a file that is private, so the user's own file keeps its permissions.
    if not source.stat().st_mode & stat.S_IROTH:
        shutil.copy2(source, target)
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copy2(source, target)


class _Budget:
    """What an archive may still unpack: bytes (counted as written, and as decompressed)
    and members."""

    def __init__(self, archive: Path):
        from czb.settings import get_settings

        settings = get_settings()
        self.archive = archive
        self.ratio, self.floor_mb = settings.max_unpack_ratio, settings.min_unpack_mb
        self.max_bytes = max(int(self.ratio * archive.stat().st_size), int(self.floor_mb * 1e6))
        self.max_members = settings.max_unpack_files
        self.bytes = self.members = self.streamed = 0

    def _too_big(self) -> FetchError:
        msg = (f"{self.archive}: weights archive unpacks to more than {self.max_bytes:,} bytes "
               f"({self.ratio:g} times its size, at least {self.floor_mb:g} MB); stopped unpacking; "
               "CZB_MAX_UNPACK_RATIO or CZB_MIN_UNPACK_MB raises the limit")
        return FetchError(msg)

    def member(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            msg = (f"{self.archive}: weights archive has more than {self.max_members:,} members; "
                   "stopped unpacking; CZB_MAX_UNPACK_FILES raises the limit")
            raise FetchError(msg)

    def wrote(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.max_bytes:
            raise self._too_big()

    def streamed_bytes(self, n: int) -> None:
        self.streamed += n
        # Headers and padding come on top of the data: at most about 1.5 KiB a member,
        # unless a (pax) header is a bomb of its own.
        if self.streamed > self.max_bytes + (1 << 20) + 2048 * self.members:
            raise self._too_big()

    def check_tree(self, root: Path) -> None:
        """The bytes a reader of ``root`` sees (each hard link and symlinked file again)."""
        total = 0
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    info = os.stat(path)  # follows a symlink, as the checksum and the model do
                except OSError:
                    continue  # a dangling symlink
                if stat.S_ISREG(info.st_mode):
                    total += info.st_size
                    if total > self.max_bytes:
                        raise self._too_big()


class _CountingReader:
    """A read-only stream that reports every decompressed byte to a :class:`_Budget`,
    so tar headers (a pax header can claim gigabytes) are bounded too."""

    def __init__(self, raw, budget: _Budget):
        self.raw, self.budget = raw, budget

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n if n is not None and n >= 0 else 1 << 20)
        self.budget.streamed_bytes(len(data))
        return data



def _tar_stream(archive: Path):
    """The archive's tar stream (decompressed), or ``None`` when it is not a tar archive.

    The kind is told from magic bytes, not by ``tarfile.is_tarfile``, which would read a
    whole (pax) header of a compressed archive into memory first."""
    with archive.open("rb") as f:
        head = f.read(512)
    if head[:2] == b"\x1f\x8b":
        return gzip.open(archive, "rb")
    if head[:3] == b"BZh":
        return bz2.open(archive, "rb")
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.open(archive, "rb")
    if head[257:262] == b"ustar":
        return archive.open("rb")
    if not zipfile.is_zipfile(archive) and tarfile.is_tarfile(archive):  # an old-style tar: bounded by its size
        return archive.open("rb")
    return None


def _copy_counted(source, dest: Path, budget: _Budget) -> None:
    """Write the stream ``source`` to a new file ``dest``, counting bytes as they are written."""
    if dest.is_symlink() or dest.is_file():
        dest.unlink()  # a later member of the same name replaces the earlier one
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(1 << 20):
            budget.wrote(len(chunk))
            out.write(chunk)


def _extract(archive: Path, target: Path) -> None:
    """Unpack a tar or zip archive into ``target``, member by member.

    Refuses members that would land outside ``target`` (also through links) and special
    members (devices, FIFOs; symlinks in zips), and stops once the bytes or members
    exceed the limits (``CZB_MAX_UNPACK_RATIO``, ``CZB_MAX_UNPACK_FILES``): bytes are
    counted as they are decompressed and written, never taken from headers.
    """
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    budget = _Budget(archive)

    def safe(member: str) -> Path:
        dest = (root / member).resolve()
        if dest != root and root not in dest.parents:
            msg = f"{archive}: archive member {member!r:.80} would be written outside {target}"
            raise EmbeddingError(msg)
        return dest

    def refuse(member: str, kind: str) -> None:
        msg = f"{archive}: archive member {member!r:.80} is a {kind}; a weights archive holds files and folders"
        raise EmbeddingError(msg)

    try:
        stream = _tar_stream(archive)
        if stream is None and zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    budget.member()
                    dest = safe(info.filename)
                    kind = stat.S_IFMT(info.external_attr >> 16)
                    if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                        refuse(info.filename, "symbolic link" if kind == stat.S_IFLNK else "special file")
                    if info.is_dir():
                        dest.mkdir(parents=True, exist_ok=True)
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as source:
                        _copy_counted(source, dest, budget)
        elif stream is not None:
            with stream, tarfile.open(fileobj=_CountingReader(stream, budget), mode="r|") as tar:
                while (member := tar.next()) is not None:
                    budget.member()
                    dest = safe(member.name)
                    if member.isdir():
                        dest.mkdir(parents=True, exist_ok=True)
                    elif member.isfile():
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        _copy_counted(tar.extractfile(member), dest, budget)
                    elif member.islnk():  # a second name of a file already unpacked (no new data)
                        source = safe(member.linkname)
                        if not source.is_file():
                            refuse(member.name, "hard link to something that is not an unpacked file")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        if dest.is_symlink() or dest.is_file():
                            dest.unlink()
                        os.link(source, dest)
                    elif member.issym():
                        safe(os.path.join(os.path.dirname(member.name), member.linkname))
                        tar.extract(member, root, filter="data")
                    else:
                        refuse(member.name, "device, FIFO or other special file")
        else:
            msg = f"{archive}: marked extract: true but is neither a tar nor a zip archive"
            raise EmbeddingError(msg)
        budget.check_tree(root)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError, zlib.error, lzma.LZMAError,
            RuntimeError, NotImplementedError) as e:  # the last two: encrypted or unknown zip compression
        detail = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0][:120]
        msg = f"{archive}: cannot unpack weights archive ({detail or type(e).__name__})"
        raise FetchError(msg) from e
