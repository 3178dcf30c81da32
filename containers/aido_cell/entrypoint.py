"""AIDO.Cell (GenBio AI) cell embeddings under czb's container contract.

The model is the ``CellFoundationModel`` of the published ``modelgenerator`` package
(``modelgenerator.huggingface_models.cellfoundation``), built from the published
``config.json`` and filled strictly from the published checkpoint.

Weights expected under ``/weights`` (one variant, as published on Hugging Face in
``genbio-ai/AIDO.Cell-3M``, ``-10M`` or ``-100M``)::

    config.json          CellFoundationConfig (architectures: CellFoundationForMaskedLM)
    pytorch_model.bin    state dict of CellFoundationForMaskedLM: ``bert.*`` is the encoder
                         used here, ``cls.*`` the masked-expression head (not used)
    model.safetensors    read instead of pytorch_model.bin when present

Preprocessing (as modelgenerator's ``GenBioCellFoundation`` backbone and the authors'
``align_adata`` helper do it):

1. Gene alignment by symbol to the fixed list of 19,264 genes shipped in the package
   (``modelgenerator/cell/gene_lists/OS_scRNA_gene_index.19264.tsv``): dataset genes are
   reordered to the model's order, genes the model does not know are dropped,
   duplicated symbols keep their first occurrence, and model genes missing from the
   dataset are filled with 0 (the authors' current fill value; -1, the mask token, was
   dropped because it corrupts the read-depth tokens).
2. Raw counts of the aligned genes -> ``log1p(counts / total * 10^4)``, followed by two
   read-depth tokens ``max(log10(total), 5)``, values clipped at 20: a sequence of
   19,266 values per cell.

Cell embedding: the last layer's hidden states (after the final norm) at the gene
positions, averaged over the model genes present in the dataset; the two depth tokens
and the zero-filled missing genes are left out of the mean (cz-benchmarks' AIDO.Cell
embedding, and modelgenerator's quickstart, select the same positions).

Precision: on CUDA, bf16 autocast with bf16 inputs, as the published configs run it
(Lightning ``precision: bf16``). On CPU, float32 by default: exact arithmetic, faster
than bf16 emulation on most CPUs, and what the authors' own CPU path keeps; the
``precision`` parameter (``auto``, ``bf16``, ``float32``) overrides either choice.

Traps handled:

- modelgenerator's attention always takes the FlashAttention path and, without the
  ``flash-attn`` package, falls back to ``scaled_dot_product_attention`` on tensors
  shaped (tokens, heads, head_dim), i.e. attention across heads within each token
  instead of across tokens (the authors fixed this in their later standalone
  ``aido_cell`` package). ``flash-attn`` has no build for this torch, so the
  module-level ``flash_attn_varlen_func`` is provided here by an exact equivalent
  built on torch's ``scaled_dot_product_attention`` (which runs its own FlashAttention
  kernel on CUDA in bf16).
- The published attention ignores attention masks ("assuming NO PADDING"), yet
  ``CellFoundationModel.forward`` still builds a dense (batch, 1, L, L) float32 mask:
  1.5 GB per cell at L = 19,266. That mask is never read, so its builder is replaced by
  a (batch, 1, 1, L) one; the outputs are unchanged.
- ``from_pretrained`` only warns about missing tensors and keeps random ones: here the
  checkpoint must fill every tensor of the encoder (``PartialLoadError`` otherwise).
- Cells without any count over the model's genes would give NaN (0 / 0): they are
  dropped and counted in ``meta.json``.
- Human only: other organisms exit as not applicable.
"""

from __future__ import annotations

import importlib.resources
import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from czb_container import (
    ContractError,
    Job,
    ModelOutput,
    NotApplicable,
    load_state_dict_strictly,
    main,
    resolve_device,
)

log = logging.getLogger("czb_container")

MODEL = "aido_cell"
PACKAGE = "modelgenerator"
SUPPORTED_ORGANISMS = ("human",)
GENE_LIST = ("cell", "gene_lists", "OS_scRNA_gene_index.19264.tsv")
N_DEPTH_TOKENS = 2
MISSING_GENE_FILL = 0.0
PRECISIONS = ("auto", "bf16", "float32")


# --------------------------------------------------------------------------- genes


def model_gene_symbols() -> np.ndarray:
    """The 19,264 gene symbols AIDO.Cell reads, in model order, from the package's own list."""
    path = importlib.resources.files("modelgenerator").joinpath(*GENE_LIST)
    with importlib.resources.as_file(path) as file:
        symbols = pd.read_csv(file, sep="\t")["gene_name"].astype(str).to_numpy()
    return symbols


