"""czb entrypoint of UCE, the Universal Cell Embedding model (package ``uce-model``).

Published weights expected under ``/weights`` (the files UCE's own download helper
fetches into ``./model_files``, see ``uce.evaluate.download_urls``)::

    4layer_model.torch                variant "4layer" (default): state dict, 4 layers
    33l_8ep_1024t_1280.torch          variant "33layer": state dict, 33 layers
    all_tokens.torch                  ESM2 token embeddings of every species (+ chromosome tokens)
    species_chrom.csv                 species, chromosome, gene_symbol, start of every gene
    species_offsets.pkl               species -> row of its first gene in all_tokens.torch
    protein_embeddings/*.pt           gene symbol -> ESM2 protein embedding, one file per
                                      species; the published archive unpacked here (its
                                      own top folder ``protein_embeddings/`` may remain)

Preprocessing, as ``uce.evaluate.AnndataProcessor`` does it (``filter=True``):

1. ``sc.pp.filter_genes(min_cells=10)`` then ``sc.pp.filter_cells(min_genes=25)``: cells
   with fewer than 25 expressed genes are dropped (UCE embeds only the kept cells);
2. keep the genes that have a protein embedding (``load_gene_embeddings_adata``), map them
   to their token rows, chromosomes and start positions (``adata_path_to_prot_chrom_starts``);
3. per cell, ``sample_cell_sentences`` draws ``sample_size`` (1024) genes with replacement,
   weighted by log1p counts, orders them by chromosome (chromosomes shuffled) and start,
   and prepends the CLS token.

The cell embedding is the one UCE's ``TransformerModel.forward`` returns: the decoder
output at the CLS token (position 0), L2-normalised (``X_uce`` of ``uce-eval-single-anndata``).
It depends on the batch size: UCE's padding mask is a float mask, added to the attention
scores, so padding is attended and a cell's embedding changes with the longest sentence of
its batch. The spec's default, 25, is ``uce-eval-single-anndata``'s; ``test_parity.py``
shows the embeddings equal to that script's, cell for cell, at the same batch size.

Traps handled:

* UCE resolves its files relative to the working directory (``model_files/...``, also
  hard-coded in ``uce.data_proc.gene_embeddings``) and downloads what it does not find
  there. Here every path points into the weights folder, absolute, so nothing is looked
  up in, downloaded to, or written into the working directory or ``/weights``.
* Cells are dropped (fewer than 25 genes, or no counts left on genes with a protein
  embedding, which would make UCE's gene sampling fail); the output holds the kept
  cells' IDs in input order, and meta.json how many were dropped and why.
* Gene sampling draws from numpy's global generator: it is reseeded with the request's
  seed right before sampling, so the same seed gives the same embeddings.
* The package loads its checkpoint with ``strict=True`` but counts nothing; here the
  strict load is ``load_state_dict_strictly``, which names what is missing.
* UCE's ``AnndataProcessor`` writes a dense int64 copy of the counts to disk; here cells
  are read one by one from the sparse matrix instead (same values, same sampling).
* Token rows follow the species' protein embedding file with its symbols upper-cased and
  each counted once (``get_species_to_pe`` builds a dict): two symbols equal but for case
  take one row, and the genes after them keep UCE's numbering.
"""

from __future__ import annotations

import pickle
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))

from czb_container import (
    ContractError,
    Job,
    ModelOutput,
    load_state_dict_strictly,
    main,
    resolve_device,
)

#: czb organism name -> UCE species name (the species of UCE's protein embeddings).
SPECIES = {
    "human": "human",
    "mouse": "mouse",
    "zebrafish": "zebrafish",
    "tropical_clawed_frog": "frog",  # Xenopus tropicalis
    "mouse_lemur": "mouse_lemur",
    "wild_boar": "pig",  # Sus scrofa
    "crab_eating_macaque": "macaca_fascicularis",
    "rhesus_macaque": "macaca_mulatta",
}

#: Variant -> checkpoint file and number of transformer layers.
VARIANTS = {
    "4layer": {"checkpoint": "4layer_model.torch", "nlayers": 4},
    "33layer": {"checkpoint": "33l_8ep_1024t_1280.torch", "nlayers": 33},
}
DEFAULT_VARIANT = "4layer"

