"""Tests of the scGenePT entrypoint against a stand-in of scGenePT's published interface.

scGenePT's code is only in its GitHub repository, which the image fetches at build time
and CI cannot reach; here the modules the entrypoint imports (``utils.data_loading``,
``utils.scgpt_config``, ``models.scGenePT``) are stand-ins injected into ``sys.modules``
with the same names, signatures, file layout and return shapes as at the pinned commit:

- ``load_trained_scgenept_model(adata, model_type, models_dir, model_location, device,
  verbose=False) -> (model, gene_ids)`` reads ``models_dir + 'pretrained/scgpt/vocab.json'``
  and the model type's language embeddings (``models_dir + GENE_EMBED_TYPE2LOCATION[...]``,
  a pickled dict gene -> vector) by string concatenation, the genes from
  ``adata.var['gene_name']``, fills unknown rows of the language table from numpy's global
  generator, and loads the checkpoint with torch's strict ``load_state_dict``;
- ``scGenePT.pred_perturb_from_ctrl(adata_ctrl, perturbation, gene_names, device,
  gene_ids=None, amp=True, pool_size=None, return_mean=True)`` draws ``pool_size`` control
  rows with ``np.random.randint`` (all rows' count when None), densifies them with
  ``.X.toarray()``, flags ``gene_names.index(g)`` for each gene of ``perturbation`` but
  ``ctrl`` and returns the mean prediction, shape ``(1, n_genes)``.

The stand-in model is small and exact: with the weights the tests plant, it predicts
``input + offset[token] + delta × flag`` per gene, so each expected row is computed here
independently (scanpy's normalisation, the vocabulary's token of each gene).

The environment test imports, in this venv (the image's packages), every name scGenePT's
modules import from scgpt, gears, torch_geometric and torchtext at the pinned commit.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import sys
import tarfile
import types
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import (
    CONTAINERS,
    assert_failed,
    assert_not_applicable,
    czb_container,
    load_entrypoint,
    reason,
    write_job,
)
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = CONTAINERS.parent

# --------------------------------------------------------------------------- the stand-in

STANDIN_EMBED_DIM = 6  # GPT-3.5 ada vectors have 1536 entries; the stand-in's, 6
D_MODEL = 3
DELTA = 0.75  # what a perturbation flag adds to its gene's prediction
SPECIALS = ["<pad>", "<cls>", "<eoc>"]
LOCATIONS = {  # utils.data_loading.GENE_EMBED_TYPE2LOCATION at the pinned commit
    "ncbi_gpt": "gene_embeddings/NCBI_gene_embeddings-gpt3.5-ada.pickle",
    "ncbi+uniprot_gpt": "gene_embeddings/NCBI+UniProt_embeddings-gpt3.5-ada.pkl",
    "go_c_gpt_concat": "gene_embeddings/GO_C_gene_embeddings-gpt3.5-ada-concat.pickle",
    "go_p_gpt_concat": "gene_embeddings/GO_P_gene_embeddings-gpt3.5-ada-concat.pickle",
    "go_f_gpt_concat": "gene_embeddings/GO_F_gene_embeddings-gpt3.5-ada-concat.pickle",
    "go_all_gpt_concat": "gene_embeddings/GO_all_gene_embeddings-gpt3.5-ada-concat.pickle",
}
REPRESENTATIONS = {  # get_embs_to_include at the pinned commit, for the zoo's model types
    "scgpt": ["scGPT_counts_embs", "scGPT_token_embs"],
    "scgenept_ncbi_gpt": ["scGPT_counts_embs", "scGPT_token_embs", "genePT_token_embs_gpt"],
    "scgenept_ncbi+uniprot_gpt": ["scGPT_counts_embs", "scGPT_token_embs", "genePT_token_embs_gpt"],
    **{f"scgenept_go_{k}_gpt_concat": ["GO_token_embs_gpt_concat", "scGPT_counts_embs", "scGPT_token_embs"]
       for k in ("c", "f", "p", "all")},
}
CALLS: list[dict] = []  # every pred_perturb_from_ctrl call, for the tests to inspect


def language_key(model_type: str) -> str | None:
    if "genePT_token_embs_gpt" in REPRESENTATIONS[model_type]:
        return model_type.split("_")[1] + "_gpt"
    if "GO_token_embs_gpt_concat" in REPRESENTATIONS[model_type]:
        return f"go_{model_type.split('go_')[1].split('_')[0]}_gpt_concat"
    return None


class StandInScGenePT(nn.Module):
    """scGenePT's model class in small: token, value, perturbation-flag and (optional)
    language encoders summed, then a linear decoder per position."""

    def __init__(self, ntoken: int, language: np.ndarray | None = None, pert_pad_id: int = 2):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, D_MODEL)
        self.value_encoder = nn.Linear(1, D_MODEL)
        self.pert_encoder = nn.Embedding(3, D_MODEL, padding_idx=pert_pad_id)
        if language is not None:
            self.genept_encoder = nn.Embedding.from_pretrained(torch.from_numpy(language).float(), freeze=False)
            self.genept_proj = nn.Linear(language.shape[1], D_MODEL)
        self.decoder = nn.Linear(D_MODEL, 1)

    def forward(self, src, values, input_pert_flags, src_key_padding_mask, CLS=False, CCE=False,  # noqa: N803
                MVC=False, ECS=False, do_sample=False):
        assert src.dtype == torch.long and input_pert_flags.dtype == torch.long
        assert values.dtype == torch.float32
        assert src.shape == values.shape == input_pert_flags.shape == src_key_padding_mask.shape
        hidden = self.encoder(src) + self.value_encoder(values.unsqueeze(-1)) + self.pert_encoder(input_pert_flags)
        if hasattr(self, "genept_encoder"):
            hidden = hidden + self.genept_proj(self.genept_encoder(src))
        return {"mlm_output": self.decoder(hidden).squeeze(-1)}

    def pred_perturb_from_ctrl(self, adata_ctrl, perturbation, gene_names, device, gene_ids=None,
                               amp=True, pool_size=None, return_mean=True):
        CALLS.append({"perturbation": perturbation, "device": device, "amp": amp,
                      "pool_size": pool_size, "return_mean": return_mean})
        self.eval()
        tokens = torch.tensor(gene_ids).long().unsqueeze(0).to(device)
        draws = len(adata_ctrl) if pool_size is None else pool_size
        cells = np.array(adata_ctrl[np.random.randint(0, len(adata_ctrl), draws)].X.toarray())
        outputs = []
        for cell in cells:
            flags = np.zeros(len(cell))
            for gene in perturbation.split("+"):
                if gene != "ctrl":
                    flags[gene_names.index(gene)] = 1
            with torch.no_grad():
                out = self(tokens, torch.from_numpy(cell[None]).float().to(device),
                           torch.from_numpy(flags).long().unsqueeze(0).to(device),
                           torch.zeros_like(tokens, dtype=torch.bool))
            outputs.append(out["mlm_output"].float().cpu().numpy())
        return np.mean(outputs, axis=0) if return_mean else np.array(outputs)


def load_trained_scgenept_model(adata, model_type, models_dir, model_location, device, verbose=False):
    embs = REPRESENTATIONS[model_type]  # an unknown model type fails, as at the pinned commit
    with open(models_dir + "pretrained/scgpt/vocab.json") as f:
        vocab = json.load(f)
    for token in SPECIALS:
        vocab.setdefault(token, len(vocab))
    genes = adata.var["gene_name"].tolist()
    adata.var["id_in_vocab"] = [1 if g in vocab else -1 for g in genes]
    gene_ids = np.array([vocab.get(g, vocab["<pad>"]) for g in genes], dtype=int)
    language = None
    key = language_key(model_type)
    if key is not None:
        with open(models_dir + LOCATIONS[key], "rb") as f:
            published = pickle.load(f)
        language = np.random.uniform(-0.1, 0.1, (len(vocab), STANDIN_EMBED_DIM))
        for gene in genes:
            if gene in published:
                language[vocab.get(gene, vocab["<pad>"])] = published[gene]
    model = StandInScGenePT(len(vocab), language)
    state = torch.load(model_location, weights_only=True, map_location=device)
    model.load_state_dict({k.replace("Wqkv.", "in_proj_"): v for k, v in state.items()})
    assert embs  # the real loader prints them
    model.to(device)
    return model, gene_ids


def install_standin() -> None:
    """Register the stand-in as scGenePT's ``utils`` and ``models`` packages."""
    utils, models = types.ModuleType("utils"), types.ModuleType("models")
    utils.__path__, models.__path__ = [], []
    config = types.ModuleType("utils.scgpt_config")
    config.PAD_TOKEN, config.SPECIAL_TOKENS, config.PAD_VALUE, config.PERT_PAD_ID = "<pad>", SPECIALS, 0, 2
    loading = types.ModuleType("utils.data_loading")
    loading.GENE_EMBED_TYPE2LOCATION = dict(LOCATIONS, **{
        "go_c_gpt_avg": "gene_embeddings/GO_C_gene_embeddings-gpt3.5-ada-avg.pickle"})
    loading.GPT_ADA_002_EMBED_DIM = STANDIN_EMBED_DIM
    loading.get_embs_to_include = lambda model_type: list(REPRESENTATIONS[model_type])
    loading.load_trained_scgenept_model = load_trained_scgenept_model
    model_module = types.ModuleType("models.scGenePT")
    model_module.scGenePT = StandInScGenePT
    utils.scgpt_config, utils.data_loading, models.scGenePT = config, loading, model_module
    sys.modules.update({"utils": utils, "utils.scgpt_config": config, "utils.data_loading": loading,
                        "models": models, "models.scGenePT": model_module})


