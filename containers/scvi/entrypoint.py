"""scVI (czb entrypoint), two modes chosen by the model spec's ``mode`` parameter.

- ``census_query`` (model ``scvi``): query mapping onto the CELLxGENE Census scVI
  reference model, below.
- ``de_novo`` (model ``scvi_denovo``): an SCVI model trained on the dataset itself, the
  scIB baseline (:mod:`denovo`); it reads no weights.

Each spec allows its own mode only (``choices``), so ``--param`` cannot turn one model
into the other under the same name.

Census query mapping: weights expected under ``/weights``, one folder per organism, each
as published under ``s3://cellxgene-contrib-public/models/scvi/<census version>/<organism>/``::

    homo_sapiens/model.pt    scvi-tools save format: a torch pickle holding
    mus_musculus/model.pt    model_state_dict, var_names (Ensembl IDs), attr_dict

The Census models are SCVI models trained on the whole Census (8,000 highly variable
genes, 50 latent dimensions, negative binomial likelihood, batch = the concatenation of
``dataset_id``, ``assay``, ``suspension_type`` and ``donor_id``, batch not encoded).

Preprocessing and embedding, scvi-tools' own query path as the Census notebooks and
cz-benchmarks run it:

1. Raw counts keyed by Ensembl ID; the batch label is the concatenation of the
   ``request.batch_keys`` columns (Census style, no separator, so a cell from a dataset
   the Census holds gets the reference's own batch), or one batch when there are none.
2. ``SCVI.prepare_query_anndata`` zero-fills reference genes the query lacks and puts the
   genes in reference order; ``SCVI.load_query_data`` builds the scArches model with the
   reference weights (batch-dependent tensors grown for new batches).
3. ``max_epochs`` > 0 trains the query model with the reference weights frozen as
   scArches does (weight decay 0, so frozen weights stay exactly as published);
   ``max_epochs`` = 0 (the default, as the Census notebooks and cz-benchmarks do) skips
   training. The Census encoder takes no batch input, so both give the same latent.
4. The cell embedding is the mean of q(z | x) from ``get_latent_representation``.

Traps handled: query genes missing from the reference are zero-filled and counted, and
the run fails with a clear message when fewer than ``min_gene_fraction`` of the reference
genes are measured (wrong ID type or organism); Ensembl version suffixes are stripped and
duplicate IDs dropped; a reference whose tensors do not fill the model exactly fails with
``PartialLoadError``; a variant of another organism than the dataset's is not applicable.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# denovo and hvg (and, in the image, czb_container) sit beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import denovo
from czb_container import (
    ContractError,
    Job,
    ModelOutput,
    NotApplicable,
    PartialLoadError,
    main,
    resolve_device,
)

log = logging.getLogger("czb_container")

# czb organism name -> folder of the published reference (Census experiment name)
ORGANISM_FOLDERS = {"human": "homo_sapiens", "mouse": "mus_musculus"}
MODEL_FILE = "model.pt"
# Label of every cell when the dataset has no batch columns (as in the Census notebook)
SINGLE_BATCH = "unassigned"
# Registered fields the query cannot provide: a reference using them is not a Census model
UNSUPPORTED_SETUP_ARGS = (
    "labels_key",
    "size_factor_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)


@dataclass
class Reference:
    """What the published ``model.pt`` holds that the entrypoint checks and reports."""

    path: Path
    tensors: dict[str, Any]
    var_names: np.ndarray
    batch_key: str
    batches: list[str]
    layer: str | None
    init_params: dict[str, Any]
    scvi_version: str | None


def embed(job: Job) -> ModelOutput:
    """Run the mode the model spec names: Census query mapping or training de novo."""
    mode = job.parameter("mode")
    if mode == "census_query":
        return map_query(job)
    if mode == "de_novo":
        return train_de_novo(job)
    msg = f"unknown scVI mode {mode!r}; the image runs census_query or de_novo"
    raise ContractError(msg)


def train_de_novo(job: Job) -> ModelOutput:
    """Train SCVI on the dataset's counts, batch from ``request.batch_keys``; embed it."""
    request = job.request
    settings = denovo.Settings.from_job(job)
    device = resolve_device(request)
    adata = job.read_dataset()
    labels = batch_labels(adata, request.batch_keys)
    output = denovo.train_and_embed(
        adata, labels, settings, seed=request.seed, device=device, batch_size=request.batch_size
    )
    output.info["batch_keys"] = list(request.batch_keys)
    return output


