"""scGPT cell embeddings with the published ``scgpt`` package (0.2.4).

Weights expected under ``/weights`` (one folder of the scGPT model zoo, e.g. whole-human)::

    args.json       model settings (embsize, nheads, d_hid, nlayers, n_layers_cls,
                    dropout, pad_token, pad_value, ...)
    vocab.json      gene symbol -> token index
    best_model.pt   state dict saved with flash-attn layers (``self_attn.Wqkv.*``)

Embedding, as ``scgpt.tasks.embed_data`` does it (the path cz-benchmarks runs):

1. Genes (``var_names``, gene symbols) are looked up in ``vocab.json``; genes not in the
   vocabulary are dropped (``meta.json`` records how many matched).
2. Each cell becomes ``<cls>`` followed by its expressed genes; raw counts are binned
   per cell into 51 bins by scGPT's ``DataCollator`` (quantile binning of the non-zero
   values, so normalising or log-transforming first would give the same bins).
   A cell with more than ``max_length - 1`` expressed genes keeps ``<cls>`` and a random
   ``max_length - 1`` of them (``max_length`` 1200 by default).
3. The transformer output at the ``<cls>`` position is the cell embedding, then
   L2-normalised.

Traps handled:

- ``scgpt`` imports ``torchtext``, whose compiled extension does not load with current
  torch: ``torchtext_shim`` stands in for the small part ``GeneVocab`` uses.
- flash-attn cannot be installed here, so the model runs torch's own attention; the
  checkpoint's flash-attn names (``self_attn.Wqkv.*``) are renamed to torch's
  (``self_attn.in_proj_*``), the same mapping ``scgpt.utils.load_pretrained`` applies.
- ``scgpt.utils.load_pretrained`` silently skips tensors whose names or shapes do not
  match; here every tensor on the embedding path must come from the checkpoint and
  every checkpoint tensor must be used, except the training-only heads, or the run
  fails with ``PartialLoadError``.
- Binning breaks ties at random (numpy) and long cells are subsampled at random
  (torch): both generators are seeded by the contract from ``request.seed``, and the
  cells go through scGPT's own loop (``DataLoader`` + ``DataCollator``) in one process,
  in order, so a seed gives the same embeddings on any machine, and the same as
  ``embed_data`` run with no workers after the same seeding (scGPT's own loop spreads
  cells over as many worker processes as there are CPUs, each with its own random
  stream, so its embeddings depend on the CPU count).
- A cell with no expressed gene in the vocabulary cannot be binned (scGPT raises); it
  is dropped and counted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

# torchtext_shim (and, in the image, czb_container) sit beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torchtext_shim

torchtext_shim.install()

import torch

with warnings.catch_warnings():
    # scgpt warns at import that flash-attn is missing: expected, see the docstring.
    warnings.filterwarnings("ignore", message="flash_attn is not installed")
    import scgpt  # noqa: F401  (the package as published, not only submodules)
    from scgpt.data_collator import DataCollator
    from scgpt.model import TransformerModel
    from scgpt.tokenizer import GeneVocab

from czb_container import (
    ContractError,
    Job,
    ModelOutput,
    load_state_dict_strictly,
    main,
    resolve_device,
)

log = logging.getLogger("czb_container")

ORGANISMS = ("human",)
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
N_BINS = 51  # scGPT's DataCollator bins into 51 bins, whatever args.json says
# Checkpoint tensors of training heads the cell embedding does not use: the expression
# decoders, the classifier and the flag embedding of generative pretraining.
TRAINING_HEADS = ("decoder.", "mvc_decoder.", "cls_decoder.", "flag_encoder.")


def remap_flash_attention_keys(state_dict: dict) -> dict:
    """Rename flash-attn attention tensors to the names of torch's attention.

    ``FlashMHA`` keeps the packed query/key/value projection as ``Wqkv`` (a Linear);
    torch's ``MultiheadAttention`` keeps the same matrix as ``in_proj_weight`` and
    ``in_proj_bias``. Checkpoints saved without flash-attn pass through unchanged.
    """
    return {
        key.replace("self_attn.Wqkv.", "self_attn.in_proj_"): value
        for key, value in state_dict.items()
    }


def load_vocab(path: Path) -> GeneVocab:
    """The checkpoint's gene vocabulary, with scGPT's special tokens added if absent."""
    vocab = GeneVocab.from_file(path)
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab.append_token(token)
    return vocab


def build_model(args: dict, vocab: GeneVocab) -> TransformerModel:
    """scGPT's ``TransformerModel`` configured as ``embed_data`` configures it."""
    for key, expected in (("input_emb_style", "continuous"), ("n_bins", N_BINS)):
        if args.get(key, expected) != expected:
            msg = (
                f"args.json has {key}={args[key]!r}; the embedding path supports only {expected!r}"
            )
            raise ContractError(msg)
    return TransformerModel(
        ntoken=len(vocab),
        d_model=args["embsize"],
        nhead=args["nheads"],
        d_hid=args["d_hid"],
        nlayers=args["nlayers"],
        nlayers_cls=args["n_layers_cls"],
        n_cls=1,
        vocab=vocab,
        dropout=args["dropout"],
        pad_token=args["pad_token"],
        pad_value=args["pad_value"],
        do_mvc=True,
        do_dab=False,
        use_batch_labels=False,
        domain_spec_batchnorm=False,
        explicit_zero_prob=False,
        use_fast_transformer=False,  # flash-attn is not installable: torch attention
        pre_norm=False,
    )