install_standin()
ep = load_entrypoint("scgenept")

# --------------------------------------------------------------------------- data and weights

GENES = [f"G{i}" for i in range(12)] + ["NOVOC"]  # NOVOC: no token in the vocabulary
# The vocabulary file (contiguous indices, genes in reverse order), then the specials the
# loader appends.
VOCAB_FILE = {"OTHER": 0} | {f"G{i}": 12 - i for i in range(12)}
VOCAB = VOCAB_FILE | {"<pad>": 13, "<cls>": 14, "<eoc>": 15}
NTOKEN = 16
OFFSETS = np.linspace(-0.5, 0.5, NTOKEN)  # what each token adds to its gene's prediction
NORMAN = "norman"


def screen(*, identical_controls: bool, n_controls: int = 8, seed: int = 0) -> ad.AnnData:
    """Training cells as the host writes them: raw counts, obs condition and batch."""
    rng = np.random.default_rng(seed)
    conditions = ["ctrl"] * n_controls + ["G3"] * 4 + ["G5+G7"] * 4
    counts = rng.poisson(4.0, size=(len(conditions), len(GENES))).astype(np.float32) + 1
    if identical_controls:
        counts[:n_controls] = counts[0]
    obs = pd.DataFrame({"condition": conditions, "batch": ["b0"] * len(conditions)},
                       index=pd.Index([f"cell{i}" for i in range(len(conditions))]))
    return ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame({"gene_symbol": GENES}, index=GENES))


