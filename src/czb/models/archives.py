"""Unpacking a weights archive (tar or zip) into its folder, member by member.

An archive named in a spec may be hostile: members that would land outside the folder
(also through links) and special files are refused, and the bytes and members unpacked
are counted as they are decompressed and written, never taken from headers, up to the
limits of the settings (``CZB_MAX_UNPACK_RATIO``, ``CZB_MIN_UNPACK_MB``,
``CZB_MAX_UNPACK_FILES``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

from czb.core.errors import EmbeddingError, FetchError


class _Budget:
    """What an archive may still unpack: bytes (counted as written, and as decompressed)
    and members."""

    def __init__(self, archive: Path, shown: str | Path):
        from czb.core.settings import get_settings

        settings = get_settings()
        self.archive = shown
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


def extract_archive(archive: Path, target: Path, *, shown: str | Path | None = None) -> None:
    """Unpack a tar or zip archive into ``target``, member by member.

    Refuses members that would land outside ``target`` (also through links) and special
    members (devices, FIFOs; symlinks in zips), and stops once the bytes or members
    exceed the limits (``CZB_MAX_UNPACK_RATIO``, ``CZB_MAX_UNPACK_FILES``): bytes are
    counted as they are decompressed and written, never taken from headers. Messages
    name the archive as ``shown`` (default: its path), e.g. the file czb's copy came from.
    """
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    archive_file, archive = archive, shown or archive
    budget = _Budget(archive_file, archive)

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
        stream = _tar_stream(archive_file)
        if stream is None and zipfile.is_zipfile(archive_file):
            with zipfile.ZipFile(archive_file) as zf:
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
