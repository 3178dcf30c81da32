"""The in-process baselines (:data:`BASELINES`): ``pca``, ``pca_raw``, ``random`` and ``harmony``.

Each is an :class:`~czb.models.embedding.EmbeddingSource` computed here, built from a
``baseline`` model spec by :func:`~czb.models.sources.source_for_model`; the PCA itself is
in :mod:`czb.models.pca`, the Harmony correction in :mod:`czb.models.harmony`.
"""

from __future__ import annotations

import numbers
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from czb.core.errors import EmbeddingError, NotApplicableError, SpecError
from czb.models.embedding import Embedding, check_embedding, record_warning
from czb.models.pca import should_stream, sparse_pca, streamed_pca

if TYPE_CHECKING:
    from czb.data.dataset import Dataset


class _Baseline:
    """Shared parameter handling of the in-process baselines."""

    implementation: ClassVar[str]
    #: Parameter names and defaults; every parameter is a positive integer.
    defaults: ClassVar[dict[str, int]]
    kind = "in-process"

    def __init__(self, *, name: str | None = None, **parameters: Any):
        unknown = sorted(set(parameters) - set(self.defaults))
        if unknown:
            msg = (
                f"baseline {self.implementation!r}: unknown parameter(s) "
                f"{', '.join(unknown)}; accepted: {', '.join(sorted(self.defaults))}"
            )
            raise SpecError(msg)
        for key, value in parameters.items():
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                msg = (
                    f"baseline {self.implementation!r}: parameter {key} must be a positive "
                    f"integer, got {value!r}"
                )
                raise SpecError(msg)
        self.name = name or self.implementation
        self.parameters: dict[str, int] = {
            k: int(parameters.get(k, v)) for k, v in self.defaults.items()
        }

    def _chosen(self, key: str) -> bool:
        """Whether parameter ``key`` differs from its default: a default that the data
        cannot fill (3000 genes of a 765-gene panel) is used as far as it goes, silently;
        a value someone chose and the data cannot meet is worth a warning."""
        return self.parameters[key] != self.defaults[key]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": "in-process",
            "implementation": self.implementation,
            "parameters": dict(self.parameters),
        }

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.parameters.items())
        return f"{type(self).__name__}(name={self.name!r}, {params})"

    def _embedding(self, values: np.ndarray, info: dict[str, Any]) -> Embedding:
        values = check_embedding(values, name=self.name)
        info = {"parameters": dict(self.parameters), "n_dropped_cells": 0, **info}
        return Embedding(values=values, model=self.name, kind=self.kind, info=info)


def _float_copy(x: Any) -> Any:
    """Copy of an expression matrix that normalisation may change in place.

    Integer counts become float32, as ``sc.pp.normalize_total`` would make them; sparse
    stays sparse.
    """
    dtype = np.float32 if x.dtype.kind in "iub" else x.dtype
    return x.astype(dtype, copy=True)