def planted_state(model_type: str, *, ntoken: int = NTOKEN) -> dict[str, torch.Tensor]:
    """Weights of the stand-in with which it predicts ``input + OFFSETS[token] + DELTA × flag``."""
    key = language_key(model_type)
    language = np.zeros((ntoken, STANDIN_EMBED_DIM)) if key else None
    model = StandInScGenePT(ntoken, language)
    with torch.no_grad():
        model.encoder.weight[:, 0] = torch.from_numpy(np.resize(OFFSETS, ntoken)).float()
        model.value_encoder.weight.copy_(torch.tensor([[1.0], [0.0], [0.0]]))
        model.value_encoder.bias.zero_()
        model.pert_encoder.weight[:, 0] = torch.tensor([0.0, DELTA, 0.0])
        if key:  # language vectors reach dimensions the decoder ignores
            model.genept_proj.weight[0] = 0
            model.genept_proj.bias[0] = 0
        model.decoder.weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        model.decoder.bias.zero_()
    return model.state_dict()


def stage_weights(weights: Path, folder: str = "scgpt", model_type: str = "scgpt", **kwargs) -> Path:
    """The authors' ``models/`` layout: vocabulary, language embeddings, one checkpoint."""
    (weights / "pretrained" / "scgpt").mkdir(parents=True, exist_ok=True)
    (weights / "pretrained" / "scgpt" / "vocab.json").write_text(json.dumps(VOCAB_FILE))
    key = language_key(model_type)
    if key:  # staged as czb names it: "+" written "_"
        path = weights / LOCATIONS[key].replace("+", "_")
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        path.write_bytes(pickle.dumps({g: rng.normal(size=STANDIN_EMBED_DIM) for g in GENES[:8]}))
    checkpoint = weights / "finetuned" / folder / NORMAN / "best_model_seed_42.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(planted_state(model_type, **kwargs), checkpoint)
    return checkpoint