def load_checkpoint(model: TransformerModel, path: Path) -> tuple[int, int]:
    """Load ``best_model.pt`` strictly; return (tensors loaded, head tensors skipped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = remap_flash_attention_keys(state)
    heads = [key for key in state if key.startswith(TRAINING_HEADS)]
    encoder_state = {
        key: value for key, value in state.items() if not key.startswith(TRAINING_HEADS)
    }
    # The model's own heads stay as initialised: _encode never reaches them.
    loaded = load_state_dict_strictly(
        model, encoder_state, name=path.name, ignore_missing=TRAINING_HEADS
    )
    return loaded, len(heads)


def gene_symbols(adata, gene_id_type: str) -> list[str]:
    """Gene symbols of the dataset: ``var_names`` or, for Ensembl datasets, ``var['gene_symbol']``."""
    if gene_id_type == "symbol":
        return [str(g) for g in adata.var_names]
    if "gene_symbol" in adata.var:
        return [str(g) for g in adata.var["gene_symbol"]]
    msg = "scGPT's vocabulary holds gene symbols; the dataset has Ensembl IDs and no var['gene_symbol']"
    raise ContractError(msg)


class CellExamples(torch.utils.data.Dataset):
    """One ``DataCollator`` example per kept cell: ``<cls>`` then its expressed genes.

    What ``get_batch_cell_embeddings``'s own dataset yields: genes in column order, the
    ``<cls>`` value is ``pad_value``; here read from sparse rows, not a dense matrix.
    """

    def __init__(
        self, counts, gene_ids: np.ndarray, rows: np.ndarray, cls_id: int, pad_value: float
    ) -> None:
        self.counts = counts
        self.gene_ids = gene_ids
        self.rows = rows
        self.cls_id = cls_id
        self.pad_value = pad_value

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        start, stop = self.counts.indptr[row], self.counts.indptr[row + 1]
        genes = np.concatenate([[self.cls_id], self.gene_ids[self.counts.indices[start:stop]]])
        values = np.concatenate([[self.pad_value], self.counts.data[start:stop]])
        return {
            "id": index,
            "genes": torch.from_numpy(genes.astype(np.int64)),
            "expressions": torch.from_numpy(values.astype(np.float32)),
        }


def embed(job: Job) -> ModelOutput:
    """Embed every cell of the job's dataset with scGPT (``<cls>`` token, L2-normalised).

    Parameters
    ----------
    job
        The contract's job; its parameter ``max_length``: genes per cell fed to the
        model, including ``<cls>`` (the spec's default, 1200, is ``embed_data``'s).

    Returns
    -------
    ModelOutput
        Embeddings of shape ``(n_cells_kept, embsize)``.
    """
    import scipy.sparse as sp

    job.require_organism(ORGANISMS)
    device = resolve_device(job.request)
    max_length = int(job.parameter("max_length"))

    args = json.loads(job.weights_path("args.json").read_text())
    vocab = load_vocab(job.weights_path("vocab.json"))
    model = build_model(args, vocab)
    n_loaded, n_heads = load_checkpoint(model, job.weights_path("best_model.pt"))
    log.info("scGPT: %d tensors loaded (%d training-head tensors not used)", n_loaded, n_heads)
    model.to(device).eval()

    adata = job.read_dataset()
    symbols = gene_symbols(adata, job.request.gene_id_type)
    in_vocab = np.array([s in vocab for s in symbols])
    n_matched = int(in_vocab.sum())
    log.info(
        "scGPT: %d of %d genes in the vocabulary of %d tokens", n_matched, len(symbols), len(vocab)
    )
    if n_matched == 0:
        msg = (
            f"none of the {len(symbols)} genes is in scGPT's vocabulary (first: "
            f"{', '.join(symbols[:3])}); scGPT needs human gene symbols"
        )
        raise ContractError(msg)
    gene_ids = np.array(
        [vocab[s] for s, keep in zip(symbols, in_vocab, strict=True) if keep], dtype=np.int64
    )
    counts = sp.csr_matrix(adata.X[:, np.flatnonzero(in_vocab)], dtype=np.float32)
    counts.eliminate_zeros()
    counts.sort_indices()

    expressed = np.diff(counts.indptr) > 0
    kept = np.flatnonzero(expressed)
    if kept.size == 0:
        msg = "no cell expresses any gene of scGPT's vocabulary"
        raise ContractError(msg)

    pad_token, pad_value = args["pad_token"], args["pad_value"]
    pad_id, cls_id = vocab[pad_token], vocab["<cls>"]
    collator = DataCollator(
        do_padding=True,
        pad_token_id=pad_id,
        pad_value=pad_value,
        do_mlm=False,
        do_binning=True,
        max_length=max_length,
        sampling=True,
        keep_first_n_tokens=1,
    )
    batch_size = job.request.batch_size
    # scGPT's own loop, in the main process: a DataLoader draws its base seed from
    # torch's generator even without workers, so with the same seed the long cells
    # are subsampled as embed_data subsamples them (with no workers).
    dataset = CellExamples(counts, gene_ids, kept, cls_id, pad_value)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=torch.utils.data.SequentialSampler(dataset),
        collate_fn=collator,
        num_workers=0,
    )
    embeddings = np.zeros((kept.size, args["embsize"]), dtype=np.float32)
    # Mixed precision on GPU, as embed_data runs it; full float32 on CPU.
    amp = (
        torch.autocast("cuda", dtype=torch.float16)
        if device == "cuda"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), amp:
        start = 0
        for batch in loader:
            genes = batch["gene"].to(device)
            output = model._encode(
                genes, batch["expr"].to(device), src_key_padding_mask=genes.eq(pad_id)
            )
            embeddings[start : start + len(genes)] = output[:, 0, :].float().cpu().numpy()
            start += len(genes)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)

    n_dropped = int((~expressed).sum())
    if n_dropped:
        log.warning("scGPT: %d cells express no vocabulary gene and are left out", n_dropped)
    return ModelOutput(
        embeddings,
        adata.obs_names[kept],
        n_weight_tensors=n_loaded,
        info={
            "n_genes_input": len(symbols),
            "n_genes_matched": n_matched,
            "vocab_size": len(vocab),
            "n_cells_dropped": n_dropped,
            "cells_dropped_reason": "no expressed gene in the vocabulary" if n_dropped else None,
            "n_training_head_tensors_skipped": n_heads,
            "max_length": max_length,
            "n_bins": N_BINS,
            "cell_embedding": "<cls> token of the last layer, L2-normalised",
            "model_settings": {
                k: args[k] for k in ("embsize", "nlayers", "nheads", "d_hid") if k in args
            },
        },
    )


if __name__ == "__main__":
    main(embed, model="scgpt", package="scgpt")