def map_query(job: Job) -> ModelOutput:
    """Map the dataset onto the Census scVI reference and return its latent means."""
    request = job.request
    job.require_organism(ORGANISM_FOLDERS)
    folder = ORGANISM_FOLDERS[request.organism]
    if request.variant is not None and request.variant != folder:
        msg = (
            f"variant {request.variant} is another organism's reference; "
            f"dataset organism {request.organism} needs variant {folder}"
        )
        raise NotApplicable(msg)
    model_dir = job.weights_path(folder)
    reference = read_reference(job.weights_path(folder, MODEL_FILE))
    max_epochs = int(job.parameter("max_epochs"))
    min_gene_fraction = float(job.parameter("min_gene_fraction"))
    device = resolve_device(request)

    import scvi

    # Seeds lightning, torch, numpy and random the way scvi-tools does itself.
    scvi.settings.seed = request.seed
    adata = job.read_dataset()
    ids = gene_ids(adata, request.gene_id_type)
    query, info = query_anndata(adata, ids, reference, request.batch_keys, min_gene_fraction)

    # Zero-fills the reference genes the query lacks and orders genes as the reference.
    scvi.model.SCVI.prepare_query_anndata(query, str(model_dir))
    accelerator = "gpu" if device == "cuda" else "cpu"
    try:
        model = scvi.model.SCVI.load_query_data(query, str(model_dir), accelerator=accelerator)
    except KeyError as e:
        # load_query_data looks every checkpoint tensor up in the new module by name.
        msg = f"{reference.path}: checkpoint tensor {e} has no place in the SCVI module"
        raise PartialLoadError(msg) from e
    except RuntimeError as e:
        # Its final load_state_dict is strict: a missing tensor ends up here.
        if "state_dict" not in str(e):
            raise
        msg = f"{reference.path}: {e}"
        raise PartialLoadError(msg) from e
    n_loaded = check_reference_loaded(model.module, reference)

    if max_epochs > 0:
        # scArches query training: gradients of reference weights are zeroed by hooks;
        # scvi's default weight decay (1e-6) would still nudge them, so it is off.
        model.train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=1,
            batch_size=request.batch_size,
            plan_kwargs={"weight_decay": 0.0},
            enable_progress_bar=False,
        )
    else:
        # Forward pass only, as the Census notebooks and cz-benchmarks do.
        model.is_trained = True
    latent = model.get_latent_representation(batch_size=request.batch_size)

    info.update(
        {
            "mode": "census_query",
            "query_training_epochs": max_epochs,
            "reference_scvi_version": reference.scvi_version,
            "n_latent": int(latent.shape[1]),
            "reference_init_params": reference.init_params,
            "scvi_device": device,
        }
    )
    return ModelOutput(latent, list(query.obs_names), n_weight_tensors=n_loaded, info=info)


def read_reference(path: Path) -> Reference:
    """Read the scvi-tools ``model.pt`` and check it is an SCVI reference we can map onto.

    Raises
    ------
    ValueError
        When the file is not an scvi-tools save, or registers covariates a query
        cannot provide.
    """
    import torch

    # scvi-tools saves pickled registries (numpy, pandas objects), not plain tensors.
    saved = torch.load(path, map_location="cpu", weights_only=False)
    expected = {"model_state_dict", "var_names", "attr_dict"}
    if not isinstance(saved, dict) or not expected <= set(saved):
        msg = f"{path}: not an scvi-tools model save (expected {', '.join(sorted(expected))})"
        raise ValueError(msg)
    attr_dict = saved["attr_dict"]
    registry = attr_dict.get("registry_") or {}
    if registry.get("model_name", "SCVI") != "SCVI" or "init_params_" not in attr_dict:
        msg = f"{path}: holds a {registry.get('model_name')} model, not an SCVI reference"
        raise ValueError(msg)
    setup_args = registry.get("setup_args") or {}
    used = [k for k in UNSUPPORTED_SETUP_ARGS if setup_args.get(k)]
    if used:
        msg = f"{path}: the reference registers {', '.join(used)}, which a czb query cannot provide"
        raise ValueError(msg)
    batch_key = setup_args.get("batch_key")
    if not batch_key:
        msg = f"{path}: the reference has no batch key; the Census models register 'batch'"
        raise ValueError(msg)
    batch_state = registry["field_registries"]["batch"]["state_registry"]
    init = attr_dict["init_params_"]
    # The checkpoint also carries a (here empty) pyro parameter store: not a weight tensor.
    tensors = {k: v for k, v in saved["model_state_dict"].items() if isinstance(v, torch.Tensor)}
    return Reference(
        path=path,
        tensors=tensors,
        var_names=np.asarray(saved["var_names"]).astype(str),
        batch_key=batch_key,
        batches=[str(b) for b in batch_state["categorical_mapping"]],
        layer=setup_args.get("layer"),
        # scvi-tools keeps init arguments as non_kwargs plus nested kwargs dicts
        init_params={
            **init.get("non_kwargs", {}),
            **{k: v for d in init.get("kwargs", {}).values() for k, v in d.items()},
        },
        scvi_version=registry.get("scvi_version"),
    )