def align_genes(dataset_genes, model_genes) -> tuple[np.ndarray, np.ndarray]:
    """Match dataset columns to model gene positions.

    Parameters
    ----------
    dataset_genes
        Gene symbols of the dataset's columns, in dataset order.
    model_genes
        Gene symbols of the model's input positions, in model order.

    Returns
    -------
    data_columns, model_positions
        Integer arrays of equal length: dataset column ``data_columns[i]`` feeds model
        position ``model_positions[i]``. A symbol seen twice keeps its first column;
        symbols the model does not know are left out.
    """
    position = {gene: i for i, gene in enumerate(model_genes)}
    data_columns, model_positions, seen = [], [], set()
    for column, gene in enumerate(dataset_genes):
        gene = str(gene)
        if gene in position and gene not in seen:
            seen.add(gene)
            data_columns.append(column)
            model_positions.append(position[gene])
    return np.asarray(data_columns, dtype=np.int64), np.asarray(model_positions, dtype=np.int64)


def aligned_counts(
    counts: sp.csr_matrix, data_columns: np.ndarray, model_positions: np.ndarray, n_model_genes: int
) -> np.ndarray:
    """Dense (cells × model genes) counts in model order; missing genes hold the fill value."""
    out = np.full((counts.shape[0], n_model_genes), MISSING_GENE_FILL, dtype=np.float32)
    out[:, model_positions] = counts[:, data_columns].toarray()
    return out


def dataset_symbols(adata, gene_id_type: str) -> np.ndarray:
    """Gene symbols of the dataset's columns (``var_names``, or the ``gene_symbol`` column)."""
    if gene_id_type == "symbol":
        return adata.var_names.astype(str).to_numpy()
    if "gene_symbol" in adata.var.columns:
        return adata.var["gene_symbol"].astype(str).to_numpy()
    msg = (
        f"AIDO.Cell reads gene symbols; the dataset has {gene_id_type} IDs "
        "and no var['gene_symbol'] column"
    )
    raise ContractError(msg)


# --------------------------------------------------------------------------- model


def preprocess(counts: torch.Tensor) -> torch.Tensor:
    """Raw aligned counts -> the model's input values (``GenBioCellFoundation.forward``).

    ``log1p`` of counts per 10^4, then two read-depth tokens ``max(log10(total), 5)``
    appended, then everything clipped at 20.
    """
    counts = counts.to(torch.float32)
    total = counts.sum(dim=1, keepdim=True)
    depth = torch.clamp(torch.log10(total), min=5.0)
    values = torch.log1p(counts / total * 10000)
    values = torch.cat([values] + [depth] * N_DEPTH_TOKENS, dim=1)
    return torch.clamp(values, max=20.0)


def sdpa_varlen_attention(
    query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
    softmax_scale=None, causal=False,
):
    """``flash_attn.flash_attn_varlen_func`` computed with torch's scaled dot-product attention.

    Tensors are packed as (total tokens, heads, head_dim); sequence ``i`` spans
    ``cu_seqlens[i]:cu_seqlens[i + 1]``. Each sequence attends within itself only.
    """
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        msg = "cross-attention with different query and key lengths is not supported"
        raise NotImplementedError(msg)
    out = torch.empty_like(query)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        # (tokens, heads, dim) -> (1, heads, tokens, dim): the 4-D layout takes torch's
        # fused (memory-efficient) kernels on CPU as well as on CUDA.
        q, k, v = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        attended = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale
        )
        out[start:end] = attended[0].transpose(0, 1)
    return out


def key_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, 1, 1, L) boolean mask, True where a key is masked out.

    Stands in for the package's ``bert_extended_attention_mask``, whose (batch, 1, L, L)
    result the FlashAttention path never reads.
    """
    return (attention_mask < 0.5)[:, None, None, :]


def install_runtime_fixes():
    """Import modelgenerator's AIDO.Cell modelling code and apply the two fixes above."""
    from modelgenerator.huggingface_models.cellfoundation import modeling_cellfoundation

    modeling_cellfoundation.flash_attn_varlen_func = sdpa_varlen_attention
    modeling_cellfoundation.bert_extended_attention_mask = key_padding_mask
    return modeling_cellfoundation


