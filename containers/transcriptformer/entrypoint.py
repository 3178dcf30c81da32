"""czb entrypoint of TranscriptFormer (package ``transcriptformer``).

Published weights expected under ``/weights``: the archive of the variant
(``tf_sapiens``, ``tf_exemplar`` or ``tf_metazoa``, from
``https://czi-transcriptformer.s3.amazonaws.com/weights/<variant>.tar.gz``, as
``transcriptformer download`` fetches it) unpacked into ``<variant>/``; the archive's own
top folder ``<variant>/`` may remain, so ``<variant>/<variant>/`` is accepted too::

    <variant>/config.json                 model, data and loss settings of the checkpoint
    <variant>/model_weights.pt            state dict (gene embedding table included)
    <variant>/vocabs/assay_vocab.json     assay tokens
    <variant>/vocabs/<species>_gene.h5    Ensembl gene ID -> ESM2 protein embedding, one
                                          file per species the variant was trained on

A variant embeds the organisms whose ``<species>_gene.h5`` its config lists (tf_sapiens:
human; tf_exemplar: human, mouse, zebrafish, fruit fly, C. elegans; tf_metazoa: those
plus rabbit, chicken and African clawed frog); other organisms are not applicable.

Preprocessing and model are the package's own: ``transcriptformer.model.inference.run_inference``
with the configuration ``transcriptformer inference`` builds (the package's
``inference_config.yaml`` merged over the checkpoint's ``config.json``): genes are
filtered to the vocabulary (Ensembl IDs, version suffix dropped), expressed genes are
kept in dataset order up to ``seq_len``, counts are clipped at 30 and an assay token is
prepended. The cell embedding is the package's default output, ``obsm["embeddings"]``:
the last transformer layer's outputs at the non-padded gene positions, summed and divided
by the sequence length (``mean_embeddings`` with padded positions zeroed).

Traps handled:

* ``run_inference`` runs a Lightning ``Trainer`` whose ``CSVLogger("logs")`` writes into
  the working directory, which may be read-only: it runs in a fresh temporary folder.
* The package loads its checkpoint with a plain ``load_state_dict`` and counts nothing:
  the model class is swapped, for the call, for a subclass whose loading goes through
  ``load_state_dict_strictly`` (every tensor filled, count reported).
* The assay token is read from an obs column ``assay``; datasets without one get the
  package's ``unknown`` assay, which the model masks out.
* CPU runs use float32 and eager flex attention (``torch.compile`` needs a C compiler);
  CUDA runs use the published ``16-mixed`` precision and compiled attention, as
  ``transcriptformer inference`` does by default. ``precision: 16-mixed`` on CPU runs
  ``bf16-mixed``, as Lightning (and so the command line) does there.
* The package turns the whole count matrix dense: genes outside the vocabulary are dropped
  first (the package drops them too), which keeps that matrix small.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
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

VARIANTS = ("tf_sapiens", "tf_exemplar", "tf_metazoa")
DEFAULT_VARIANT = "tf_sapiens"

#: czb organism name -> species name of TranscriptFormer's ``<species>_gene.h5`` files.
SPECIES = {
    "human": "homo_sapiens",
    "mouse": "mus_musculus",
    "rat": "rattus_norvegicus",
    "zebrafish": "danio_rerio",
    "tropical_clawed_frog": "xenopus_tropicalis",
    "african_clawed_frog": "xenopus_laevis",
    "mouse_lemur": "microcebus_murinus",
    "wild_boar": "sus_scrofa",
    "crab_eating_macaque": "macaca_fascicularis",
    "rhesus_macaque": "macaca_mulatta",
    "platypus": "ornithorhynchus_anatinus",
    "opossum": "monodelphis_domestica",
    "gorilla": "gorilla_gorilla",
    "chimpanzee": "pan_troglodytes",
    "marmoset": "callithrix_jacchus",
    "chicken": "gallus_gallus",
    "rabbit": "oryctolagus_cuniculus",
    "naked_mole_rat": "heterocephalus_glaber",
    "fruit_fly": "drosophila_melanogaster",
    "c_elegans": "caenorhabditis_elegans",
    "sea_lamprey": "petromyzon_marinus",
}

#: Columns the entrypoint adds to the model's input (gene IDs, cell IDs).
GENE_COLUMN = "ensembl_id"
CELL_ID_COLUMN = "czb_cell_id"


def checkpoint_dir(job: Job, variant: str) -> Path:
    """The folder holding the variant's ``config.json``, ``model_weights.pt`` and ``vocabs/``."""
    top = job.weights_path(variant)
    for folder in (top, top / variant):
        if (folder / "config.json").is_file():
            return folder
    msg = f"config.json of {variant} found neither in {top} nor in {top / variant}"
    raise ContractError(msg)


