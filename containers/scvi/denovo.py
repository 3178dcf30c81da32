"""scVI trained de novo on the dataset's own counts: the ``de_novo`` mode of the scvi image.

The scIB baseline (Luecken et al. 2022, ``scib.integration.scvi``): an SCVI model with
30 latent dimensions, 2 hidden layers of 128 units and a negative binomial likelihood,
trained on all cells (``train_size`` 1.0) of the 2,000 batch-aware highly variable genes
(:mod:`hvg`), batch = the dataset's batch label; the cell embedding is the mean of
q(z | x). ``max_epochs`` 0 leaves the number of epochs to scvi-tools
(``get_max_epochs_heuristic``: min(round(20,000 / cells × 400), 400), at least 1), as
scIB does. Every choice is a parameter of the model spec, with these defaults.

Refused: a dataset whose values are not non-negative integers (scVI's likelihood is a
count model; normalised or log-transformed data would train without complaint).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from czb_container import Job, ModelOutput
from hvg import select_genes

log = logging.getLogger("czb_container")

#: Label of the registered batch column in the training AnnData.
BATCH_COLUMN = "batch"
#: scvi-tools moves a last minibatch this small to validation when it can, because
#: BatchNorm cannot train on one cell; with every cell in training it is dropped instead.
SMALL_LAST_BATCH = 3
#: Non-zero values checked at a time for being counts.
CHECK_CHUNK = 10_000_000


@dataclass(frozen=True)
class Settings:
    """The model spec's parameters of the de novo mode."""

    n_top_genes: int
    n_latent: int
    n_hidden: int
    n_layers: int
    gene_likelihood: str
    max_epochs: int
    train_size: float
    train_batch_size: int

    @classmethod
    def from_job(cls, job: Job) -> Settings:
        return cls(
            n_top_genes=int(job.parameter("n_top_genes")),
            n_latent=int(job.parameter("n_latent")),
            n_hidden=int(job.parameter("n_hidden")),
            n_layers=int(job.parameter("n_layers")),
            gene_likelihood=str(job.parameter("gene_likelihood")),
            max_epochs=int(job.parameter("max_epochs")),
            train_size=float(job.parameter("train_size")),
            train_batch_size=int(job.parameter("train_batch_size")),
        )


def check_counts(counts) -> None:
    """Refuse a CSR matrix whose stored values are not finite non-negative integers.

    Raises
    ------
    ValueError
        Saying how many stored values are not counts (never the values themselves).
    """
    values = counts.data
    bad = 0
    for start in range(0, values.size, CHECK_CHUNK):
        chunk = np.asarray(values[start : start + CHECK_CHUNK], dtype=np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(chunk) & (chunk >= 0) & (chunk == np.floor(chunk))
        bad += int(np.count_nonzero(~ok))
    if bad:
        msg = (
            f"scVI de novo trains on raw counts, but {bad} of the dataset's {values.size} stored "
            "values are not non-negative integers (normalised or log-transformed data?)"
        )
        raise ValueError(msg)


def train_and_embed(
    adata, labels: np.ndarray, settings: Settings, *, seed: int, device: str, batch_size: int
) -> ModelOutput:
    """Train SCVI on ``adata``'s counts with one batch per distinct label; embed every cell.

    ``batch_size`` cells go through the encoder at a time for the embedding; training uses
    ``settings.train_batch_size``.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import scvi

    counts = sp.csr_matrix(adata.X)
    check_counts(counts)
    genes = select_genes(counts, labels, settings.n_top_genes)
    log.info("training on %d of %d genes", len(genes), adata.n_vars)

    data = ad.AnnData(X=counts[:, genes].astype(np.float32))
    data.obs_names = adata.obs_names.astype(str)
    data.var_names = adata.var_names[genes].astype(str)
    data.obs[BATCH_COLUMN] = pd.Categorical(np.asarray(labels).astype(str))
    # Seeds lightning, torch, numpy and random the way scvi-tools does itself.
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(data, batch_key=BATCH_COLUMN)
    model = scvi.model.SCVI(
        data,
        n_latent=settings.n_latent,
        n_hidden=settings.n_hidden,
        n_layers=settings.n_layers,
        gene_likelihood=settings.gene_likelihood,
    )
    n_train = math.ceil(settings.train_size * data.n_obs)
    drop_last = 0 < n_train % settings.train_batch_size < SMALL_LAST_BATCH
    model.train(
        # None: scvi-tools' own rule for the number of epochs.
        max_epochs=settings.max_epochs or None,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        train_size=settings.train_size,
        batch_size=settings.train_batch_size,
        datasplitter_kwargs={"drop_last": True} if drop_last else None,
        enable_progress_bar=False,
    )
    latent = model.get_latent_representation(batch_size=batch_size)
    elbo = model.history["elbo_train"]
    info: dict[str, Any] = {
        "mode": "de_novo",
        "settings": asdict(settings),
        "training_epochs": len(elbo),
        "epochs_from": "parameter" if settings.max_epochs else "scvi-tools heuristic",
        "train_elbo_last": float(elbo.iloc[-1, 0]),
        "training_cells": n_train,
        "last_small_batch_dropped": bool(drop_last),
        "genes_used": len(genes),
        "dataset_genes": int(adata.n_vars),
        "n_batch": int(model.summary_stats.n_batch),
        "n_latent": int(latent.shape[1]),
        "scvi_device": device,
    }
    return ModelOutput(latent, list(data.obs_names), n_weight_tensors=0, info=info)
