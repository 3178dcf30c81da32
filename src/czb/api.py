"""The notebook API: score embeddings held in an AnnData with czb's tasks, as a tidy DataFrame.

:func:`evaluate` is an AnnData-facing layer over :func:`czb.evaluation.runner.evaluate`
(one call per embedding): it reads the cell annotations the way ``czb run`` reads a
dataset's (:func:`czb.pipeline.dataset_views.dataset_roles`), checks every embedding
with :func:`czb.models.embedding.check_embedding` before any scoring, and computes the
PCA baseline with :class:`czb.models.baselines.PCABaseline`. Nothing here computes a
metric. ``import czb`` stays light: heavy packages are imported inside the functions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from czb.core.errors import DatasetError, DatasetWarning, EmbeddingError, SpecError, UsageError

if TYPE_CHECKING:
    import anndata
    import numpy as np
    import pandas as pd

    from czb.data.dataset import Dataset
    from czb.evaluation.runner import TaskResult
    from czb.evaluation.task import Task

__all__ = ["COLUMNS", "DEFAULT_TASKS", "evaluate"]

#: The cell-level tasks scored when ``tasks`` is not given (as :func:`czb.evaluation.runner.evaluate`).
DEFAULT_TASKS = ("clustering", "embedding", "label_prediction", "batch_integration")
#: Columns of the DataFrame :func:`evaluate` returns, in order.
COLUMNS = ("model", "task", "metric", "params", "seed", "value", "status", "error")
#: The name the dataset gets in czb's messages (``dataset 'adata': ...``).
_NAME = "adata"


def evaluate(
    adata: anndata.AnnData,
    *,
    embedding: str | Sequence[str] | Mapping[str, Any] | None = None,
    tasks: Sequence[str | Task] = DEFAULT_TASKS,
    label_key: str = "cell_type",
    batch_key: str | Sequence[str] | None = None,
    extra_keys: Mapping[str, str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    baseline: bool = False,
    layer: str = "X",
    expression: str = "raw_counts",
    organism: str = "human",
    key_added: str | None = "czb",
    n_jobs: int = 1,
    exact: bool | None = None,
) -> pd.DataFrame:
    """Score the embeddings in ``adata.obsm`` (and optionally a PCA baseline) with czb's tasks.

    Each embedding is scored on every task through :func:`czb.evaluation.runner.evaluate`,
    exactly as ``czb run`` scores it: stochastic tasks once per seed, deterministic ones
    once (with the first seed); a task that does not apply to the data (e.g. batch
    integration without ``batch_key``) or fails becomes a row with its status and
    error, never an exception. Cells without a label (or batch) are left out of the
    tasks that need it, and counted.

    Everything is checked before any scoring: the obs columns, every embedding
    (2-D, numeric, one finite row per cell, not degenerate:
    :func:`~czb.models.embedding.check_embedding`), the task names and, with
    ``baseline``, the expression matrix (:func:`~czb.data.validation.validate_dataset`).

    Parameters
    ----------
    adata
        ``(n_cells, n_genes)`` AnnData. Read: ``obs[label_key]``, ``obs[batch_key]``,
        the ``extra_keys`` columns and the ``obsm`` embeddings; with ``baseline``, also
        the matrix named by ``layer``. Written: ``uns[key_added]`` only.
    embedding
        An ``obsm`` key (``"X_scVI"``), several (``["X_pca", "X_scVI"]``), or a mapping
        of model names to ``(n_cells, dim)`` arrays whose rows follow ``adata.obs``.
        ``None``: only the baseline (``baseline=True`` is then required).
    tasks
        Registered task names (default parameters; see ``czb list tasks``) or configured
        task objects (e.g. ``czb.evaluation.tasks.clustering.ClusteringTask(resolution=0.5)``).
    label_key
        obs column of the cell labels (e.g. cell types).
    batch_key
        obs column of the batches, or several joined into one batch label; ``None``:
        the batch tasks report ``not_applicable``.
    extra_keys
        Further roles to obs columns, e.g. ``{"time_point": "age"}`` for
        ``sequential_organization``.
    seeds
        Seeds of the stochastic steps (Leiden, cross-validation folds).
    baseline
        Also score czb's ``pca`` baseline computed from ``adata`` (model ``"pca"``:
        highly variable genes of log-normalised expression, 50 components,
        :class:`~czb.models.baselines.PCABaseline`).
    layer
        The baseline's expression matrix: ``"X"``, ``"raw"`` (``adata.raw.X``) or a
        ``layers`` key.
    expression
        What that matrix holds: ``"raw_counts"`` (normalised and log-transformed
        first) or ``"log_normalized"``.
    organism
        The cells' organism (checks the gene IDs of the baseline's matrix; the
        ``species`` role of cross-species tasks).
    key_added
        ``uns`` key of the summary written to ``adata`` (see Returns); ``None``:
        ``adata`` is left unchanged.
    n_jobs
        Worker processes for tasks that parallelise.
    exact
        Exact neighbour graph and silhouettes at any size (``True``), approximate ones
        (``False``), or by size (``None``); see :class:`~czb.evaluation.context.EvaluationContext`.

    Returns
    -------
    pandas.DataFrame
        One row per model × task × metric (× metric params) × seed, columns
        :data:`COLUMNS`: ``model`` (the obsm key, mapping key or ``"pca"``), ``task``,
        ``metric``, ``params`` (the metric's parameters as ``"key=value, ..."``, ``""``
        when none), ``seed`` (nullable integer), ``value`` (float), ``status``
        (``"ok"``) and ``error`` (``None``). A task that did not run gives one row
        with ``status`` ``"not_applicable"`` or ``"failed"``, ``error`` saying why,
        and no metric, seed or value (NaN). With ``key_added``,
        ``adata.uns[key_added]`` becomes ``{"summary": DataFrame, "params": dict}``:
        the summary has one row per model × task × metric × params of the ok rows,
        with ``mean``, ``std`` and ``n_seeds`` (writable to .h5ad).

    Raises
    ------
    DatasetError
        A key names no obs column; with ``baseline``, ``layer`` is missing or its
        matrix does not hold ``expression`` (e.g. scaled data).
    EmbeddingError
        A key names no obsm entry, or an embedding is not one finite numeric row per
        cell (NaN rows, wrong row count, constant...).
    UnknownNameError
        A task name is not registered.
    UsageError
        Nothing to score, no task or seed, or an embedding named like the baseline.

    Warns
    -----
    DatasetWarning
        Some cells have no label (they are left out of the tasks needing one).

    Examples
    --------
    >>> import scanpy as sc
    >>> import czb
    >>> adata = sc.datasets.pbmc68k_reduced()  # 700 cells; raw holds log-normalised values
    >>> scores = czb.evaluate(adata, embedding=["X_pca", "X_umap"], tasks=["clustering", "embedding"],
    ...                       label_key="louvain", batch_key="phase", seeds=(0,), baseline=True,
    ...                       layer="raw", expression="log_normalized")
    >>> scores.columns.tolist()
    ['model', 'task', 'metric', 'params', 'seed', 'value', 'status', 'error']
    >>> sorted(scores["model"].unique())
    ['X_pca', 'X_umap', 'pca']
    >>> ari = scores[scores["metric"] == "adjusted_rand_index"].set_index("model")["value"]
    >>> bool(ari["X_pca"] > 0.5)  # louvain was computed on X_pca's neighbours
    True
    >>> summary = adata.uns["czb"]["summary"]
    >>> summary.columns.tolist()
    ['model', 'task', 'metric', 'params', 'mean', 'std', 'n_seeds']
    """
    import pandas as pd

    from czb.evaluation.registry import get_task
    from czb.evaluation.runner import evaluate as score
    from czb.pipeline.dataset_views import dataset_roles

    # Everything is checked before any embedding or task runs.
    seeds = _checked_seeds(seeds)
    tasks = list(tasks)
    if not tasks:
        msg = "evaluate: no task given; pass tasks=[...] (see `czb list tasks`)"
        raise UsageError(msg)
    for task in tasks:
        if isinstance(task, str):
            get_task(task)  # an unknown name fails now, with the closest names
    ds = _annotations(adata, label_key=label_key, batch_key=batch_key, extra_keys=extra_keys,
                      organism=organism, layer=layer, expression=expression)
    embeddings = _embeddings(adata, embedding)
    if baseline:
        from czb.pipeline.baselines import BASELINE_MODEL

        if BASELINE_MODEL in embeddings:
            msg = (f"evaluate: an embedding is named {BASELINE_MODEL!r}, as the baseline is; "
                   "rename it (pass a mapping) or drop baseline=True")
            raise UsageError(msg)
        expression_ds = _expression_dataset(adata, ds)
    elif not embeddings:
        msg = "evaluate: nothing to score; pass embedding='<obsm key>' (or several), or baseline=True"
        raise UsageError(msg)
    roles = dataset_roles(ds)
    labels, batches = roles.pop("labels"), roles.pop("batch", None)

    # The baseline first: it is also the representation before integration (pcr_comparison).
    pca = _baseline_embedding(expression_ds, seed=seeds[0]) if baseline else None
    pre = None
    if pca is not None and pca.embedding is not None and pca.embedding.cell_index is None:
        pre = pca.embedding.values

    def scored(model: str, values: np.ndarray) -> list[dict[str, Any]]:
        results = score(values, labels=labels, batches=batches, roles=roles, tasks=tasks, seeds=seeds,
                        n_jobs=n_jobs, exact=exact, pre_integration=pre)
        return _rows(model, results)

    rows: list[dict[str, Any]] = []
    for model, values in embeddings.items():
        rows += scored(model, values)
    if pca is not None:
        rows += _baseline_rows(pca, tasks, scored=scored)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["seed"] = table["seed"].astype("Int64")
    table["value"] = table["value"].astype(float)
    if key_added is not None:
        adata.uns[key_added] = {
            "summary": _summary(table),
            "params": _params(embeddings, baseline=baseline, tasks=tasks, seeds=seeds, ds=ds),
        }
    return table


def _checked_seeds(seeds: Sequence[int]) -> list[int]:
    import numbers

    seeds = list(seeds) if not isinstance(seeds, numbers.Integral) else [seeds]
    bad = [s for s in seeds if not isinstance(s, numbers.Integral) or isinstance(s, bool) or s < 0]
    if not seeds or bad:
        msg = f"evaluate: seeds must be one or more non-negative integers; got {seeds!r}"
        raise UsageError(msg)
    return [int(s) for s in seeds]


def _annotations(
    adata: anndata.AnnData,
    *,
    label_key: str,
    batch_key: str | Sequence[str] | None,
    extra_keys: Mapping[str, str] | None,
    organism: str,
    layer: str,
    expression: str,
) -> Dataset:
    """``adata`` as a czb dataset, for its roles: a spec naming the obs columns (each
    checked to exist, as a loaded dataset's are) over ``adata`` itself (nothing is copied)."""
    from pydantic import ValidationError

    from czb.data.dataset import Dataset
    from czb.data.validation import check_obs_keys
    from czb.specs.schema import DatasetSpec

    batch = [batch_key] if isinstance(batch_key, str) else list(batch_key or [])
    extra = dict(extra_keys or {})
    try:
        spec = DatasetSpec(name=_NAME, uri="anndata:in-memory", organism=organism, label_key=label_key,
                           batch_key=batch or None, extra_keys=extra, layer=layer, expression=expression)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        msg = f"evaluate: {problems}"
        raise SpecError(msg) from None
    ds = Dataset(spec=spec, adata=adata)
    check_obs_keys(ds)
    return ds


def _embeddings(adata: anndata.AnnData, embedding: str | Sequence[str] | Mapping[str, Any] | None
                ) -> dict[str, np.ndarray]:
    """Each embedding by model name, checked (float32, finite, one row per cell)."""
    from czb.data.messages import available
    from czb.models.embedding import check_embedding

    if embedding is None:
        return {}
    if isinstance(embedding, Mapping):
        given = {str(name): (f"embedding {name!r}", values) for name, values in embedding.items()}
    else:
        keys = [embedding] if isinstance(embedding, str) else list(embedding)
        if not all(isinstance(key, str) for key in keys):
            msg = ("evaluate: embedding must be an obsm key, a list of them, or a mapping of names to "
                   f"arrays (e.g. {{'mine': array}}); got a {type(embedding).__name__}")
            raise UsageError(msg)
        given = {}
        for key in keys:
            if key not in adata.obsm:
                msg = (f"embedding {key!r} is not an obsm key of adata; "
                       f"available: {available(str(key), adata.obsm.keys())}")
                raise EmbeddingError(msg)
            given[key] = (f"adata.obsm[{key!r}]", adata.obsm[key])
    out = {}
    for model, (where, values) in given.items():
        # Cell IDs name offending rows when the rows are adata's cells.
        same_rows = getattr(values, "shape", (None,))[0] == adata.n_obs
        values = check_embedding(values, name=where, row_names=adata.obs_names if same_rows else None)
        if values.shape[0] != adata.n_obs:
            msg = (f"{where}: {values.shape[0]} rows, but adata has {adata.n_obs} cells; an embedding "
                   "needs one row per cell, in the order of adata.obs")
            raise EmbeddingError(msg)
        out[model] = values
    return out


def _expression_dataset(adata: anndata.AnnData, ds: Dataset) -> Dataset:
    """The baseline's input: the matrix ``layer`` names, with the obs of ``adata``, as a
    dataset checked by :func:`~czb.data.validation.validate_dataset` (values fit
    ``expression``; gene IDs fit the organism, their kind read from the names)."""
    import anndata as ad
    import pandas as pd

    from czb.data.gene_ids import MIN_ENSEMBL_SHARE, ensembl_share, gene_sample
    from czb.data.messages import available
    from czb.data.validation import validate_dataset

    spec, layer = ds.spec, ds.spec.layer
    if layer == "X" and adata.X is not None:
        X, genes = adata.X, adata.var_names
    elif layer == "raw" and adata.raw is not None:
        X, genes = adata.raw.X, adata.raw.var_names
    elif layer in adata.layers:
        X, genes = adata.layers[layer], adata.var_names
    else:
        have = ["X"] * (adata.X is not None) + ["raw"] * (adata.raw is not None) + list(adata.layers)
        msg = f"layer {layer!r} is not in adata (for the baseline); available: {available(layer, have)}"
        raise DatasetError(msg)
    genes = pd.Index(genes.astype(str), name=None)
    ensembl = ensembl_share(gene_sample(genes), spec.organism) >= MIN_ENSEMBL_SHARE
    spec = spec.model_copy(update={"gene_id_type": "ensembl" if ensembl else "symbol"})
    bare = ad.AnnData(X=X, obs=adata.obs.copy(), var=pd.DataFrame(index=genes))
    expression_ds = type(ds)(spec=spec, adata=bare)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no value in label_key", category=DatasetWarning)  # warned
        validate_dataset(expression_ds)
    return expression_ds


def _baseline_embedding(ds: Dataset, *, seed: int) -> Any:
    """The PCA baseline of ``ds`` (:class:`~czb.pipeline.scoring.Embedded`: its embedding,
    or its status and error)."""
    from czb.models.baselines import PCABaseline
    from czb.pipeline.scoring import embed_dataset

    return embed_dataset(PCABaseline(), ds, seed=seed)


def _baseline_rows(embedded: Any, tasks: Sequence[str | Task], *, scored: Any) -> list[dict[str, Any]]:
    """The PCA baseline's rows: scored as any embedding, or one row per task saying why
    the baseline has no embedding."""
    from czb.pipeline.baselines import BASELINE_MODEL

    if embedded.embedding is not None:
        return scored(BASELINE_MODEL, embedded.embedding.values)
    return [_row(BASELINE_MODEL, _task_name(t), status=embedded.status, error=embedded.error) for t in tasks]


def _task_name(task: str | Task) -> str:
    return task if isinstance(task, str) else task.info.name


def _row(model: str, task: str, *, metric: str | None = None, params: str = "", seed: int | None = None,
         value: float = float("nan"), status: str = "ok", error: str | None = None) -> dict[str, Any]:
    return {"model": model, "task": task, "metric": metric, "params": params, "seed": seed, "value": value,
            "status": status, "error": error}


def _rows(model: str, results: Sequence[TaskResult]) -> list[dict[str, Any]]:
    """One row per metric and seed of each ok result; one row per other result."""
    rows = []
    for result in results:
        if result.status != "ok":
            rows.append(_row(model, result.task, status=result.status, error=result.error))
            continue
        for metric in result.metrics:
            params = ", ".join(f"{k}={v}" for k, v in sorted(metric.params.items()))
            for seed, value in zip(result.seeds, metric.values_raw):
                rows.append(_row(model, result.task, metric=metric.name, params=params, seed=seed,
                                 value=float(value)))
    return rows


def _summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation and number of seeds per model × task × metric × params."""
    keys = ["model", "task", "metric", "params"]
    ok = table[table["status"] == "ok"]
    summary = ok.groupby(keys, sort=False)["value"].agg(mean="mean", std="std", n_seeds="count").reset_index()
    summary["n_seeds"] = summary["n_seeds"].astype("int64")
    return summary


def _params(embeddings: Mapping[str, Any], *, baseline: bool, tasks: Sequence[str | Task], seeds: Sequence[int],
            ds: Dataset) -> dict[str, Any]:
    """How the summary was made, in types an .h5ad file stores."""
    from czb import __version__
    from czb.pipeline.baselines import BASELINE_MODEL

    spec = ds.spec
    params: dict[str, Any] = {
        "czb_version": __version__,
        "models": list(embeddings) + ([BASELINE_MODEL] if baseline else []),
        "tasks": [_task_name(t) for t in tasks],
        "seeds": list(seeds),
        "label_key": spec.label_key,
        "organism": spec.organism,
    }
    if spec.batch_keys:
        params["batch_key"] = spec.batch_keys
    if spec.extra_keys:
        params["extra_keys"] = dict(spec.extra_keys)
    if baseline:
        params.update(layer=spec.layer, expression=spec.expression)
    return params