def vocabulary(checkpoint: Path, mapping_files: list[str]) -> set[str]:
    """Gene IDs of the checkpoint's vocabulary (the keys of its ``vocabs/*_gene.h5`` files)."""
    import h5py

    genes: set[str] = set()
    for name in mapping_files:
        with h5py.File(checkpoint / "vocabs" / name, "r") as f:
            genes.update(key.decode() for key in f["keys"][:])
    return genes


def inference_config(checkpoint: Path, checkpoint_config: dict, job: Job, device: str):
    """The configuration ``transcriptformer inference`` builds, set for one czb run.

    Returns
    -------
    An OmegaConf config for ``run_inference``.
    """
    import transcriptformer.cli
    from omegaconf import OmegaConf

    defaults = Path(transcriptformer.cli.__file__).parent / "conf" / "inference_config.yaml"
    cfg = OmegaConf.merge(OmegaConf.create(checkpoint_config), OmegaConf.load(defaults))
    cfg.model.checkpoint_path = str(checkpoint)
    cfg.model.inference_config.load_checkpoint = str(checkpoint / "model_weights.pt")
    cfg.model.data_config.aux_vocab_path = str(checkpoint / "vocabs")
    cfg.model.data_config.esm2_mappings_path = str(checkpoint / "vocabs")

    inference = cfg.model.inference_config
    inference.batch_size = job.request.batch_size
    inference.device = device
    inference.num_gpus = 1
    precision = str(job.parameter("precision"))
    if precision == "auto":
        precision = "16-mixed" if device == "cuda" else "32"
    elif precision == "16-mixed" and device == "cpu":
        # Lightning has no fp16 autocast on CPU and runs bf16-mixed instead (with a
        # warning); naming it here keeps meta.json true and the run unchanged.
        precision = "bf16-mixed"
    inference.precision = precision
    inference.output_keys = ["embeddings"]
    inference.emb_type = "cell"
    inference.obs_keys = [CELL_ID_COLUMN]
    inference.pretrained_embedding = None
    inference.use_oom_dataloader = False

    data = cfg.model.data_config
    data.gene_col_name = GENE_COLUMN
    data.use_raw = False  # the contract's X holds the raw counts
    data.remove_duplicate_genes = True
    data.n_data_workers = 0
    compile_attention = job.parameter("compile")
    if compile_attention == "auto":
        compile_attention = (
            bool(cfg.model.model_config.get("compile_block_mask", True)) and device == "cuda"
        )
    elif isinstance(compile_attention, str):
        compile_attention = compile_attention.strip().lower() in ("1", "true", "yes")
    cfg.model.model_config.compile_block_mask = bool(compile_attention)
    return cfg


@contextlib.contextmanager
def strict_checkpoint_loading(checkpoint_name: str) -> Iterator[list[int]]:
    """Make ``run_inference`` load its checkpoint through ``load_state_dict_strictly``.

    ``run_inference`` imports its model class from ``transcriptformer.model.model`` when
    called; for the duration of the block that name is a subclass whose
    ``load_state_dict`` checks every tensor. Yields a list that receives the number of
    tensors loaded.
    """
    import torch
    from transcriptformer.model import model as model_module

    loaded: list[int] = []

    class StrictLoading:
        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not strict:  # the load itself, called by load_state_dict_strictly
                return super().load_state_dict(state_dict, strict=False, assign=assign)
            loaded.append(load_state_dict_strictly(self, state_dict, name=checkpoint_name))
            return torch.nn.modules.module._IncompatibleKeys([], [])

    originals = {name: getattr(model_module, name) for name in ("Transcriptformer", "ESM2CE")}
    for name, cls in originals.items():
        setattr(model_module, name, type(cls.__name__, (StrictLoading, cls), {}))
    try:
        yield loaded
    finally:
        for name, cls in originals.items():
            setattr(model_module, name, cls)