def query_anndata(
    adata, ids: np.ndarray, reference: Reference, batch_keys, min_gene_fraction: float
):
    """The query AnnData scvi-tools expects: counts by Ensembl ID, one batch column.

    ``ids`` are the Ensembl IDs of ``adata``'s genes, in order.

    Returns
    -------
    The query (reference genes it measures, raw counts, ``obs[reference.batch_key]``) and
    the gene and batch counts for ``meta.json``.

    Raises
    ------
    ValueError
        When fewer than ``min_gene_fraction`` of the reference genes are measured.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    in_reference = np.isin(ids, reference.var_names)
    # Keep the first of duplicated IDs (e.g. two symbols mapped to one gene).
    duplicated = pd.Index(ids).duplicated() & (ids != "")
    keep = in_reference & ~duplicated
    n_matched = int(keep.sum())
    fraction = n_matched / len(reference.var_names)
    log.info(
        "genes: %d of %d reference genes measured (%.1f%%)",
        n_matched,
        len(reference.var_names),
        100 * fraction,
    )
    if fraction < min_gene_fraction:
        example = ", ".join(ids[:3])
        msg = (
            f"only {n_matched} of the {len(reference.var_names)} reference genes "
            f"({fraction:.1%}) are in the dataset, below min_gene_fraction "
            f"{min_gene_fraction:.0%}; the reference expects Ensembl IDs of its organism "
            f"(dataset genes: {example}, ...)"
        )
        raise ValueError(msg)

    counts = sp.csr_matrix(adata.X)[:, np.flatnonzero(keep)].astype(np.float32)
    labels = batch_labels(adata, batch_keys)
    query = ad.AnnData(X=counts)
    query.obs_names = adata.obs_names.astype(str)
    query.var_names = ids[keep]
    query.obs[reference.batch_key] = labels
    if reference.layer:
        query.layers[reference.layer] = query.X.copy()
    known = set(reference.batches)
    query_batches = sorted(set(labels))
    info = {
        "reference_genes": len(reference.var_names),
        "genes_matched": n_matched,
        "gene_match_fraction": round(fraction, 6),
        "genes_zero_filled": len(reference.var_names) - n_matched,
        "dataset_genes_not_in_reference": int((~in_reference).sum()),
        "dataset_genes_duplicated": int(duplicated.sum()),
        "batch_keys": list(batch_keys),
        "query_batches": len(query_batches),
        "query_batches_in_reference": sum(b in known for b in query_batches),
        "reference_batches": len(reference.batches),
    }
    return query, info


def gene_ids(adata, gene_id_type: str) -> np.ndarray:
    """Ensembl IDs of the dataset's genes, without version suffix ('' where unknown)."""
    if gene_id_type == "ensembl":
        ids = adata.var_names
    elif "ensembl_id" in adata.var:
        # A dataset keyed by symbols still works when the host filled var['ensembl_id'].
        ids = adata.var["ensembl_id"]
    else:
        msg = (
            f"the Census reference needs Ensembl gene IDs; dataset has {gene_id_type} IDs "
            "and no var['ensembl_id']"
        )
        raise ContractError(msg)
    # Census IDs carry no version: ENSG00000141510.17 -> ENSG00000141510
    return np.array(
        [re.sub(r"\.\d+$", "", i) if isinstance(i, str) else "" for i in ids], dtype=str
    )


def batch_labels(adata, batch_keys) -> np.ndarray:
    """Census-style batch label: the batch columns' values concatenated as strings (one
    label for every cell without batch columns)."""
    if not batch_keys:
        return np.full(adata.n_obs, SINGLE_BATCH, dtype=object)
    missing = [k for k in batch_keys if k not in adata.obs]
    if missing:
        msg = f"batch column(s) {', '.join(missing)} named in the request are not in the obs"
        raise ContractError(msg)
    columns = [adata.obs[k].astype(str).to_numpy(dtype=object) for k in batch_keys]
    return functools.reduce(lambda a, b: a + b, columns)


def check_reference_loaded(module, reference: Reference) -> int:
    """Check that every module tensor holds the reference's values; return how many.

    ``load_query_data`` grows batch-dependent tensors (one more column per new batch)
    and loads strictly; this checks the result independently: same names both ways,
    each reference tensor equal to the matching leading slice of the module's.

    Raises
    ------
    PartialLoadError
        Naming the tensors that are missing, extra, or not the reference's.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(reference.tensors))
    unexpected = sorted(set(reference.tensors) - set(own))
    different = []
    for name in sorted(set(own) & set(reference.tensors)):
        ref, mine = reference.tensors[name], own[name].detach().cpu()
        if ref.dim() != mine.dim() or any(
            r > m for r, m in zip(ref.shape, mine.shape, strict=True)
        ):
            different.append(f"{name} {tuple(ref.shape)} vs {tuple(mine.shape)}")
            continue
        for dim, size in enumerate(ref.shape):
            mine = mine.narrow(dim, 0, size)
        if not bool((mine == ref.to(mine.dtype)).all()):
            different.append(name)
    if missing or unexpected or different:
        parts = [
            f"{len(items)} {label} ({', '.join(items[:5])}{', ...' if len(items) > 5 else ''})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("not loaded", different),
            )
            if items
        ]
        msg = f"{reference.path}: partial load of {len(own)} model tensors: " + "; ".join(parts)
        raise PartialLoadError(msg)
    return len(reference.tensors)


if __name__ == "__main__":
    main(embed, model="scvi", package="scvi-tools")