def job(tmp_path: Path, adata=None, *, test_conditions=("G3", "G5+G7", "G11"), pool_size=4, seed=0,
        task=czb_container.TASK_EXPRESSION_SHIFT, **request) -> dict[str, Path]:
    adata = screen(identical_controls=True) if adata is None else adata
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_job(tmp_path, adata, model="scgenept", task=task, seed=seed, gene_id_type="symbol",
                     batch_keys=["batch"], condition_key="condition", control_label="ctrl",
                     test_conditions=list(test_conditions), parameters={"pool_size": pool_size}, **request)


def run(dirs: dict[str, Path]) -> int:
    return czb_container.run(ep.predict, model="scgenept", input_dir=dirs["input"],
                             weights_dir=dirs["weights"], output_dir=dirs["output"])


def predictions(dirs: dict[str, Path]) -> tuple[ad.AnnData, dict]:
    out = ad.read_h5ad(dirs["output"] / czb_container.PREDICTIONS_FILE)
    return out, json.loads((dirs["output"] / czb_container.META_FILE).read_text())


def expected_rows(adata: ad.AnnData, control_row: int, conditions) -> np.ndarray:
    """``log1p(counts / total × 1e4)`` of a control cell (scanpy) + token offsets + flags."""
    import scanpy as sc

    normalised = adata.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    base = normalised.X[control_row].toarray().ravel()
    tokens = np.array([VOCAB.get(g, VOCAB["<pad>"]) for g in GENES])
    rows = []
    for condition in conditions:
        flags = np.isin(GENES, condition.split("+")).astype(float)
        rows.append(base + OFFSETS[tokens] + DELTA * flags)
    return np.array(rows)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("folder", "model_type"), [
    ("scgpt", "scgpt"),
    ("scgenept_ncbi_uniprot", "scgenept_ncbi+uniprot_gpt"),
    ("scgenept_go_c", "scgenept_go_c_gpt_concat"),
])
def test_each_condition_is_predicted_from_the_controls(tmp_path, folder, model_type):
    dirs = job(tmp_path)
    checkpoint = stage_weights(dirs["weights"], folder, model_type)
    CALLS.clear()
    assert run(dirs) == 0
    out, meta = predictions(dirs)
    conditions = ["G3", "G5+G7", "G11"]
    assert list(out.obs_names) == conditions and list(out.var_names) == GENES
    assert out.X.dtype == np.float32
    np.testing.assert_allclose(out.X, expected_rows(screen(identical_controls=True), 0, conditions),
                               rtol=0, atol=1e-5)
    assert [c["perturbation"] for c in CALLS] == ["G3+ctrl", "G5+G7", "G11+ctrl"]
    assert all(c["pool_size"] == 4 and c["amp"] is False and c["device"] == "cpu" and c["return_mean"]
               for c in CALLS)
    assert meta["model_type"] == model_type and meta["finetuned_on"] == NORMAN
    assert meta["checkpoint"] == str(checkpoint.relative_to(dirs["weights"]))
    assert meta["n_weight_tensors_loaded"] == len(planted_state(model_type)) > 0
    assert meta["gene_representations"] == REPRESENTATIONS[model_type]
    assert meta["version"] == ep.scgenept_source.COMMIT
    assert meta["n_genes_in_vocab"] == len(GENES) - 1 and meta["n_control_cells"] == 8
    assert meta["weights_checksum"] == czb_container.weights_checksum(dirs["weights"])


