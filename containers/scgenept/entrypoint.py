"""scGenePT perturbation predictions through the authors' code (czi-ai/scGenePT).

scGenePT (Istrate, Li and Karaletsos 2024) is scGPT fine-tuned to predict the expression
of a cell after a genetic perturbation, with language embeddings of the genes (GPT-3.5
embeddings of NCBI gene summaries, UniProt protein summaries or GO annotations) added to
scGPT's gene tokens. The image holds the repository at the commit in
``scgenept_source.COMMIT`` on ``PYTHONPATH``; this entrypoint calls its published
functions, as the repository's tutorial and ``evaluate-perturbation.py`` do:

- ``utils.data_loading.load_trained_scgenept_model(adata, model_type, models_dir,
  model_location, device)`` builds the ``models.scGenePT.scGenePT`` model for the genes of
  ``adata.var["gene_name"]`` and loads a fine-tuned checkpoint with torch's strict
  ``load_state_dict``; it returns the model and each gene's index in scGPT's vocabulary;
- ``scGenePT.pred_perturb_from_ctrl(adata_ctrl, perturbation, gene_names, device,
  gene_ids, amp, pool_size, return_mean=True)`` flags the perturbed genes in control cells
  drawn at random (with replacement, numpy's global generator), runs the model on each
  and returns the mean predicted expression, shape ``(1, n_genes)``.

Weights under ``/weights``, laid out as the authors' ``models/`` folder, with every ``+``
of a published name written ``_`` (czb's file names have no ``+``)::

    pretrained/scgpt/vocab.json                   scGPT's gene vocabulary
    gene_embeddings/<file>                        the variant's language embeddings (none for scgpt)
    finetuned/<model>/<dataset>/<checkpoint>.pt   one fine-tuned checkpoint

``<model>`` names the model type (table :data:`MODEL_TYPES`), ``<dataset>`` the screen it
was fine-tuned on (GEARS' ``norman``). The loader finds the vocabulary and the language
embeddings by the authors' names under one ``models_dir``: a folder under ``/tmp`` links
those names to the staged files.

Request ``perturbation_expression_shift``: the control cells of ``dataset.h5ad`` (raw
counts) are log-normalised as GEARS' data are (``log1p(counts / total × 1e4)``, the
contract's prediction scale) and are the pool each test condition is predicted from; one
row per ``request.test_conditions`` entry. A condition whose perturbed gene is not among
the input genes, or has no scGPT token, cannot be put to the model (it flags a position
in the input): the run is then not applicable, naming those conditions.

Request ``perturbation_masked_gene``: not applicable. scGenePT maps a control cell and a
perturbation to a perturbed cell; it was never trained to fill in hidden entries of an
observed cell, and no published function does that.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import tempfile
import types
import warnings
from pathlib import Path

import numpy as np

# torchtext_shim, scgenept_source (and, in the image, czb_container) sit beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torchtext_shim

torchtext_shim.install()


def install_torchtext_table() -> None:
    """Register ``torchtext._torchtext``, whose ``Vocab`` scGenePT's model module imports.

    ``models/scGenePT.py`` imports torchtext's compiled ``Vocab`` table at load time
    without using it; the shim's :class:`~torchtext_shim.VocabTable` is that table.
    """
    if "torchtext._torchtext" in sys.modules:
        return
    table = types.ModuleType("torchtext._torchtext")
    table.Vocab = torchtext_shim.VocabTable
    sys.modules["torchtext._torchtext"] = table
    sys.modules["torchtext"]._torchtext = table


install_torchtext_table()

with warnings.catch_warnings():
    # scgpt (imported by scGenePT's modules) warns that flash-attn is missing: expected,
    # scGenePT's loader builds torch attention for inference.
    warnings.filterwarnings("ignore", message="flash_attn is not installed")
    from utils.data_loading import (
        GENE_EMBED_TYPE2LOCATION,
        get_embs_to_include,
        load_trained_scgenept_model,
    )

import scgenept_source
from czb_container import (
    TASK_EXPRESSION_SHIFT,
    TASK_MASKED_GENE,
    ContractError,
    Job,
    NotApplicable,
    PredictionOutput,
    main,
    resolve_device,
)

log = logging.getLogger("czb_container")

ORGANISMS = ("human",)
#: Fine-tuned checkpoint folder as staged (``finetuned/<model>/``: the authors' model zoo
#: names, ``+`` written ``_``) -> the scGenePT model type its loader takes (``train.py
#: --model-type``) and the key of its language embeddings in
#: ``utils.data_loading.GENE_EMBED_TYPE2LOCATION`` (None: scGPT alone, no language embeddings).
MODEL_TYPES = {
    "scgenept_ncbi": ("scgenept_ncbi_gpt", "ncbi_gpt"),
    "scgenept_ncbi_uniprot": ("scgenept_ncbi+uniprot_gpt", "ncbi+uniprot_gpt"),
    "scgenept_go_c": ("scgenept_go_c_gpt_concat", "go_c_gpt_concat"),
    "scgenept_go_f": ("scgenept_go_f_gpt_concat", "go_f_gpt_concat"),
    "scgenept_go_p": ("scgenept_go_p_gpt_concat", "go_p_gpt_concat"),
    "scgenept_go_all": ("scgenept_go_all_gpt_concat", "go_all_gpt_concat"),
    "scgpt": ("scgpt", None),
}
VOCAB_FILE = "pretrained/scgpt/vocab.json"  # under the authors' models_dir and /weights
CONTROL = "ctrl"  # scGenePT's (GEARS') name of the control condition
TARGET_SUM = 1e4


def find_checkpoint(weights_dir: Path) -> tuple[Path, str, str]:
    """The one fine-tuned checkpoint under ``finetuned/<model>/<dataset>/``.

    Returns
    -------
    (path, model folder, dataset the checkpoint was fine-tuned on)

    Raises
    ------
    ContractError
        None or several checkpoints, or a model folder this entrypoint does not know.
    """
    found = sorted((weights_dir / "finetuned").glob("*/*/*.pt"))
    if len(found) != 1:
        shown = ", ".join(str(p.relative_to(weights_dir)) for p in found[:5]) or "none"
        msg = (
            f"expected exactly one fine-tuned checkpoint at {weights_dir}/finetuned/<model>/<dataset>/*.pt, "
            f"found {len(found)} ({shown}); stage one variant with `czb models fetch-weights scgenept`"
        )
        raise ContractError(msg)
    path = found[0]
    folder, dataset = path.parent.parent.name, path.parent.name
    if folder not in MODEL_TYPES:
        msg = f"unknown scGenePT model folder finetuned/{folder}; known: {', '.join(MODEL_TYPES)}"
        raise ContractError(msg)
    return path, folder, dataset


def staged_name(published: str) -> str:
    """Where a published file is staged under ``/weights``: its path, ``+`` written ``_``."""
    return published.replace("+", "_")


def authors_models_dir(job: Job, embedding_key: str | None) -> str:
    """A ``models_dir`` for scGenePT's loader: the authors' file names linked to ``/weights``.

    The loader joins ``models_dir`` with ``pretrained/scgpt/vocab.json`` and with the
    model type's ``GENE_EMBED_TYPE2LOCATION`` entry, as strings (so the result ends in
    ``/``). Missing staged files fail here, naming the file.
    """
    published = [VOCAB_FILE] + ([GENE_EMBED_TYPE2LOCATION[embedding_key]] if embedding_key else [])
    folder = Path(tempfile.mkdtemp(prefix="scgenept-models-"))
    atexit.register(shutil.rmtree, folder, True)  # links only; the files stay in /weights
    for name in published:
        target = job.weights_path(*staged_name(name).split("/"))
        link = folder / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target.resolve())
    return str(folder) + "/"


def gene_symbols(adata, gene_id_type: str) -> list[str]:
    """Gene symbols of the input: ``var_names``, or ``var['gene_symbol']`` for Ensembl IDs."""
    if gene_id_type == "symbol":
        return [str(g) for g in adata.var_names]
    if "gene_symbol" in adata.var:
        return [str(g) for g in adata.var["gene_symbol"]]
    msg = "scGenePT's genes are symbols; the dataset has Ensembl IDs and no var['gene_symbol']"
    raise ContractError(msg)


def perturbed_genes(condition: str, control_label: str | None) -> list[str]:
    """The genes a czb condition perturbs (``GENE``, ``GENEA+GENEB``; none for the control)."""
    if condition == control_label:
        return []
    return [g for g in condition.split("+") if g and g not in (control_label, CONTROL)]


def scgenept_condition(genes: list[str]) -> str:
    """The condition as scGenePT (GEARS) names it: ``ctrl``, ``GENE+ctrl``, ``GENEA+GENEB``."""
    if not genes:
        return CONTROL
    return f"{genes[0]}+{CONTROL}" if len(genes) == 1 else "+".join(genes)


def log_normalise(counts):
    """``log1p(counts / total × 1e4)`` per cell, CSR float32: GEARS' scale, scGenePT's input."""
    import scipy.sparse as sp

    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.diags(TARGET_SUM / totals) @ counts
    scaled.data = np.log1p(scaled.data)
    return sp.csr_matrix(scaled, dtype=np.float32)


def unencodable(conditions: list[str], control_label: str | None, genes: list[str],
                vocab: dict) -> list[str]:
    """Conditions scGenePT cannot be given, each with why (empty when all can)."""
    positions: dict[str, int] = {}
    for gene in genes:
        positions[gene] = positions.get(gene, 0) + 1
    problems = []
    for condition in conditions:
        for gene in perturbed_genes(condition, control_label):
            if positions.get(gene, 0) == 0:
                problems.append(f"{condition} ({gene} is not among the input genes)")
            elif positions[gene] > 1:
                problems.append(f"{condition} ({gene} names {positions[gene]} input genes)")
            elif gene not in vocab:
                problems.append(f"{condition} ({gene} has no token in scGPT's vocabulary)")
    return problems


def predict(job: Job) -> PredictionOutput:
    """Predict each test condition's mean log-normalised expression with scGenePT.

    Parameters
    ----------
    job
        The contract's job; its parameter ``pool_size``: control cells drawn (with
        replacement) for each condition, 0 for as many as there are control cells.

    Returns
    -------
    PredictionOutput
        One row per ``request.test_conditions`` entry, one column per input gene.
    """
    import anndata as ad
    import pandas as pd

    request = job.request
    if request.task == TASK_MASKED_GENE:
        msg = (
            "scGenePT predicts a perturbed cell from a control cell and a perturbation; it "
            "does not fill in hidden entries of observed cells (no published function does)"
        )
        raise NotApplicable(msg)
    if request.task != TASK_EXPRESSION_SHIFT:
        msg = f"scGenePT is a perturbation predictor; it does not answer {request.task!r} requests"
        raise NotApplicable(msg)
    job.require_organism(ORGANISMS)
    device = resolve_device(request)
    pool_size = int(job.parameter("pool_size"))

    checkpoint, folder, finetuned_on = find_checkpoint(job.weights_dir)
    model_type, embedding_key = MODEL_TYPES[folder]
    models_dir = authors_models_dir(job, embedding_key)
    vocab = json.loads(Path(models_dir, VOCAB_FILE).read_text())

    adata = job.read_dataset()
    genes = gene_symbols(adata, request.gene_id_type)
    conditions = [str(c) for c in request.test_conditions]
    if not conditions:
        msg = "request.test_conditions is empty: nothing to predict"
        raise ContractError(msg)
    if request.condition_key not in adata.obs:
        msg = f"dataset has no obs column {request.condition_key!r} (the request's condition_key)"
        raise ContractError(msg)
    problems = unencodable(conditions, request.control_label, genes, vocab)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        msg = (
            f"scGenePT flags a perturbed gene's position in its input, so {len(problems)} of "
            f"{len(conditions)} test conditions cannot be given to it: {shown}"
        )
        raise NotApplicable(msg)

    is_control = np.asarray(adata.obs[request.condition_key].astype(str) == str(request.control_label))
    counts = adata.X[np.flatnonzero(is_control)]
    totals = np.asarray(counts.sum(axis=1)).ravel()
    n_empty = int((totals <= 0).sum())
    counts = counts[totals > 0]
    if counts.shape[0] == 0:
        msg = f"no control cells ({request.condition_key} == {request.control_label!r}) with any counts"
        raise ContractError(msg)
    if n_empty:
        log.warning("scGenePT: %d control cells without counts left out", n_empty)
    # The loader reads the genes from var["gene_name"] (and writes var["id_in_vocab"]).
    controls = ad.AnnData(
        X=log_normalise(counts),
        var=pd.DataFrame({"gene_name": genes}, index=pd.Index([str(g) for g in adata.var_names])),
    )
    model, gene_ids = load_trained_scgenept_model(
        controls, model_type, models_dir, str(checkpoint), device, verbose=False
    )
    # The loader's load_state_dict is strict: every tensor of the model came from the checkpoint.
    n_tensors = len(model.state_dict())
    log.info("scGenePT %s (fine-tuned on %s): %d tensors loaded from %s",
             model_type, finetuned_on, n_tensors, checkpoint.name)

    amp = device == "cuda"  # mixed precision on GPU, as the authors' tutorial runs it
    draws = pool_size if pool_size > 0 else None  # None: as many draws as control cells
    predictions = np.zeros((len(conditions), len(genes)), dtype=np.float32)
    for row, condition in enumerate(conditions):
        perturbation = scgenept_condition(perturbed_genes(condition, request.control_label))
        mean = model.pred_perturb_from_ctrl(
            controls, perturbation, list(genes), device, gene_ids,
            amp=amp, pool_size=draws, return_mean=True,
        )
        mean = np.asarray(mean, dtype=np.float32)
        if mean.shape != (1, len(genes)):
            msg = f"pred_perturb_from_ctrl returned shape {mean.shape} for {len(genes)} genes"
            raise ContractError(msg)
        predictions[row] = mean[0]
        log.info("scGenePT: %d/%d %s", row + 1, len(conditions), perturbation)

    n_in_vocab = sum(1 for g in genes if g in vocab)
    return PredictionOutput(
        predictions,
        conditions,
        [str(g) for g in adata.var_names],
        n_weight_tensors=n_tensors,
        info={
            "package": f"github.com/{scgenept_source.REPOSITORY}",
            "version": scgenept_source.COMMIT,
            "model_type": model_type,
            "gene_representations": list(get_embs_to_include(model_type)),
            "finetuned_on": finetuned_on,
            "checkpoint": str(checkpoint.relative_to(job.weights_dir)),
            "n_genes_input": len(genes),
            "n_genes_in_vocab": n_in_vocab,
            "n_control_cells": int(controls.n_obs),
            "n_control_cells_without_counts": n_empty,
            "controls_per_condition": draws if draws is not None else int(controls.n_obs),
            "mixed_precision": amp,
            "prediction": "mean over control cells drawn with replacement of scGenePT's "
                          "predicted log-normalised expression (pred_perturb_from_ctrl)",
        },
    )


if __name__ == "__main__":
    main(predict, model="scgenept")
