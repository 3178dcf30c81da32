"""Geneformer cell embeddings with the published Geneformer code as ``helical`` packages it.

Weights expected under ``/weights`` (files of the Hugging Face repository
``ctheodoris/Geneformer``, renamed so every variant has the same layout)::

    model/config.json              BertForMaskedLM config of the variant
    model/model.safetensors        its weights (or model/pytorch_model.bin)
    token_dictionary.pkl           Ensembl ID -> token (e.g. token_dictionary_gc95M.pkl)
    gene_median_dictionary.pkl     Ensembl ID -> non-zero median over the pretraining corpus
    ensembl_mapping_dict.pkl       Ensembl ID -> Ensembl ID (helical reads it, see below)

Preprocessing is helical's ``TranscriptomeTokenizer`` (Geneformer's rank value encoding):
counts of each cell are scaled to 10,000 total, divided by each gene's corpus median,
and the expressed genes of the token dictionary are ranked by that value; the top
genes fill the model's input (``max_position_embeddings``: 4,096 tokens, ``<cls>`` first
and ``<eos>`` last, for V2 models; 2,048 tokens and no special tokens for V1).

The cell embedding, as cz-benchmarks extracts it (Geneformer's ``EmbExtractor`` with
``emb_layer=-1``): the hidden states of the penultimate layer; the ``<cls>`` position
for models whose dictionary has ``<cls>`` (V2), else the mean over the gene tokens
(V1, which has no ``<cls>``). Parameters ``emb_layer`` (0: last layer, -1: penultimate,
Geneformer's convention; helical's own default is the last layer) and ``emb_mode``
(``cls`` or ``cell``; ``auto`` the above) override this; their defaults are in the
model spec (``configs/models/geneformer.yaml``), and the host sends both.

Traps handled:

- Geneformer identifies genes by Ensembl ID only: the IDs come from ``var_names``
  (``gene_id_type: ensembl``) or ``var['ensembl_id']``, version suffixes removed;
  symbols alone fail with a clear error (helical would map symbols through a network
  service, which the container cannot reach).
- ``from_pretrained`` only reports missing or unexpected tensors (and helical silences
  transformers' warnings): the loading info is checked, and any mismatch raises
  ``PartialLoadError``.
- helical's ``get_embs`` passes CUDA tensors to ``np.array`` in ``cls`` mode; the batch
  loop here uses helical's padding, masking and pooling helpers and moves results to the
  CPU itself.
- A cell with no expressed gene of the token dictionary has nothing to rank (its mean
  embedding would be 0/0): it is dropped and counted. helical keeps it (NaN in ``cell``
  mode, the state of ``<cls><eos>`` alone in ``cls`` mode).

Left as helical 2.2.0 does it (``test_parity.py`` compares with helical): its tokenizer maps
the IDs through ``ensembl_mapping_dict`` into a column it then does not use, and looks genes
up by their own ID, so a retired ID is not mapped onto its current one (Geneformer's own
tokenizer does map it).

Not left as helical does it: a dataset with the same Ensembl ID in two columns (e.g.
``ENSG….1`` and ``ENSG….2``, equal once the version is removed) stops helical's tokenizer
with ``KeyError: 'ensembl_id'``; here such columns are summed into the first, as
Geneformer's own tokenizer collapses them, and counted in ``n_genes_merged``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from czb_container import (
    ContractError,
    Job,
    ModelOutput,
    PartialLoadError,
    main,
    resolve_device,
)
from helical.models.geneformer.geneformer_tokenizer import TranscriptomeTokenizer
from helical.models.geneformer.geneformer_utils import (
    _compute_embeddings_depending_on_mode,
    gen_attention_mask,
    pad_tensor_list,
    quant_layers,
)
from helical.utils.attn_backend import select_attn_backend
from transformers import BertForMaskedLM

log = logging.getLogger("czb_container")

ORGANISMS = ("human",)
MODEL_DIR = "model"
TOKEN_DICTIONARY = "token_dictionary.pkl"
GENE_MEDIANS = "gene_median_dictionary.pkl"
ENSEMBL_MAPPING = "ensembl_mapping_dict.pkl"
ENSEMBL_VERSION = re.compile(r"\.\d+$")


def checkpoint_tensor_names(model_dir: Path) -> list[str]:
    """Names of the tensors stored in the checkpoint file of ``model_dir``."""
    safetensors_file = model_dir / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return list(f.keys())
    bin_file = model_dir / "pytorch_model.bin"
    if bin_file.is_file():
        return list(torch.load(bin_file, map_location="cpu", weights_only=True, mmap=True))
    msg = f"{model_dir}: no model.safetensors or pytorch_model.bin"
    raise ContractError(msg)


def load_model(model_dir: Path, device: str) -> tuple[BertForMaskedLM, int]:
    """Load the BertForMaskedLM checkpoint; fail unless every tensor matches.

    Returns
    -------
    The model in eval mode on ``device`` and the number of checkpoint tensors loaded.
    """
    attn_implementation, dtype = select_attn_backend(device)  # sdpa, float32 (helical's choice)
    model, info = BertForMaskedLM.from_pretrained(
        model_dir,
        output_hidden_states=True,
        output_attentions=False,
        attn_implementation=attn_implementation,
        dtype=dtype,
        output_loading_info=True,
    )
    parts = []
    for key, label in (
        ("missing_keys", "missing"),
        ("unexpected_keys", "unexpected"),
        ("mismatched_keys", "wrong shape"),
        ("error_msgs", "errors"),
    ):
        items = sorted(map(str, info.get(key) or ()))
        if items:
            shown = ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")
            parts.append(f"{len(items)} {label} ({shown})")
    if parts:
        msg = f"{model_dir.name}: partial load of the Geneformer checkpoint: " + "; ".join(parts)
        raise PartialLoadError(msg)
    n_loaded = len(checkpoint_tensor_names(model_dir))
    return model.eval().to(device), n_loaded


def ensembl_ids(adata, gene_id_type: str) -> list[str]:
    """Ensembl IDs of the dataset's genes without version suffix.

    Raises
    ------
    ContractError
        When the dataset has gene symbols only.
    """
    if gene_id_type == "ensembl":
        ids = adata.var_names
    elif "ensembl_id" in adata.var:
        ids = adata.var["ensembl_id"]
    else:
        msg = (
            "Geneformer's token dictionary holds Ensembl IDs; the dataset has gene symbols "
            "and no var['ensembl_id'] column"
        )
        raise ContractError(msg)
    return [ENSEMBL_VERSION.sub("", str(g)).upper() for g in ids]


def merge_duplicate_ids(adata):
    """``adata`` with columns of the same ``var['ensembl_id']`` summed into the first of
    them (columns kept in order of first appearance), and how many columns were merged
    away."""
    import anndata as ad
    import scipy.sparse as sp

    ids = adata.var["ensembl_id"].to_numpy().astype(str)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    if len(first) == len(ids):
        return adata, 0
    order = np.argsort(first)  # unique IDs in order of first appearance
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    merge = sp.csr_matrix(
        (np.ones(len(ids), dtype=np.float32), (np.arange(len(ids)), position[inverse])),
        shape=(len(ids), len(first)),
    )
    kept = first[order]
    merged = ad.AnnData(
        X=sp.csr_matrix(adata.X @ merge, dtype=np.float32), obs=adata.obs, var=adata.var.iloc[kept].copy()
    )
    n_merged = len(ids) - len(first)
    log.info("Geneformer: %d columns with an Ensembl ID seen before summed into its first column", n_merged)
    return merged, n_merged


def embed(job: Job) -> ModelOutput:
    """Embed every cell with Geneformer.

    Parameters
    ----------
    job
        The contract's job; its parameters ``emb_layer`` (0 last layer, -1 penultimate)
        and ``emb_mode`` (``"cls"``, ``"cell"``, or ``"auto"``: ``cls`` when the token
        dictionary has ``<cls>``, else ``cell``).

    Returns
    -------
    ModelOutput
        Embeddings of shape ``(n_cells_kept, hidden_size)``.
    """
    job.require_organism(ORGANISMS)
    device = resolve_device(job.request)

    model_dir = job.weights_path(MODEL_DIR)
    model, n_loaded = load_model(model_dir, device)
    n_layers = quant_layers(model)
    input_size = model.config.max_position_embeddings

    with job.weights_path(TOKEN_DICTIONARY).open("rb") as f:
        token_dict = pickle.load(f)
    special_tokens = "<cls>" in token_dict and "<eos>" in token_dict
    emb_mode = job.parameter("emb_mode")
    if emb_mode == "auto":
        emb_mode = "cls" if special_tokens else "cell"
    if emb_mode not in ("cls", "cell"):
        msg = f"emb_mode must be 'auto', 'cls' or 'cell', got {emb_mode!r}"
        raise ContractError(msg)
    if emb_mode == "cls" and not special_tokens:
        msg = "emb_mode 'cls' needs a model with a <cls> token (Geneformer V2); this one has none"
        raise ContractError(msg)
    emb_layer = int(job.parameter("emb_layer"))
    if emb_layer not in (-1, 0):
        msg = f"emb_layer must be 0 (last layer) or -1 (penultimate), got {emb_layer}"
        raise ContractError(msg)
    layer_to_quant = n_layers + emb_layer  # index into hidden_states (0: embedding layer)

    tokenizer = TranscriptomeTokenizer(
        nproc=1,
        model_input_size=input_size,
        special_token=special_tokens,
        collapse_gene_ids=True,
        gene_median_file=job.weights_path(GENE_MEDIANS),
        token_dictionary_file=job.weights_path(TOKEN_DICTIONARY),
        gene_mapping_file=job.weights_path(ENSEMBL_MAPPING),
    )

    adata = job.read_dataset()
    adata.var["ensembl_id"] = ensembl_ids(adata, job.request.gene_id_type)
    adata, n_merged = merge_duplicate_ids(adata)
    in_vocab = adata.var["ensembl_id"].isin(tokenizer.gene_keys).to_numpy()
    n_matched = int(in_vocab.sum())
    log.info("Geneformer: %d of %d genes in the token dictionary", n_matched, adata.n_vars)
    if n_matched == 0:
        msg = (
            f"none of the {adata.n_vars} genes is in Geneformer's token dictionary (first: "
            f"{', '.join(adata.var['ensembl_id'][:3])}); Geneformer needs human Ensembl gene IDs"
        )
        raise ContractError(msg)
    expressed = np.asarray((adata.X[:, np.flatnonzero(in_vocab)] != 0).sum(axis=1)).ravel() > 0
    kept = np.flatnonzero(expressed)
    if kept.size == 0:
        msg = "no cell expresses any gene of Geneformer's token dictionary"
        raise ContractError(msg)
    adata = adata[kept].copy()

    tokenized, _ = tokenizer.tokenize_anndata(adata)
    dataset = tokenizer.create_dataset(tokenized, None)
    dataset.set_format(type="torch")
    pad_id = token_dict["<pad>"]

    batch_size = job.request.batch_size
    chunks = []
    # Mixed precision on GPU, as helical's get_embs runs it; float32 on CPU.
    amp = (
        torch.autocast("cuda", dtype=torch.float16)
        if device == "cuda"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), amp:
        for start in range(0, len(dataset), batch_size):
            batch = dataset[start : start + batch_size]
            lengths = batch["length"]
            input_ids = pad_tensor_list(
                batch["input_ids"], int(lengths.max()), pad_id, input_size
            ).to(device)
            mask = gen_attention_mask({"length": lengths}).to(device)
            outputs = model(input_ids=input_ids, attention_mask=mask)
            hidden = outputs.hidden_states[layer_to_quant].float()
            pooled = _compute_embeddings_depending_on_mode(
                hidden,
                {"input_ids": input_ids, "length": lengths.to(device)},
                emb_mode,
                special_tokens,
                special_tokens,
                tokenizer.token_to_ensembl_dict,
            )
            chunks.append(pooled.cpu().numpy() if torch.is_tensor(pooled) else np.asarray(pooled))
    embeddings = np.concatenate(chunks).astype(np.float32)

    n_dropped = int((~expressed).sum())
    dropped_reason = "no expressed gene in the token dictionary" if n_dropped else None
    if n_dropped:
        log.warning("Geneformer: %d cells left out: %s", n_dropped, dropped_reason)
    pooling = "<cls> token" if emb_mode == "cls" else "mean over gene tokens"
    layer = "penultimate layer" if emb_layer == -1 else "last layer"
    return ModelOutput(
        embeddings,
        adata.obs_names,
        n_weight_tensors=n_loaded,
        info={
            "n_genes_input": int(in_vocab.size),
            "n_genes_matched": n_matched,
            "n_genes_merged": n_merged,
            "token_dictionary_size": len(token_dict),
            "n_cells_dropped": n_dropped,
            "cells_dropped_reason": dropped_reason,
            "model_input_size": input_size,
            "n_layers": n_layers,
            "emb_mode": emb_mode,
            "emb_layer": emb_layer,
            "hidden_states_index": layer_to_quant,
            "cell_embedding": f"{pooling} of the {layer}",
        },
    )


if __name__ == "__main__":
    main(embed, model="geneformer", package="helical")
