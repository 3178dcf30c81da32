"""Parity of czb's TranscriptFormer entrypoint with the authors' own inference.

The authors' path is the package's command line, ``transcriptformer inference``
(``transcriptformer.cli.main`` -> ``run_inference_cli`` -> ``run_inference``), run here
in-process on an ``.h5ad`` file and the same tiny random checkpoint in the published
layout (``test_entrypoint.write_checkpoint``); it writes ``embeddings.h5ad`` whose
``obsm["embeddings"]`` are the cell embeddings. czb's path is the entrypoint run under the
contract (input folder with ``dataset.h5ad`` and ``request.json``, weights, output).

The checkpoint knows 300 genes with ``seq_len`` 63, so the package's own gene selection
is exercised: genes outside the vocabulary (interleaved in the columns) are dropped,
version suffixes are stripped, expressed genes are kept in column order and cut after
63, counts are clipped at 30, an assay token (also one the vocabulary lacks) is read
from ``obs["assay"]``. One cell has no vocabulary gene expressed, one a single count.
Neither path drops a cell (``min_expressed_genes`` and ``filter_outliers`` are 0 in the
published configs); both keep the input order.

Where czb's defaults differ from the command line's, and the setting that gives the
command line's behaviour:

* precision: the CLI defaults to ``16-mixed`` (which Lightning runs as ``bf16-mixed`` on
  CPU); czb's ``precision: auto`` is ``16-mixed`` on CUDA and ``32`` on CPU.
  ``precision: 16-mixed`` is the CLI's default on either device.
* compiled flex attention: the CLI compiles; czb's ``compile: auto`` compiles on CUDA
  only (on CPU ``torch.compile`` needs a C compiler and tens of seconds). ``compile: "true"``
  is the CLI's. ``test_parameters_reproduce_cli_defaults`` checks both settings against
  the CLI's defaults on CPU; on CUDA czb's defaults are the CLI's defaults
  (``test_same_embeddings_as_cli_defaults_on_cuda``, run only where CUDA is).
* duplicate genes after the version suffix is stripped: the CLI stops with an error
  unless ``--remove-duplicate-genes``; czb keeps the first, as that flag does.
* ``.raw``: the CLI's ``--use-raw auto`` takes ``adata.raw.X`` when present; the contract's
  ``X`` holds the raw counts, so czb reads ``X`` (``--use-raw false``).
* a dataset without an ``assay`` column: the CLI fails; czb gives every cell the
  package's ``unknown`` assay, which the model masks out.

Tolerance: both paths feed the same float32 tensors, in the same batches, through the same
package code on the same device, so they agree to float32 rounding (measured: exactly,
max |diff| 0); ``rtol=1e-5, atol=1e-6`` (some tens of float32 ulps for embeddings of
order 1) leaves room for a different BLAS thread split only, and is far below what a
wrong gene, order, clip or precision gives (bf16 against float32 alone: ~3e-3). On CUDA
with 16-mixed precision the bound is ``atol=2e-3`` (half-precision rounding of order-1
values).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_output

torch = pytest.importorskip("torch")
pytest.importorskip("transcriptformer")

from test_entrypoint import TRANSCRIPTFORMER, checkpoint_config, write_checkpoint  # noqa: E402

N_VOCAB = 300
N_FOREIGN = 60
N_CELLS = 60
SEQ_LEN = checkpoint_config(["homo_sapiens"])["model"]["model_config"]["seq_len"]
CLIP = 30
VOCAB = [f"ENSG{i:011d}" for i in range(N_VOCAB)]
ASSAYS = ["10x 3' v3", "Smart-seq2", "unknown", "sci-RNA-seq3"]  # the last: not in the vocabulary
#: The CLI's flags for what czb's spec defaults are on CPU.
FP32_EAGER = ["--device", "cpu", "--precision", "32", "--disable-compile-block-mask"]
#: Cells per forward pass on both paths (rows are independent: each cell has its own
#: attention mask and the package's padding rows are cut off); 32 rather than the
#: default 8 because eager flex attention costs about a second per batch on CPU.
BATCH = 32


def parity_counts(seed: int = 21):
    """Sparse, heavy-tailed raw counts of 64 cells over 300 vocabulary and 60 foreign genes.

    Negative binomial counts (dispersion 0.4) around log-normal gene rates and cell sizes:
    about 80 % zeros, a few counts above the clip, a third of the cells with more
    expressed vocabulary genes than ``seq_len``. Columns are shuffled (foreign genes
    in between), a third of the IDs carry a version suffix, cell IDs are unsorted
    barcodes. Cell 3 keeps 2 vocabulary genes, cell 4 none (foreign genes only), cell 5 a
    single count.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    foreign = [f"ENSG{900_000 + i:011d}" for i in range(N_FOREIGN)]
    genes = np.array(VOCAB + foreign)
    rate = rng.lognormal(-2.0, 1.5, size=len(genes))
    size = rng.lognormal(0.0, 1.0, size=(N_CELLS, 1))
    mean = rate * size
    counts = rng.negative_binomial(0.4, 0.4 / (0.4 + mean)).astype(np.float32)
    vocab_columns = np.arange(N_VOCAB)
    expressed = vocab_columns[counts[3, :N_VOCAB] > 0]
    counts[3, np.setdiff1d(vocab_columns, expressed[:2])] = 0
    counts[4, :N_VOCAB] = 0
    counts[4, N_VOCAB:][:3] = [2, 1, 5]
    counts[5] = 0
    counts[5, int(np.argmax(rate[:N_VOCAB]))] = 1

    order = rng.permutation(len(genes))
    names = [f"{g}.{rng.integers(1, 9)}" if rng.random() < 1 / 3 else g for g in genes[order]]
    barcodes = ["".join(rng.choice(list("ACGT"), 12)) + "-1" for _ in range(N_CELLS)]
    obs = pd.DataFrame(
        {"assay": pd.Categorical(rng.choice(ASSAYS, N_CELLS))}, index=pd.Index(barcodes)
    )
    var = pd.DataFrame({"ensembl_id": names}, index=pd.Index(names))
    return ad.AnnData(X=sp.csr_matrix(counts[:, order]), obs=obs, var=var)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights folder with a tf_sapiens of 300 human genes."""
    folder = tmp_path_factory.mktemp("transcriptformer-parity") / "weights"
    write_checkpoint(folder / "tf_sapiens", {"homo_sapiens": VOCAB})
    return folder


def run_czb(tmp_path: Path, weights: Path, adata, **parameters):
    """czb's entrypoint end to end; returns embeddings, cell IDs and meta."""
    dirs = TRANSCRIPTFORMER.job(tmp_path / "czb", adata, batch_size=BATCH, parameters=parameters)
    assert TRANSCRIPTFORMER.run(dirs, weights) == 0
    return read_output(dirs["output"])