#: Model sizes shared by both published checkpoints (``uce.evaluate.run_eval``); the
#: sizes a checkpoint's tensors show are read from it (:func:`checkpoint_architecture`).
ARCHITECTURE = {
    "token_dim": 5120,
    "d_model": 1280,
    "nhead": 20,
    "d_hid": 5120,
    "output_dim": 1280,
    "dropout": 0.05,
}
#: Rows of the token table the checkpoints were trained with (genes + chromosome tokens);
#: ``uce.evaluate`` hard-codes this number too.
N_TOKENS = 145469

#: Cell-sentence settings: the defaults of ``uce-eval-single-anndata``.
SENTENCE_DEFAULTS = {
    "pad_length": 1536,
    "pad_token_idx": 0,
    "chrom_token_left_idx": 1,
    "chrom_token_right_idx": 2,
    "cls_token_idx": 3,
    "CHROM_TOKEN_OFFSET": 143574,
    "sample_size": 1024,
}

#: UCE's cell and gene filters (``process_raw_anndata`` with ``filter=True``).
MIN_GENES_PER_CELL = 25
MIN_CELLS_PER_GENE = 10


def protein_embeddings_dir(job: Job, species: str) -> Path:
    """The folder holding the ``*.pt`` protein embedding files.

    The published archive holds a top folder ``protein_embeddings/``; unpacked into
    ``protein_embeddings`` it lands one level deeper, so both places are accepted.
    """
    from uce.data_proc.gene_embeddings import MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH

    top = job.weights_path("protein_embeddings")
    file_name = Path(MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH["ESM2"][species]).name
    for folder in (top, top / "protein_embeddings"):
        if (folder / file_name).is_file():
            return folder
    msg = (
        f"{file_name} (protein embeddings of {species}) found neither in {top} "
        f"nor in {top / 'protein_embeddings'}"
    )
    raise ContractError(msg)


def point_gene_embeddings_at(folder: Path) -> None:
    """Make ``uce.data_proc.gene_embeddings`` read the protein embeddings in ``folder``.

    The package holds their paths relative to the working directory
    (``model_files/protein_embeddings/<file>``); keep the file names, make them absolute.
    """
    from uce.data_proc import gene_embeddings

    paths = gene_embeddings.MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH["ESM2"]
    for species, path in paths.items():
        paths[species] = folder / Path(path).name


def checkpoint_architecture(state) -> dict:
    """The model sizes of a checkpoint: :data:`ARCHITECTURE`, with the sizes its tensors show.

    Both published checkpoints give :data:`ARCHITECTURE` itself; a checkpoint of another
    size (e.g. a tiny test model) is built at its own size instead of failing the strict
    load. ``nhead`` and ``dropout`` leave no trace in the tensors and stay as published.
    """
    arch = dict(ARCHITECTURE)
    for name, key, axis in (
        ("d_model", "encoder.0.weight", 0),
        ("token_dim", "encoder.0.weight", 1),
        ("d_hid", "transformer_encoder.layers.0.linear1.weight", 0),
        ("output_dim", "decoder.3.weight", 0),
    ):
        tensor = state.get(key)
        if tensor is not None and tensor.ndim == 2:
            arch[name] = int(tensor.shape[axis])
    return arch


def load_model(job: Job, checkpoint: Path, nlayers: int, device: str):
    """UCE's ``TransformerModel`` with the published weights, as ``uce.evaluate.run_eval`` builds it.

    Returns
    -------
    The model in eval mode on ``device``, the number of tensors loaded and the model sizes.
    """
    import torch
    from torch import nn
    from uce.evaluate import get_ESM2_embeddings
    from uce.model import TransformerModel

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    arch = checkpoint_architecture(state)
    model = TransformerModel(
        token_dim=arch["token_dim"],
        d_model=arch["d_model"],
        nhead=arch["nhead"],
        d_hid=arch["d_hid"],
        nlayers=nlayers,
        dropout=arch["dropout"],
        output_dim=arch["output_dim"],
    )
    # The token table is part of the checkpoint: give the model a slot of the right size.
    model.pe_embedding = nn.Embedding.from_pretrained(torch.empty(N_TOKENS, arch["token_dim"]))
    n_loaded = load_state_dict_strictly(model, state, name=checkpoint.name)
    del state
    # As run_eval: the token file replaces the checkpoint's table only when it holds a
    # different number of rows (species added after training); get_ESM2_embeddings
    # appends the seeded chromosome tokens to a table without them.
    args = Namespace(
        token_file=str(job.weights_path("all_tokens.torch")), token_dim=arch["token_dim"]
    )
    all_pe = get_ESM2_embeddings(args)
    if all_pe.shape[0] != N_TOKENS:
        all_pe.requires_grad = False
        model.pe_embedding = nn.Embedding.from_pretrained(all_pe)
    del all_pe
    return model.eval().to(device), n_loaded, arch


