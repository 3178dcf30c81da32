"""The embedding cache: finished model runs kept under a content key, so scoring again never
re-runs a model; and the removal of the work folders runs leave behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from czb.core.errors import EmbeddingError, EmbeddingWarning
from czb.models.docker.contract import (
    CELL_IDS_FILE,
    EMBEDDINGS_FILE,
    LOG_FILE,
    META_FILE,
    ModelOutput,
    OutputLimits,
    read_output,
)
from czb.models.docker.output_files import (
    NEW_FILE_FLAGS,
    UNLIMITED,
    copy_fd,
    open_folder,
    open_regular,
)
from czb.models.workdirs import TAG_PATTERN, remove_tree, stale_folders


def discard_tree(path: Path, what: str) -> None:
    """:func:`~czb.models.workdirs.remove_tree`, with a one-line warning instead of an
    error when something cannot be removed."""
    try:
        remove_tree(path)
    except OSError as e:
        message = f"could not remove {what} {path} ({e.strerror or type(e).__name__}); remove it by hand"
        warnings.warn(message, EmbeddingWarning, stacklevel=2)


def remove_stale_work(runs: Path) -> None:
    """Remove the work folders under ``runs`` left by czb processes of this host that are
    gone (killed mid-run), and those without a process tag (an older czb's) more than a day
    old; another host's and a live process's are left (a run may take longer than a day)."""
    for entry in stale_folders(runs, rf".+?-(?:{TAG_PATTERN}-)?[A-Za-z0-9_]+", age_clears_tagged=False):
        discard_tree(entry, "stale work folder")


KEY_FILE = "key.json"
#: What a cache entry may hold besides key.json and the container log.
_ENTRY_OUTPUTS = (META_FILE, CELL_IDS_FILE, EMBEDDINGS_FILE)


class EmbeddingCache:
    """Finished model runs, content-addressed: ``<cache>/embeddings/<key>/``.

    Each entry holds the run's accepted output files
    (:func:`~czb.models.docker.output_files.collect_output`), its container log and
    ``key.json`` (what the key was made of). Entries appear by an atomic rename of a
    complete folder, so a reader never sees a half-written one. An entry is
    read like a container's output (regular files only, within their caps): the cache is
    czb's own, but a damaged entry must not be followed anywhere.
    """

    def __init__(self, cache_dir: Path | None = None):
        if cache_dir is None:
            from czb.core.settings import get_settings

            cache_dir = get_settings().cache_dir
        self.root = Path(cache_dir) / "embeddings"

    def path(self, key: str) -> Path:
        return self.root / key

    def get(
        self, key: str, *, name: str, limits: OutputLimits | None = None, known_cells: Any = None
    ) -> ModelOutput | None:
        """The entry of ``key`` (``None`` when there is none; a damaged one is removed)."""
        entry = self.path(key)
        try:
            is_folder = stat.S_ISDIR(os.lstat(entry).st_mode)
        except OSError:
            return None
        if is_folder:
            try:
                return read_output(entry, name=name, limits=limits, known_cells=known_cells)
            except EmbeddingError:
                pass
        discard_tree(entry, "damaged embedding cache entry")  # forget it, run again
        return None

    def put(self, key: str, folder: Path, parts: Mapping[str, Any], *, log_file: Path | None = None) -> Path:
        """Move ``folder`` into the cache as the entry of ``key`` (replacing an older one).

        ``folder`` is a folder czb made holding only accepted output files (as
        :func:`~czb.models.docker.output_files.collect_output` leaves them), never a
        container's ``/output`` itself; ``key.json`` and the copy of ``log_file`` are
        created there as new files.

        Raises
        ------
        EmbeddingError
            ``folder`` holds something other than regular output files.
        """
        folder = Path(folder)
        self._check_folder(folder)
        with open_folder(folder, name="embedding cache") as target:
            out = os.open(KEY_FILE, NEW_FILE_FLAGS, 0o644, dir_fd=target)
            with os.fdopen(out, "w") as f:
                f.write(json.dumps(dict(parts), indent=2, sort_keys=True, default=str))
            if log_file is not None:
                with open_folder(Path(log_file).parent, name="embedding cache") as logs:
                    fd = open_regular(logs, Path(log_file).name, UNLIMITED, name="embedding cache")
                    if fd is not None:
                        try:
                            copy_fd(fd, target, LOG_FILE, UNLIMITED, name="embedding cache")
                        finally:
                            os.close(fd)
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.path(key)
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}-"))
        staging.rmdir()
        shutil.move(str(folder), staging)
        if os.path.lexists(entry):
            old = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{key[:12]}-old-"))
            old.rmdir()  # a fresh name for the old entry
            entry.rename(old)
            discard_tree(old, "replaced embedding cache entry")
        staging.rename(entry)
        return entry

    @staticmethod
    def _check_folder(folder: Path) -> None:
        with os.scandir(folder) as entries:
            for i, item in enumerate(entries):
                st = item.stat(follow_symlinks=False)
                accepted = item.name in _ENTRY_OUTPUTS and stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                if i >= len(_ENTRY_OUTPUTS) or not accepted:
                    msg = f"embedding cache: {folder} holds {item.name}, which is not an accepted output file"
                    raise EmbeddingError(msg)