def run_cli(tmp_path: Path, checkpoint: Path, adata, *flags: str):
    """``transcriptformer inference`` on ``adata`` written to an .h5ad file.

    Returns the embeddings and the cell IDs (an obs column the CLI copies through) of
    the file it writes.
    """
    import anndata as ad
    import transcriptformer.cli

    folder = tmp_path / "cli"
    folder.mkdir(parents=True)
    data = adata.copy()
    data.obs["cell_id"] = data.obs_names.astype(str)
    data.write_h5ad(folder / "data.h5ad")
    argv = [
        "transcriptformer", "inference",
        "--checkpoint-path", str(checkpoint),
        "--data-file", str(folder / "data.h5ad"),
        "--output-path", str(folder / "out"),
        "--batch-size", str(BATCH),
        *flags,
    ]  # fmt: skip
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sys, "argv", argv)
        m.chdir(folder)  # Lightning's CSVLogger("logs")
        transcriptformer.cli.main()
    out = ad.read_h5ad(folder / "out" / "embeddings.h5ad")
    return np.asarray(out.obsm["embeddings"]), [str(c) for c in out.obs["cell_id"]]


@pytest.fixture(scope="module")
def cli_fp32(tmp_path_factory, weights):
    """The CLI's embeddings of ``parity_counts()`` in float32 with eager attention."""
    tmp_path = tmp_path_factory.mktemp("cli-fp32")
    return run_cli(tmp_path, weights / "tf_sapiens", parity_counts(), *FP32_EAGER)


def test_dataset_exercises_the_gene_selection():
    # The parity below is only as strong as the cases these cells put through both paths.
    adata = parity_counts()
    x = adata.X.toarray()
    stripped = np.array([n.split(".")[0] for n in adata.var_names])
    known = np.isin(stripped, VOCAB)
    n_known = (x[:, known] > 0).sum(axis=1)
    assert (x == 0).mean() > 0.75
    assert (n_known > SEQ_LEN).sum() >= 10  # cut at seq_len
    assert sorted(n_known[3:6]) == [0, 1, 2]
    assert (x > 0)[:, ~known].any(axis=0).sum() > N_FOREIGN / 2
    assert 0 < np.flatnonzero(~known)[0] < np.flatnonzero(known)[-1]  # foreign genes in between
    assert (x > CLIP).any()
    assert any("." in n for n in adata.var_names[known])
    assert adata.obs_names.tolist() != sorted(adata.obs_names)
    assert N_CELLS % BATCH != 0  # the package pads the last batch


