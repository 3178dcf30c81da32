"""Parity with the authors' code: opt-in, for whoever builds the image (needs scGenePT's source).

CI cannot reach GitHub, so this test is skipped there. With the repository at the pinned
commit checked out (``git clone https://github.com/czi-ai/scGenePT`` then ``git checkout``
the commit in ``scgenept_source.COMMIT``), run it as::

    CZB_SCGENEPT_SOURCE=/path/to/scGenePT \\
        .venvs/scgenept/bin/python -m pytest -q -p no:cacheprovider containers/scgenept/test_parity.py

It checks that the source is that commit (git blob hashes of the files the image takes),
then, for three model types, writes a random fine-tuned checkpoint of the authors'
``scGenePT`` class (their 12 × 512 configuration, a 31-token vocabulary), runs czb's
entrypoint end to end with the real modules, and compares its predictions with the authors'
``load_trained_scgenept_model`` and ``pred_perturb_from_ctrl`` called directly on controls
normalised by scanpy, with the same seed: equal within 1e-6 (measured: 4.5e-8 at most).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import CONTAINERS, czb_container, import_file, write_job

SOURCE = os.environ.get("CZB_SCGENEPT_SOURCE")
GENES = [f"G{i}" for i in range(30)] + ["NOVOC"]
VOCAB = {"OTHER": 0, **{f"G{i}": 30 - i for i in range(30)}, "<pad>": 31, "<cls>": 32, "<eoc>": 33}
TESTS = {"G3": "G3+ctrl", "G5+G7": "G5+G7", "G11": "G11+ctrl", "G2+G20": "G2+G20"}
SEED, POOL = 7, 5


@pytest.fixture
def real(monkeypatch):
    """The entrypoint loaded over the real scGenePT modules (the stand-ins of
    test_entrypoint.py set aside for this test)."""
    if not SOURCE:
        pytest.skip("CZB_SCGENEPT_SOURCE (a checkout of czi-ai/scGenePT at the pinned commit) not set")
    source = import_file(CONTAINERS / "scgenept" / "scgenept_source.py", "scgenept_source_parity")
    for relative, blob in source.BLOBS.items():
        assert source.git_blob_sha1(Path(SOURCE, relative).read_bytes()) == blob, f"{relative} is not the commit's"
    for name in list(sys.modules):
        if name in ("utils", "models") or name.startswith(("utils.", "models.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(SOURCE)
    ep = import_file(CONTAINERS / "scgenept" / "entrypoint.py", "czb_entrypoint_scgenept_parity")
    import utils.data_loading as loading
    from models.scGenePT import scGenePT

    return ep, loading, scGenePT


def screen() -> ad.AnnData:
    rng = np.random.default_rng(0)
    conditions = ["ctrl"] * 12 + ["G3"] * 5 + ["G5+G7"] * 5
    counts = rng.poisson(3.0, size=(len(conditions), len(GENES))) + (rng.random((len(conditions), len(GENES))) < 0.3)
    obs = pd.DataFrame({"condition": conditions, "batch": "b0"}, index=[f"c{i}" for i in range(len(conditions))])
    return ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs,
                      var=pd.DataFrame({"gene_symbol": GENES}, index=GENES))


@pytest.mark.parametrize(("folder", "model_type", "embeddings"), [
    ("scgenept_ncbi_uniprot", "scgenept_ncbi+uniprot_gpt", "NCBI+UniProt_embeddings-gpt3.5-ada.pkl"),
    ("scgenept_go_c", "scgenept_go_c_gpt_concat", "GO_C_gene_embeddings-gpt3.5-ada-concat.pickle"),
    ("scgpt", "scgpt", None),
])
def test_predictions_equal_the_authors_functions(tmp_path, real, folder, model_type, embeddings):
    import scanpy as sc
    from scgpt.tokenizer.gene_tokenizer import GeneVocab

    ep, loading, scgenept_class = real
    adata = screen()
    dirs = write_job(tmp_path, adata, model="scgenept", task=czb_container.TASK_EXPRESSION_SHIFT, seed=SEED,
                     gene_id_type="symbol", batch_keys=["batch"], condition_key="condition",
                     control_label="ctrl", test_conditions=list(TESTS), parameters={"pool_size": POOL})
    # The same files twice: as czb stages them ("+" written "_") and as the authors name them.
    authors = tmp_path / "authors"
    for root, name in ((dirs["weights"], embeddings and embeddings.replace("+", "_")), (authors, embeddings)):
        (root / "pretrained" / "scgpt").mkdir(parents=True)
        (root / "pretrained" / "scgpt" / "vocab.json").write_text(json.dumps(VOCAB))
        if name:
            rng = np.random.default_rng(1)
            (root / "gene_embeddings").mkdir()
            (root / "gene_embeddings" / name).write_bytes(
                pickle.dumps({g: rng.normal(size=loading.GPT_ADA_002_EMBED_DIM) / 40 for g in GENES[:20]}))
    # A random "fine-tuned" checkpoint of the authors' class, configured as their loader does.
    vocab = GeneVocab.from_file(authors / "pretrained" / "scgpt" / "vocab.json")
    represented = loading.get_embs_to_include(model_type)
    genept, genept_type, genept_dim, _ = loading.initialize_genept_embeddings(
        represented, GENES, vocab, model_type, f"{authors}/")
    go, go_type, go_dim, _ = loading.initialize_go_embeddings(represented, GENES, vocab, model_type, f"{authors}/")
    torch.manual_seed(1)
    model = scgenept_class(
        ntoken=len(vocab), d_model=loading.EMBSIZE, nhead=loading.NHEAD, d_hid=loading.D_HID,
        nlayers=loading.NLAYERS, nlayers_cls=loading.N_LAYERS_CLS, n_cls=loading.N_CLS, vocab=vocab,
        n_perturbagens=2, dropout=0.0, pad_token=loading.PAD_TOKEN, pad_value=loading.PAD_VALUE,
        pert_pad_id=loading.PERT_PAD_ID, use_fast_transformer=False, embs_to_include=represented,
        genept_embs=genept, genept_emb_type=genept_type, genept_emb_size=genept_dim,
        go_embs_to_include=go, go_emb_type=go_type, go_emb_size=go_dim)
    checkpoint = dirs["weights"] / "finetuned" / folder / "norman" / "best_model.pt"
    checkpoint.parent.mkdir(parents=True)
    torch.save(model.state_dict(), checkpoint)

    code = czb_container.run(ep.predict, model="scgenept", input_dir=dirs["input"],
                             weights_dir=dirs["weights"], output_dir=dirs["output"])
    assert code == 0
    out = ad.read_h5ad(dirs["output"] / czb_container.PREDICTIONS_FILE)
    meta = json.loads((dirs["output"] / czb_container.META_FILE).read_text())
    assert meta["n_weight_tensors_loaded"] == len(model.state_dict())

    # The authors' functions, directly: scanpy's normalisation, the contract's seeding.
    czb_container.seed_everything(SEED)
    controls = adata[adata.obs["condition"] == "ctrl"].copy()
    sc.pp.normalize_total(controls, target_sum=1e4)
    sc.pp.log1p(controls)
    controls.X = sp.csr_matrix(controls.X)
    controls.var = pd.DataFrame({"gene_name": GENES}, index=GENES)
    loaded, gene_ids = loading.load_trained_scgenept_model(controls, model_type, f"{authors}/", str(checkpoint), "cpu")
    expected = np.vstack([
        loaded.pred_perturb_from_ctrl(controls, perturbation, GENES, "cpu", gene_ids, amp=False, pool_size=POOL)
        for perturbation in TESTS.values()])
    np.testing.assert_allclose(out.X, expected, rtol=0, atol=1e-6)
    assert np.abs(out.X[0] - out.X[2]).max() > 1e-4  # the conditions differ: the flags reach the model