def test_control_draws_follow_the_seed_and_pool_size(tmp_path):
    adata = screen(identical_controls=False)
    runs = {}
    for name, seed, pool in (("a", 3, 2), ("b", 3, 2), ("c", 4, 2), ("one", 5, 1), ("all", 3, 0)):
        dirs = job(tmp_path / name, adata, seed=seed, pool_size=pool)
        stage_weights(dirs["weights"])
        CALLS.clear()
        assert run(dirs) == 0
        runs[name] = predictions(dirs)
    np.testing.assert_array_equal(runs["a"][0].X, runs["b"][0].X)
    assert not np.allclose(runs["a"][0].X, runs["c"][0].X)
    # One draw per condition: each row is one control cell's prediction, exactly.
    single = runs["one"][0].X
    candidates = np.array([expected_rows(adata, cell, ["G3", "G5+G7", "G11"]) for cell in range(8)])
    for row in range(3):
        assert np.abs(candidates[:, row] - single[row]).max(axis=1).min() < 1e-5
    # pool_size 0: as many draws as control cells (the authors' pool_size=None).
    assert CALLS[-1]["pool_size"] is None and runs["all"][1]["controls_per_condition"] == 8


def test_control_cells_without_counts_are_left_out(tmp_path):
    adata = screen(identical_controls=True)
    x = adata.X.tolil()
    x[7, :] = 0
    adata.X = x.tocsr()
    dirs = job(tmp_path, adata)
    stage_weights(dirs["weights"])
    assert run(dirs) == 0
    out, meta = predictions(dirs)
    assert meta["n_control_cells"] == 7 and meta["n_control_cells_without_counts"] == 1
    assert np.isfinite(out.X).all()


@pytest.mark.parametrize(("condition", "words"), [
    ("G3+ABSENT", ["ABSENT is not among the input genes"]),
    ("NOVOC", ["NOVOC has no token"]),
])
def test_a_condition_scgenept_cannot_encode_makes_the_run_not_applicable(tmp_path, condition, words):
    dirs = job(tmp_path, test_conditions=["G3", condition])
    stage_weights(dirs["weights"])
    code = run(dirs)
    assert_not_applicable(code, dirs)
    assert "1 of 2 test conditions" in reason(dirs)
    for word in words:
        assert word in reason(dirs)


@pytest.mark.parametrize(("fields", "word"), [
    ({"task": czb_container.TASK_MASKED_GENE}, "hidden entries"),
    ({"task": czb_container.TASK_EMBEDDING}, "perturbation predictor"),
    ({"organism": "mouse"}, "mouse"),
])
def test_masked_genes_embedding_and_mouse_are_not_applicable(tmp_path, fields, word):
    dirs = job(tmp_path, **fields)
    stage_weights(dirs["weights"])
    assert_not_applicable(run(dirs), dirs)
    assert word in reason(dirs)


def test_weights_problems_fail_clearly(tmp_path):
    # A checkpoint for another vocabulary: the loader's strict load refuses it.
    dirs = job(tmp_path / "vocab")
    stage_weights(dirs["weights"], ntoken=NTOKEN + 1)
    assert_failed(run(dirs), dirs, "size mismatch")
    # Two checkpoints, or none.
    dirs = job(tmp_path / "two")
    stage_weights(dirs["weights"])
    stage_weights(dirs["weights"], "scgenept_go_c", "scgenept_go_c_gpt_concat")
    assert_failed(run(dirs), dirs, "found 2")
    dirs = job(tmp_path / "none")
    assert_failed(run(dirs), dirs, "found 0")
    # The variant's language embeddings missing.
    dirs = job(tmp_path / "language")
    stage_weights(dirs["weights"], "scgenept_ncbi_uniprot", "scgenept_ncbi+uniprot_gpt")
    (dirs["weights"] / "gene_embeddings" / "NCBI_UniProt_embeddings-gpt3.5-ada.pkl").unlink()
    assert_failed(run(dirs), dirs, "NCBI_UniProt_embeddings-gpt3.5-ada.pkl", "missing")


