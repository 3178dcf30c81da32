"""Embedding sources from what the user names: a model spec (:func:`source_for_model`) or
an embedding file (:func:`source_for_file`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from czb.core.errors import EmbeddingError, SpecError
from czb.models.baselines import BASELINES
from czb.models.docker.source import DockerModelSource
from czb.models.embedding import EmbeddingSource
from czb.models.embedding_files import FileEmbeddingSource
from czb.models.embedding_readers import FILE_FORMATS
from czb.specs.parameters import resolve_parameters

if TYPE_CHECKING:
    from czb.specs.schema import ModelSpec


def source_for_model(spec: ModelSpec, options: Any = None) -> EmbeddingSource:
    """The embedding source that runs a model spec.

    Parameters
    ----------
    spec
        A ``baseline`` spec names one of :data:`~czb.models.baselines.BASELINES` as
        ``implementation`` and gets the values of the parameters it declares; a ``docker``
        spec runs its image
        (:class:`czb.models.docker.source.DockerModelSource`).
    options
        :class:`czb.models.docker.request.RunOptions` of docker models (GPUs, weights,
        limits, cache); ignored by baselines.

    Raises
    ------
    SpecError
        Unknown baseline implementation, or unknown / invalid parameters.
    """
    if spec.kind == "docker":
        return DockerModelSource(spec, options)
    known = ", ".join(sorted(BASELINES))
    if spec.implementation is None:
        msg = f"model {spec.name!r} is a baseline but sets no implementation; known: {known}"
        raise SpecError(msg)
    if spec.implementation not in BASELINES:
        msg = (
            f"model {spec.name!r}: unknown baseline implementation "
            f"{spec.implementation!r}; known: {known}"
        )
        raise SpecError(msg)
    return BASELINES[spec.implementation](name=spec.name, **resolve_parameters(spec))


def source_for_file(path: str | Path, *, key: str | None = None) -> EmbeddingSource:
    """An embedding source that reads precomputed embeddings from a file.

    Parameters
    ----------
    path
        A ``.npy``, ``.npz``, ``.parquet`` or ``.h5ad`` file; see
        :class:`~czb.models.embedding_files.FileEmbeddingSource` for what each must contain.
    key
        Which array (``.npz``), list-valued column (``.parquet``) or ``obsm`` entry
        (``.h5ad``) holds the embeddings; needed only when the file has several.

    Raises
    ------
    EmbeddingError
        Unknown file extension, or no such file. (The content is checked by ``embed``.)
    """
    path = Path(path)
    if path.suffix.lower() not in FILE_FORMATS:
        msg = (
            f"{path}: unknown embedding file extension {path.suffix!r}; "
            f"expected one of {', '.join(FILE_FORMATS)}"
        )
        raise EmbeddingError(msg)
    if not path.is_file():
        msg = f"{path}: embedding file not found"
        raise EmbeddingError(msg)
    return FileEmbeddingSource(path, key=key)