def read_checkpoint(job: Job) -> dict[str, torch.Tensor]:
    """The published state dict (safetensors when present, else ``pytorch_model.bin``)."""
    safetensors_file = job.weights_dir / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    path = job.weights_path("pytorch_model.bin")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(job: Job):
    """Build ``CellFoundationModel`` from ``config.json`` and fill it strictly.

    Returns
    -------
    model, n_loaded, config
        The encoder in eval mode, the number of tensors loaded into it, its config.
    """
    from modelgenerator.huggingface_models.cellfoundation import CellFoundationConfig

    modeling = install_runtime_fixes()
    config = CellFoundationConfig.from_pretrained(str(job.weights_path("config.json").parent))
    # Inference: the FlashAttention path applies its dropout probability regardless of
    # eval mode, so it is zeroed (published configs already hold 0.0).
    config.attention_probs_dropout_prob = 0.0
    model = modeling.CellFoundationModel(config, add_pooling_layer=False)

    checkpoint = read_checkpoint(job)
    prefix = f"{modeling.CellFoundationPreTrainedModel.base_model_prefix}."
    if any(name.startswith(prefix) for name in checkpoint):
        checkpoint = {name.removeprefix(prefix): tensor for name, tensor in checkpoint.items()}
    n_loaded = load_state_dict_strictly(
        model, checkpoint, name="AIDO.Cell checkpoint", ignore_unexpected=("cls.",)
    )
    return model.eval(), n_loaded, config


def choose_precision(requested: str, device: str) -> str:
    """``bf16`` on CUDA and ``float32`` on CPU unless the request says otherwise."""
    if requested not in PRECISIONS:
        msg = f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}"
        raise ContractError(msg)
    if requested == "auto":
        return "bf16" if device == "cuda" else "float32"
    return requested


@torch.no_grad()
def embed_batch(
    model, counts: np.ndarray, present: torch.Tensor, device: str, precision: str
) -> np.ndarray:
    """Mean last-layer hidden state over the present gene positions, per cell."""
    values = preprocess(torch.from_numpy(counts).to(device))
    if precision == "bf16":
        # As the published backbone: bf16 inputs under bf16 autocast.
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            hidden = model(input_ids=values.to(torch.bfloat16)).last_hidden_state
    else:
        hidden = model(input_ids=values).last_hidden_state
    # ``present`` holds model gene positions only: the depth tokens (the last two
    # positions) and the zero-filled missing genes stay out of the mean.
    return hidden[:, present].float().mean(dim=1).cpu().numpy()


# --------------------------------------------------------------------------- entrypoint


def embed(job: Job) -> ModelOutput:
    """Embed every cell of the dataset with AIDO.Cell."""
    job.require_organism(SUPPORTED_ORGANISMS)
    device = resolve_device(job.request)
    precision = choose_precision(str(job.parameter("precision")), device)

    adata = job.read_dataset()
    model_genes = model_gene_symbols()
    symbols = dataset_symbols(adata, job.request.gene_id_type)
    data_columns, model_positions = align_genes(symbols, model_genes)
    if len(data_columns) == 0:
        msg = (
            f"none of the dataset's {adata.n_vars} genes is among AIDO.Cell's "
            f"{len(model_genes)} gene symbols"
        )
        raise NotApplicable(msg)
    log.info("genes: %d of %d model genes in the dataset", len(data_columns), len(model_genes))

    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    cell_totals = np.asarray(counts[:, data_columns].sum(axis=1)).ravel()
    keep = np.flatnonzero(cell_totals > 0)
    if len(keep) < adata.n_obs:
        dropped = adata.n_obs - len(keep)
        log.warning("dropping %d cells without counts over the model's genes", dropped)

    model, n_loaded, config = load_model(job)
    model.to(device)
    present = torch.as_tensor(np.sort(model_positions), device=device)

    batches = []
    for start in range(0, len(keep), job.request.batch_size):
        rows = keep[start : start + job.request.batch_size]
        batch_counts = aligned_counts(counts[rows], data_columns, model_positions, len(model_genes))
        batches.append(embed_batch(model, batch_counts, present, device, precision))
    width = config.hidden_size
    embeddings = np.concatenate(batches) if batches else np.zeros((0, width), dtype=np.float32)

    info = {
        "precision": precision,
        "n_model_genes": int(len(model_genes)),
        "n_genes_matched": int(len(data_columns)),
        "n_dataset_genes": int(adata.n_vars),
        "missing_gene_fill": MISSING_GENE_FILL,
        "n_cells_dropped_no_counts": int(adata.n_obs - len(keep)),
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "pooling": "mean last-layer hidden state over the dataset's genes (no depth tokens)",
    }
    return ModelOutput(embeddings, adata.obs_names[keep], n_weight_tensors=n_loaded, info=info)


if __name__ == "__main__":
    main(embed, model=MODEL, package=PACKAGE)