def test_same_embeddings_as_cli(tmp_path, weights, cli_fp32):
    # czb with its spec defaults (on CPU: precision 32, eager attention) against
    # `transcriptformer inference --device cpu --precision 32 --disable-compile-block-mask`.
    adata = parity_counts()
    values, ids, meta = run_czb(tmp_path, weights, adata, precision="auto", compile="auto")
    reference, reference_ids = cli_fp32
    assert ids == reference_ids == adata.obs_names.tolist()  # no cell dropped, input order
    assert values.shape == reference.shape == (N_CELLS, 16)
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-6)
    assert (meta["precision"], meta["compiled_attention"]) == ("32", False)
    assert (meta["seq_len"], meta["n_genes_used"]) == (SEQ_LEN, N_VOCAB)
    # The cells differ, so a wrong row order or gene selection cannot pass unnoticed.
    assert np.linalg.norm(values - values.mean(axis=0), axis=1).min() > 1e-3


def test_parameters_reproduce_cli_defaults(tmp_path, weights, cli_fp32):
    # The CLI's own defaults (precision 16-mixed, which Lightning runs as bf16-mixed on
    # CPU; compiled flex attention) against czb with precision 16-mixed, compile true.
    adata = parity_counts()
    values, ids, meta = run_czb(tmp_path, weights, adata, precision="16-mixed", compile="true")
    reference, reference_ids = run_cli(tmp_path, weights / "tf_sapiens", adata, "--device", "cpu")
    assert ids == reference_ids == adata.obs_names.tolist()
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-6)
    assert (meta["precision"], meta["compiled_attention"]) == ("bf16-mixed", True)
    # bf16 is visibly not float32: this comparison sees the precision setting.
    assert np.abs(values - cli_fp32[0]).max() > 1e-4


def test_duplicate_genes_keep_the_first(tmp_path, weights, cli_fp32):
    # Two columns of one gene (different version suffixes): the CLI stops unless told
    # --remove-duplicate-genes; czb always does what that flag does (first column kept).
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    plain = parity_counts()
    names = plain.var_names.tolist()
    first = next(i for i, n in enumerate(names) if n.split(".")[0] in VOCAB)
    x = plain.X.toarray()
    copy = x[:, [first]] + 3  # different counts, so which column is kept shows
    names.append(names[first].split(".")[0] + ".99")
    adata = ad.AnnData(
        X=sp.csr_matrix(np.hstack([x, copy])),
        obs=plain.obs.copy(),
        var=pd.DataFrame({"ensembl_id": names}, index=pd.Index(names)),
    )
    with pytest.raises(ValueError, match="duplicate genes"):
        run_cli(tmp_path / "plain", weights / "tf_sapiens", adata, *FP32_EAGER)
    values, ids, _ = run_czb(tmp_path, weights, adata, precision="auto", compile="auto")
    reference, reference_ids = run_cli(
        tmp_path, weights / "tf_sapiens", adata, *FP32_EAGER, "--remove-duplicate-genes"
    )
    assert ids == reference_ids
    np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-6)
    # The appended copy is ignored: the same as the cells without it.
    np.testing.assert_allclose(values, cli_fp32[0], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_embeddings_as_cli_defaults_on_cuda(tmp_path, weights):
    # On CUDA czb's defaults are the CLI's: 16-mixed precision, compiled flex attention.
    adata = parity_counts()
    parameters = {"precision": "auto", "compile": "auto"}
    dirs = TRANSCRIPTFORMER.job(
        tmp_path / "czb", adata, device="cuda", batch_size=BATCH, parameters=parameters
    )
    assert TRANSCRIPTFORMER.run(dirs, weights) == 0
    values, ids, meta = read_output(dirs["output"])
    reference, reference_ids = run_cli(tmp_path, weights / "tf_sapiens", adata)
    assert (meta["precision"], meta["compiled_attention"]) == ("16-mixed", True)
    assert ids == reference_ids == adata.obs_names.tolist()
    np.testing.assert_allclose(values, reference, rtol=1e-2, atol=2e-3)