class PCABaseline(_Baseline):
    """PCA of highly variable genes of log-normalised expression.

    The standard scanpy workflow, as cz-benchmarks' ``run_standard_scrna_workflow`` runs
    it for its PCA baseline: ``sc.pp.normalize_total`` → ``sc.pp.log1p`` (both skipped
    when the dataset is already log-normalised) → ``sc.pp.highly_variable_genes``
    (``n_top_genes``, scanpy's default ``seurat`` flavor) → subset to those genes →
    ``sc.pp.pca`` (``n_comps``, zero-centred). Sparse input stays sparse throughout.

    Unlike cz-benchmarks, ``n_top_genes`` is capped to the number of genes rather than
    failing on small gene panels, as ``n_comps`` is to ``min(n_cells, n_genes) - 1``. At
    their defaults the caps are silent (the defaults mean "up to"); a value set in the
    spec that the data cannot meet gives an :class:`~czb.core.errors.EmbeddingWarning`.
    Either way ``info['effective_parameters']`` and ``info['n_genes_used']`` say what ran.

    Matrices storing more than :data:`~czb.models.pca.STREAMED_PCA_MIN_VALUES` values (in
    memory or on disk) are never copied: the same steps run streamed over row chunks
    (:mod:`czb.models.streaming_pca`): cell totals (one pass), per-gene moments and the
    same ``seurat`` gene selection (one pass), then randomized PCA of the selected genes
    with implicit centering (Halko et al. 2011; 8 passes), with scikit-learn's sign
    convention. Memory: one chunk plus ``n_cells × (n_comps + 20)`` floats. The genes
    are scanpy's; the leading components agree with ARPACK's to |cosine| > 0.999,
    trailing ones among near-equal eigenvalues less (``info['solver']`` says which
    path ran).

    Parameters
    ----------
    name
        Model name (defaults to ``"pca"``).
    n_top_genes
        Number of highly variable genes (default 3000).
    n_comps
        Number of principal components (default 50).

    References
    ----------
    Wolf, Angerer & Theis (2018). SCANPY: large-scale single-cell gene expression data
    analysis. Genome Biology 19:15.

    Satija et al. (2015). Spatial reconstruction of single-cell gene expression data.
    Nature Biotechnology 33:495–502 (the ``seurat`` highly-variable-gene method).

    Chan Zuckerberg Initiative, cz-benchmarks:
    ``czbenchmarks.tasks.utils.run_standard_scrna_workflow``.
    """

    implementation = "pca"
    defaults: ClassVar[dict[str, int]] = {"n_top_genes": 3000, "n_comps": 50}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed the cells of ``dataset``; see the class docstring.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, n_comps)`` for all cells.
        """
        import anndata as ad
        import scanpy as sc

        info: dict[str, Any] = {}
        expression = dataset.spec.expression
        ds, n_genes = dataset.name, dataset.n_genes
        n_top, warn_comps = self.parameters["n_top_genes"], self._chosen("n_comps")
        if n_top > n_genes:
            if self._chosen("n_top_genes"):
                record_warning(info, f"{self.name}: n_top_genes={n_top} capped to the {n_genes} genes of {ds}")
            n_top = n_genes
        if dataset.n_cells < 2 or n_genes < 2:
            msg = (
                f"{self.name}: {ds} has {dataset.n_cells} cells × {n_genes} genes; "
                f"PCA needs at least 2 of each"
            )
            raise EmbeddingError(msg)

        info.update(expression=expression, normalized=expression == "raw_counts")
        x = dataset.adata.X
        if should_stream(x):
            values, n_used = streamed_pca(
                x,
                n_comps=self.parameters["n_comps"],
                seed=seed,
                name=self.name,
                info=info,
                normalize=expression == "raw_counts",
                n_top_genes=n_top,
                warn=warn_comps,
            )
            self._check_n_used(n_used, n_top, ds, info)
            info["n_genes_used"] = n_used
            info["effective_parameters"] = {"n_top_genes": n_top, "n_comps": info["n_comps"]}
            return self._embedding(values, info)

        from czb.data.matrix import to_memory

        # A bare AnnData around a copy of X: normalisation works in place, and obs/var
        # (which may be large or have duplicated gene symbols) are not needed.
        adata = ad.AnnData(X=_float_copy(to_memory(x)))
        del x
        if expression == "raw_counts":
            sc.pp.normalize_total(adata)
            sc.pp.log1p(adata)
        with warnings.catch_warnings():
            # Genes without a defined dispersion (e.g. never detected) are never selected;
            # scanpy warns when that leaves fewer than n_top_genes. Reported below instead.
            warnings.filterwarnings("ignore", message="`n_top_genes` > number of normalized")
            sc.pp.highly_variable_genes(adata, n_top_genes=n_top)
        hvg = adata.var["highly_variable"].to_numpy()
        n_used = int(hvg.sum())
        self._check_n_used(n_used, n_top, ds, info)
        x = adata.X[:, hvg]
        del adata

        info["n_genes_used"] = n_used
        values = sparse_pca(x, self.parameters["n_comps"], seed=seed, name=self.name, info=info, warn=warn_comps)
        info["effective_parameters"] = {"n_top_genes": n_top, "n_comps": info["n_comps"]}
        return self._embedding(values, info)

    def _check_n_used(self, n_used: int, n_top: int, ds: str, info: dict[str, Any]) -> None:
        # Genes never detected cannot be selected: at the default, that is "all genes" too.
        if n_used < n_top and self._chosen("n_top_genes"):
            msg = (
                f"{self.name}: only {n_used} genes of {ds} have a defined dispersion (are "
                f"detected); using those instead of n_top_genes={n_top}"
            )
            record_warning(info, msg)


class RawPCABaseline(_Baseline):
    """PCA of the raw count matrix, without normalisation or gene selection.

    Zero-centred PCA of ``dataset.adata.X`` as given, computed sparse (the matrix is
    never densified or copied, except to turn integer counts into float32). Bendidi et al.
    found that this simple baseline is hard to beat on perturbation tasks. On a
    log-normalised dataset it is PCA of the log-normalised values. Above
    :data:`~czb.models.pca.STREAMED_PCA_MIN_VALUES` stored values it is streamed over row
    chunks, as :class:`PCABaseline` is.

    Parameters
    ----------
    name
        Model name (defaults to ``"pca_raw"``).
    n_comps
        Number of principal components (default 50; capped to ``min(n_cells, n_genes) - 1``,
        with a warning only when set to another value).

    References
    ----------
    Bendidi, I. et al. (2024). Benchmarking transcriptomics foundation models for
    perturbation analysis: one PCA still rules them all. arXiv:2410.13956.
    """

    implementation = "pca_raw"
    defaults: ClassVar[dict[str, int]] = {"n_comps": 50}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed the cells of ``dataset``; see the class docstring.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, n_comps)`` for all cells.
        """
        from czb.data.matrix import to_memory

        x = dataset.adata.X
        info: dict[str, Any] = {"expression": dataset.spec.expression, "normalized": False}
        if should_stream(x):
            values, _ = streamed_pca(
                x, n_comps=self.parameters["n_comps"], seed=seed, name=self.name, info=info,
                warn=self._chosen("n_comps"),
            )
            info["effective_parameters"] = {"n_comps": info["n_comps"]}
            return self._embedding(values, info)
        x = to_memory(x)
        if x.dtype.kind in "iub":
            x = x.astype(np.float32)
        values = sparse_pca(x, self.parameters["n_comps"], seed=seed, name=self.name, info=info,
                            warn=self._chosen("n_comps"))
        info["effective_parameters"] = {"n_comps": info["n_comps"]}
        return self._embedding(values, info)