def model_input(adata, vocab: set[str], aux_columns: list[str]):
    """The AnnData handed to ``run_inference``: vocabulary genes, cell IDs, assay labels."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    gene_ids = np.asarray([str(g).split(".")[0] for g in adata.var_names])
    in_vocab = np.isin(gene_ids, list(vocab))
    if not in_vocab.any():
        msg = (
            f"none of the {adata.n_vars} genes is in the TranscriptFormer vocabulary "
            f"(it needs Ensembl gene IDs, got e.g. {', '.join(map(str, adata.var_names[:3]))})"
        )
        raise ContractError(msg)
    obs = pd.DataFrame(
        {CELL_ID_COLUMN: adata.obs_names.astype(str)}, index=adata.obs_names.astype(str)
    )
    for column in aux_columns:
        # Missing labels become the package's "unknown" token, which the model masks out.
        if column in adata.obs:
            obs[column] = adata.obs[column].astype(str).to_numpy()
        else:
            obs[column] = "unknown"
    var = pd.DataFrame({GENE_COLUMN: adata.var_names[in_vocab].astype(str)})
    var.index = var[GENE_COLUMN].to_numpy()
    counts = sp.csr_matrix(adata.X)[:, np.flatnonzero(in_vocab)]
    return ad.AnnData(X=counts, obs=obs, var=var), int(in_vocab.sum())


def embed(job: Job) -> ModelOutput:
    """Embed every cell with the requested published TranscriptFormer variant.

    Parameters
    ----------
    job
        ``request.variant``: ``tf_sapiens`` (default), ``tf_exemplar`` or ``tf_metazoa``;
        its parameters ``precision`` (Lightning precision; ``auto``: ``16-mixed`` on
        CUDA, ``32`` on CPU) and ``compile`` (compiled flex attention; ``auto``: on CUDA
        when the checkpoint's config allows it).

    Returns
    -------
    The package's cell embeddings (``obsm["embeddings"]``), one per input cell.
    """
    from transcriptformer.model.inference import run_inference

    request = job.request
    variant = request.variant or DEFAULT_VARIANT
    if variant not in VARIANTS:
        msg = f"unknown TranscriptFormer variant {variant!r}; known: {', '.join(VARIANTS)}"
        raise ContractError(msg)
    checkpoint = checkpoint_dir(job, variant)
    checkpoint_config = json.loads((checkpoint / "config.json").read_text())
    data_config = checkpoint_config["model"]["data_config"]
    mapping_files = list(data_config["esm2_mappings"])
    job.require_organism(
        o for o, species in SPECIES.items() if f"{species}_gene.h5" in mapping_files
    )
    if not (checkpoint / "model_weights.pt").is_file():
        msg = f"{checkpoint / 'model_weights.pt'} missing"
        raise ContractError(msg)
    device = resolve_device(request)

    adata = job.read_dataset()
    aux_columns = data_config["aux_cols"].split(",") if data_config.get("aux_cols") else []
    data, n_genes_used = model_input(adata, vocabulary(checkpoint, mapping_files), aux_columns)
    cfg = inference_config(checkpoint, checkpoint_config, job, device)

    with (
        strict_checkpoint_loading("model_weights.pt") as loaded,
        tempfile.TemporaryDirectory(prefix="transcriptformer-") as scratch,
        contextlib.chdir(scratch),  # Lightning's CSVLogger("logs") writes here
    ):
        output = run_inference(cfg, data_files=[data])
    if not loaded:
        msg = "run_inference did not load the checkpoint"
        raise RuntimeError(msg)

    cell_ids = [str(c) for c in output.obs[CELL_ID_COLUMN]]
    if cell_ids != list(data.obs_names):
        msg = f"run_inference returned {len(cell_ids)} cells out of order or incomplete ({data.n_obs} in)"
        raise RuntimeError(msg)
    info = {
        "variant": variant,
        "species": SPECIES[request.organism],
        "n_genes_in": int(adata.n_vars),
        "n_genes_used": n_genes_used,
        "aux_columns_from_obs": [c for c in aux_columns if c in adata.obs],
        "precision": cfg.model.inference_config.precision,
        "compiled_attention": bool(cfg.model.model_config.compile_block_mask),
        "seq_len": int(cfg.model.model_config.seq_len),
    }
    embeddings = np.asarray(output.obsm["embeddings"], dtype=np.float32)
    return ModelOutput(embeddings, cell_ids, n_weight_tensors=loaded[0], info=info)


if __name__ == "__main__":
    main(embed, model="transcriptformer", package="transcriptformer")