def test_scgenept_conditions_use_gears_names():
    assert ep.perturbed_genes("ctrl", "ctrl") == []
    assert ep.perturbed_genes("A+ctrl", "ctrl") == ["A"]
    assert ep.perturbed_genes("A+B", "non-targeting") == ["A", "B"]
    assert ep.perturbed_genes("non-targeting", "non-targeting") == []
    assert [ep.scgenept_condition(g) for g in ([], ["A"], ["A", "B"])] == ["ctrl", "A+ctrl", "A+B"]


# --------------------------------------------------------------------------- the image's side

#: What models/scGenePT.py and utils/data_loading.py import from installed packages at the
#: pinned commit (their own modules aside): the image must provide every name.
SCGENEPT_IMPORTS = {
    "torchtext.vocab": ["Vocab"],
    "torchtext._torchtext": ["Vocab"],
    "torch_geometric.loader": ["DataLoader"],
    "gears": ["PertData", "GEARS"],
    "gears.inference": ["compute_metrics", "deeper_analysis", "non_dropout_analysis"],
    "gears.utils": ["create_cell_graph_dataset_for_prediction"],
    "scgpt.model": ["TransformerGenerator", "ExprDecoder", "MVCDecoder", "ContinuousValueEncoder",
                    "FastTransformerEncoderWrapper", "FlashTransformerEncoderLayer"],
    "scgpt.loss": ["masked_mse_loss", "criterion_neg_log_bernoulli", "masked_relative_error"],
    "scgpt.tokenizer": ["tokenize_batch", "pad_batch", "tokenize_and_pad_batch"],
    "scgpt.tokenizer.gene_tokenizer": ["GeneVocab"],
    "scgpt.utils": ["set_seed", "map_raw_id_to_vocab_id", "load_pretrained"],
    "matplotlib.pyplot": [],
    "tqdm": ["trange"],
}


def test_the_image_packages_provide_what_scgenept_imports():
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module, names in SCGENEPT_IMPORTS.items():
            loaded = importlib.import_module(module)
            missing = [n for n in names if not hasattr(loaded, n)]
            assert not missing, f"{module} lacks {missing}"
    # The vocabulary class scGenePT's loader uses works on the shim.
    from scgpt.tokenizer.gene_tokenizer import GeneVocab

    vocab = GeneVocab.from_dict({"A": 0, "B": 1})
    for token in SPECIALS:
        vocab.append_token(token)
    vocab.set_default_index(vocab["<pad>"])
    assert vocab.lookup_indices(["B", "nope"]) == [1, vocab["<pad>"]]


def test_one_commit_is_pinned_everywhere():
    source = ep.scgenept_source
    assert re.fullmatch(r"[0-9a-f]{40}", source.COMMIT)
    assert source.git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob
    dockerfile = (HERE / "Dockerfile").read_text()
    assert "scgenept_source.py /opt/scgenept" in dockerfile and "PYTHONPATH=/opt/scgenept" in dockerfile
    assert source.COMMIT in (HERE / "README.md").read_text()
    spec = (ROOT / "configs" / "models" / "scgenept.yaml").read_text()
    assert f"czi-ai/scGenePT/{source.COMMIT}/models/pretrained/scgpt/vocab.json" in spec
    assert "ci_built: false" in spec


def archive(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"scGenePT-{ep.scgenept_source.COMMIT}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_the_fetched_code_is_checked_against_the_commit(tmp_path, monkeypatch):
    source = ep.scgenept_source
    files = {name: f"# {name}\n".encode() for name in source.BLOBS}
    with pytest.raises(ValueError, match="blob hash"):
        source.unpack(archive(files), tmp_path / "wrong")
    with pytest.raises(ValueError, match="lacks"):
        source.unpack(archive({"LICENSE": b""}), tmp_path / "short")
    assert not (tmp_path / "wrong").exists() and not (tmp_path / "short").exists()
    monkeypatch.setattr(source, "BLOBS", {n: source.git_blob_sha1(d) for n, d in files.items()})
    written = source.unpack(archive({**files, "README.md": b"not needed"}), tmp_path / "right")
    assert written == sorted(files)
    assert (tmp_path / "right" / "models" / "scGenePT.py").read_bytes() == files["models/scGenePT.py"]
    assert not (tmp_path / "right" / "README.md").exists()
    assert (tmp_path / "right" / "COMMIT").read_text().strip() == source.COMMIT
