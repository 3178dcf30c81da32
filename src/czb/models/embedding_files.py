"""Embeddings brought as files: :class:`FileEmbeddingSource` reads one (through
:mod:`czb.models.embedding_readers`), checks it and aligns its rows to the dataset's cells.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import EmbeddingError
from czb.models.embedding import Embedding, align_to_dataset, check_embedding, record_warning
from czb.models.embedding_readers import EmbeddingFileReader

if TYPE_CHECKING:
    from czb.data.dataset import Dataset


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FileEmbeddingSource:
    """Embeddings precomputed elsewhere, read from a file and aligned to the dataset.

    Use :func:`~czb.models.sources.source_for_file` to make one. Formats:

    ``.npy``
        One array of shape ``(n_cells, dim)`` in dataset order (no cell IDs).
    ``.npz``
        The array named ``key``, or the only array that is not cell IDs; cell IDs from an
        array named ``cell_ids``, ``cell_id`` or ``obs_names`` if there is one (as strings:
        object arrays are pickles, which are never loaded).
    ``.parquet``
        One row per cell. Cell IDs from a string index (as ``DataFrame.to_parquet`` writes
        it) or a ``cell_ids`` / ``cell_id`` / ``obs_names`` column; every other column is
        one numeric dimension, unless ``key`` names one list-valued column holding whole
        vectors (a file whose only column is list-valued needs no ``key``).
    ``.h5ad``
        ``obsm[key]`` (``key`` may be left out when ``obsm`` has one entry); cell IDs are the
        ``obs_names``. Only that entry and the cell IDs are read.

    With cell IDs, rows are matched to dataset cells by ID and put in dataset order; dataset
    cells missing from the file are dropped with an :class:`~czb.core.errors.EmbeddingWarning`
    (``info["n_dropped_cells"]``). Without IDs, the file must have one row per dataset cell.
    """

    kind = "file"

    def __init__(self, path: str | Path, *, key: str | None = None):
        self.path = Path(path)
        self.key = key
        self.format = self.path.suffix.lower()
        self.name = f"file:{self.path.name}"
        self._digest: tuple[tuple[int, int], str] | None = None

    def __repr__(self) -> str:
        return f"FileEmbeddingSource({str(self.path)!r}, key={self.key!r})"

    @property
    def sha256(self) -> str:
        """Checksum of the file (recomputed if the file changed)."""
        # Size and times alone can be put back after an edit; ctime and inode cannot.
        st = self.path.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
        if self._digest is None or self._digest[0] != stamp:
            self._digest = (stamp, _sha256(self.path))
        return self._digest[1]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": None,
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "parameters": {"key": self.key},
        }

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Read the file and align its rows to the cells of ``dataset``.

        Parameters
        ----------
        dataset
            The dataset the embeddings were computed on.
        seed
            Ignored (the embeddings are already computed).

        Returns
        -------
        Embedding of shape ``(n_kept_cells, dim)``; ``cell_index`` is ``None`` when every
        dataset cell is present.

        Raises
        ------
        EmbeddingError
            Unreadable file, missing key, malformed values, or rows that do not line up
            with the dataset's cells.
        """
        where = str(self.path)
        if not self.path.is_file():
            msg = f"{where}: embedding file not found"
            raise EmbeddingError(msg)
        loaded = EmbeddingFileReader(self.path, key=self.key).read()
        n_rows = np.shape(loaded.values)[0] if np.ndim(loaded.values) else 0
        if loaded.cell_ids is not None and len(loaded.cell_ids) != n_rows:
            msg = f"{where}: {len(loaded.cell_ids)} cell IDs ({loaded.id_source}) for {n_rows} rows"
            raise EmbeddingError(msg)
        values = check_embedding(loaded.values, name=where, row_names=loaded.cell_ids)

        info: dict[str, Any] = {
            "path": str(self.path.resolve()),
            "sha256": self.sha256,
            "format": self.format.lstrip("."),
            "key": loaded.key,
            "cell_ids": loaded.id_source,
            "n_rows_in_file": int(values.shape[0]),
        }
        for note in loaded.notes:
            record_warning(info, note)
        if loaded.cell_ids is None:
            if values.shape[0] != dataset.n_cells:
                msg = (
                    f"{where}: {values.shape[0]} rows but dataset {dataset.name} has "
                    f"{dataset.n_cells} cells; without cell IDs the rows must be the dataset's "
                    f"cells in order (add cell IDs to match by ID)"
                )
                raise EmbeddingError(msg)
            cell_index = None
            info["n_dropped_cells"] = 0
        else:
            values, cell_index = align_to_dataset(values, loaded.cell_ids, dataset, name=where, info=info)
        return Embedding(values, model=self.name, kind=self.kind, cell_index=cell_index, info=info)