class RandomBaseline(_Baseline):
    """Standard Gaussian noise, one row per cell: the chance-level reference.

    Any metric a real model scores should beat this one; one that does not is measuring
    something other than biology (e.g. label frequencies).

    Parameters
    ----------
    name
        Model name (defaults to ``"random"``).
    dim
        Number of dimensions (default 50).
    """

    implementation = "random"
    defaults: ClassVar[dict[str, int]] = {"dim": 50}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Draw ``(dataset.n_cells, dim)`` values from N(0, 1) with ``seed``.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, dim)`` for all cells.
        """
        rng = np.random.default_rng(seed)
        values = rng.standard_normal((dataset.n_cells, self.parameters["dim"]), dtype=np.float32)
        return self._embedding(values, {"seed": seed})


class HarmonyBaseline(_Baseline):
    """Harmony-corrected PCA: the batch-integration baseline of scIB (Luecken et al. 2022).

    The ``pca`` baseline's embedding (same steps, parameters and seed: see
    :class:`PCABaseline`), corrected for the dataset's batches by
    :func:`czb.models.harmony.harmonize` (theta 2, sigma 0.1, ridge lambda 1,
    ``min(100, n_cells / 30)`` clusters from a k-means seeded with the run's seed). The
    batches are the dataset's ``batch`` role: its spec's ``batch_key`` column, or several
    joined into one label, as the batch-integration task scores them. Cells without a
    batch are clustered with the others but not corrected (with a warning).

    A dataset without ``batch_key``, or with fewer than 2 batches, raises
    :class:`~czb.core.errors.NotApplicableError` before any work: there is nothing to
    integrate, and plain PCA is the ``pca`` baseline.

    Parameters
    ----------
    name
        Model name (defaults to ``"harmony"``).
    n_top_genes, n_comps
        As :class:`PCABaseline`'s (3000, 50).
    max_iter_harmony
        Most rounds of clustering and correction (default 10).

    References
    ----------
    Korsunsky, I. et al. (2019). Fast, sensitive and accurate integration of single-cell
    data with Harmony. Nature Methods 16:1289–1296.

    Luecken, M.D. et al. (2022). Benchmarking atlas-level data integration in single-cell
    genomics. Nature Methods 19:41–50.
    """

    implementation = "harmony"
    defaults: ClassVar[dict[str, int]] = {"n_top_genes": 3000, "n_comps": 50, "max_iter_harmony": 10}

    def embed(self, dataset: Dataset, *, seed: int = 0) -> Embedding:
        """Embed the cells of ``dataset``; see the class docstring.

        Returns
        -------
        Embedding of shape ``(dataset.n_cells, n_comps)`` for all cells.
        """
        from czb.models.harmony import batch_codes, harmonize

        keys = dataset.spec.batch_keys
        if dataset.batches is None:
            msg = (
                f"{self.name}: dataset {dataset.name!r} declares no batch_key, so there are no "
                f"batches to integrate; set batch_key (the obs column(s) of the batches) in its spec"
            )
            raise NotApplicableError(msg)
        codes, names = batch_codes(dataset.batches)
        if len(names) < 2:
            msg = (
                f"{self.name}: dataset {dataset.name!r} has {len(names)} "
                f"batch{'' if len(names) == 1 else 'es'} in obs "
                f"{', '.join(keys)}; Harmony needs at least 2"
            )
            raise NotApplicableError(msg)
        pca = PCABaseline(name=self.name, n_top_genes=self.parameters["n_top_genes"],
                          n_comps=self.parameters["n_comps"])
        base = pca.embed(dataset, seed=seed)
        info = {k: v for k, v in base.info.items() if k not in ("parameters", "n_dropped_cells")}
        n_loose = int(np.sum(codes < 0))
        if n_loose:
            record_warning(info, f"{self.name}: {n_loose} cells of {dataset.name} have no batch "
                                 f"({', '.join(keys)}); they are clustered but not corrected")
        result = harmonize(base.values, codes, seed=seed,
                           max_iter_harmony=self.parameters["max_iter_harmony"])
        info["harmony"] = {
            "batch_key": keys, "n_batches": len(names), "n_cells_without_batch": n_loose,
            "n_clusters": result.n_clusters, "n_iterations": result.n_iterations,
            "converged": result.converged, "seed": seed,
        }
        return self._embedding(result.corrected.astype(np.float32), info)


#: In-process baselines by ``implementation`` name.
BASELINES: dict[str, type[_Baseline]] = {
    cls.implementation: cls for cls in (PCABaseline, RawPCABaseline, RandomBaseline, HarmonyBaseline)
}
