"""Catalog datasets as AnnData, for notebooks: ``czb.datasets.load("tsv2_blood")``.

The same catalog, download cache and reader as ``czb run``
(:class:`~czb.specs.catalog.Catalog`, :func:`~czb.data.reading.load_dataset`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import anndata

__all__ = ["load"]


def load(
    name: str,
    *,
    offline: bool | None = None,
    config_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> anndata.AnnData:
    """Load a catalog dataset (see ``czb list datasets``) as an AnnData in memory.

    A remote file is downloaded once into czb's cache (``CZB_CACHE_DIR``) and its
    checksum verified; later calls read the cached copy.

    Parameters
    ----------
    name
        Dataset name in the catalog, e.g. ``"tsv2_blood"`` or ``"pbmc68k_reduced"``.
    offline
        Never touch the network: a remote dataset must already be cached (default:
        the ``CZB_OFFLINE`` setting).
    config_dir
        Spec folder(s) read after the bundled specs and ``CZB_CONFIG_PATH`` (as
        ``czb --config-dir``), e.g. where your own datasets are declared.

    Returns
    -------
    anndata.AnnData
        ``(n_cells, n_genes)``: ``X`` is the matrix the spec's ``layer`` names (sparse
        stays sparse; raw counts or log-normalised values, as the spec's ``expression``
        says), ``obs`` all cell annotations, ``var_names`` the gene IDs. ``obsm``,
        ``layers`` and other matrices of the file are not read. ``uns["czb_dataset"]``
        holds the spec's fields, to pass on to :func:`czb.evaluate`: ``name``, ``uri``,
        ``organism``, ``label_key``, ``batch_key`` (a list, empty without batches),
        ``extra_keys``, ``layer``, ``expression``, ``gene_id_type``; and ``sha256``,
        the checksum of what was read.

    Raises
    ------
    UnknownNameError
        No dataset of that name (the closest names are suggested).
    FetchError
        The file cannot be downloaded, or is not cached while offline.
    DatasetError
        The file cannot be read as the spec says.

    Examples
    --------
    >>> import czb.datasets
    >>> adata = czb.datasets.load("pbmc68k_reduced")
    >>> adata.shape
    (700, 765)
    >>> adata.uns["czb_dataset"]["label_key"]
    'bulk_labels'
    """
    from czb.data.reading import load_dataset
    from czb.specs.catalog import Catalog

    if config_dir is None:
        folders: list[Path] = []
    elif isinstance(config_dir, (str, os.PathLike)):
        folders = [Path(config_dir)]
    else:
        folders = [Path(d) for d in config_dir]
    spec = Catalog.load(folders).dataset(name)
    # In memory: a notebook's AnnData, not czb's on-disk matrix wrapper.
    ds = load_dataset(spec, offline=offline, backed=False)
    adata = ds.adata
    described: dict[str, Any] = {
        "name": spec.name, "uri": spec.uri, "organism": spec.organism, "label_key": spec.label_key,
        "batch_key": spec.batch_keys, "extra_keys": dict(spec.extra_keys), "layer": spec.layer,
        "expression": spec.expression, "gene_id_type": spec.gene_id_type,
    }
    if ds.sha256 is not None:
        described["sha256"] = ds.sha256
    adata.uns["czb_dataset"] = described
    return adata