class CellSentences:
    """Cell sentences of UCE, read cell by cell from a sparse count matrix.

    Same as ``uce.eval_data.MultiDatasetSentences.__getitem__`` (int64 counts, log1p
    weights, ``sample_cell_sentences``) without its dense on-disk copy of the counts.
    """

    def __init__(self, counts, args: Namespace, token_idxs, chroms, starts):
        self.counts = counts
        self.args = args
        self.name = "dataset"
        self.token_idxs = {self.name: token_idxs}
        self.chroms = {self.name: chroms}
        self.starts = {self.name: starts}

    def __len__(self) -> int:
        return self.counts.shape[0]

    def __getitem__(self, idx: int):
        import torch
        from uce.eval_data import sample_cell_sentences

        # As UCE's on-disk copy: counts as float32, then int64 (1, n_genes).
        row = self.counts[idx].toarray().astype(np.float32).astype(np.int64)
        counts = torch.from_numpy(row)
        weights = torch.log1p(counts)
        weights = weights / torch.sum(weights)
        sentences, mask, seq_len, cell_sentences = sample_cell_sentences(
            counts,
            weights,
            self.name,
            self.args,
            dataset_to_protein_embeddings=self.token_idxs,
            dataset_to_chroms=self.chroms,
            dataset_to_starts=self.starts,
        )
        return sentences, mask, idx, seq_len, cell_sentences


def prepare_cells(adata, species: str, weights: dict[str, Path]):
    """Filter cells and genes as UCE does and map genes to tokens.

    Returns
    -------
    The filtered AnnData, (token rows, chromosome codes, start positions) of its genes,
    and counts of what was dropped.
    """
    import scanpy as sc
    import torch
    from uce.data_proc.data_utils import adata_path_to_prot_chrom_starts, get_spec_chrom_csv
    from uce.data_proc.gene_embeddings import (
        MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH,
        load_gene_embeddings_adata,
    )

    # Gene order of the species' protein embedding file sets the token rows (as
    # uce.data_proc.data_utils.get_species_to_pe, for the one species needed): its
    # upper-cased symbols, each once, in the order they first appear.
    species_pe = torch.load(
        MODEL_TO_SPECIES_TO_GENE_EMBEDDING_PATH["ESM2"][species], weights_only=True
    )
    spec_pe_genes = list(dict.fromkeys(k.upper() for k in species_pe))
    del species_pe
    n_cells_in, n_genes_in = adata.n_obs, adata.n_vars

    sc.pp.filter_genes(adata, min_cells=MIN_CELLS_PER_GENE)
    sc.pp.filter_cells(adata, min_genes=MIN_GENES_PER_CELL)
    n_cells_min_genes = adata.n_obs
    if n_cells_min_genes == 0:
        msg = f"no cell of {n_cells_in} kept: UCE needs at least {MIN_GENES_PER_CELL} expressed genes per cell"
        raise ContractError(msg)
    if not set(spec_pe_genes) & {str(g).upper() for g in adata.var_names}:
        msg = (
            f"none of the {adata.n_vars} genes expressed in {MIN_CELLS_PER_GENE}+ cells has a {species} protein embedding "
            f"(UCE needs gene symbols as var_names, got e.g. {', '.join(map(str, adata.var_names[:3]))})"
        )
        raise ContractError(msg)
    adata, _ = load_gene_embeddings_adata(adata, species=[species], embedding_model="ESM2")
    # A cell whose counts all sit on genes without a protein embedding has no genes to
    # sample from (UCE's sampling would fail on its all-NaN weights): drop it too.
    has_counts = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    adata = adata[has_counts].copy()
    if adata.n_obs == 0:
        msg = f"no cell of {n_cells_in} has counts on genes with a {species} protein embedding"
        raise ContractError(msg)

    with weights["offsets"].open("rb") as f:
        offset = pickle.load(f)[species]
    gene_to_chrom_pos = get_spec_chrom_csv(str(weights["chroms"]))
    token_idxs, chroms, starts = adata_path_to_prot_chrom_starts(
        adata, species, spec_pe_genes, gene_to_chrom_pos, offset
    )
    dropped = {
        "n_cells_in": n_cells_in,
        "n_cells_dropped": n_cells_in - adata.n_obs,
        "n_cells_dropped_min_genes": n_cells_in - n_cells_min_genes,
        "n_cells_dropped_no_embedded_genes": n_cells_min_genes - adata.n_obs,
        "n_genes_in": n_genes_in,
        "n_genes_used": adata.n_vars,
    }
    return adata, (token_idxs, chroms, starts), dropped


def embed(job: Job) -> ModelOutput:
    """Embed every cell UCE keeps with the requested published UCE model.

    Parameters
    ----------
    job
        ``request.variant``: ``4layer`` (default) or ``33layer``;
        its parameter ``sample_size``: genes sampled per cell (at most 1024, as trained).

    Returns
    -------
    One L2-normalised embedding per kept cell (1280-dimensional for the published models).
    """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from uce.eval_data import MultiDatasetSentenceCollator

    request = job.request
    job.require_organism(SPECIES)
    species = SPECIES[request.organism]
    variant = request.variant or DEFAULT_VARIANT
    if variant not in VARIANTS:
        msg = f"unknown UCE variant {variant!r}; known: {', '.join(VARIANTS)}"
        raise ContractError(msg)
    settings = VARIANTS[variant]
    sample_size = int(job.parameter("sample_size"))
    # Sentences hold the sampled genes plus CLS and chromosome tokens within pad_length
    # (the positional encoding's length): UCE was trained with 1024.
    if not 1 <= sample_size <= SENTENCE_DEFAULTS["sample_size"]:
        msg = f"sample_size must be between 1 and {SENTENCE_DEFAULTS['sample_size']}, got {sample_size}"
        raise ContractError(msg)
    args = Namespace(**{**SENTENCE_DEFAULTS, "sample_size": sample_size})
    weights = {
        "checkpoint": job.weights_path(settings["checkpoint"]),
        "chroms": job.weights_path("species_chrom.csv"),
        "offsets": job.weights_path("species_offsets.pkl"),
    }
    point_gene_embeddings_at(protein_embeddings_dir(job, species))
    device = resolve_device(request)

    adata = job.read_dataset()
    adata, (token_idxs, chroms, starts), dropped = prepare_cells(adata, species, weights)
    model, n_loaded, arch = load_model(job, weights["checkpoint"], settings["nlayers"], device)

    cells = CellSentences(adata.X.tocsr(), args, token_idxs, chroms.to_numpy(), starts)
    loader = DataLoader(
        cells,
        batch_size=request.batch_size,
        shuffle=False,
        collate_fn=MultiDatasetSentenceCollator(args),
    )
    # Sampling of genes and chromosome order use numpy's global generator.
    np.random.seed(request.seed % 2**32)
    batches = []
    with torch.no_grad():
        for sentences, mask, _idxs, _ in loader:
            # As uce.evaluate.run_eval: token IDs -> protein embeddings, normalised, CLS output.
            sentences = model.pe_embedding(sentences.permute(1, 0).to(device).long())
            sentences = nn.functional.normalize(sentences, dim=2)
            _, embedding = model(sentences, mask=mask.to(device))
            batches.append(embedding.float().cpu().numpy())
    embeddings = np.concatenate(batches)

    info = {
        "species": species,
        "variant": variant,
        "nlayers": settings["nlayers"],
        "architecture": arch,
        "sample_size": args.sample_size,
        **dropped,
    }
    return ModelOutput(embeddings, list(adata.obs_names), n_weight_tensors=n_loaded, info=info)


if __name__ == "__main__":
    main(embed, model="uce", package="uce-model")
