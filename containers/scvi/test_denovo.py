"""scVI de novo mode: the real scvi-tools trains on tiny counts through the entrypoint.

Tiny data: 300 cells × 200 genes, two planted cell types (cell i is of type i % 2, from
``tiny_counts``) in two batches crossed with the types (batch (i // 2) % 2);
a small network (4 latent dimensions, one hidden layer of 16 units) trained for
``EPOCHS`` epochs where the embedding is judged, 1 to 3 elsewhere, so each run takes
seconds on a CPU. Nothing is staged under /weights.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scvi
from conftest import Entrypoint, assert_failed, read_output, tiny_counts

EPOCHS = 15
N_CELLS, N_GENES, N_LATENT = 300, 200, 4


def counts(n_cells=N_CELLS):
    """Planted types in two batches that each hold both types."""
    adata = tiny_counts(n_cells, N_GENES)
    adata.obs["batch"] = pd.Categorical([f"b{(i // 2) % 2}" for i in range(n_cells)])
    return adata


DENOVO = Entrypoint(
    "scvi",
    package="scvi-tools",
    dataset=counts,
    organism="zebrafish",  # any organism: nothing is read from a reference
    gene_id_type="symbol",
    seed=0,
    batch_size=64,
    batch_keys=["batch"],
    # The spec's parameters, small where the spec's defaults would take minutes.
    parameters={
        "mode": "de_novo",
        "n_top_genes": 100,
        "n_latent": N_LATENT,
        "n_hidden": 16,
        "n_layers": 1,
        "gene_likelihood": "nb",
        "max_epochs": EPOCHS,
        "train_size": 1.0,
        "train_batch_size": 64,
    },
)
denovo = DENOVO.module.denovo


def run(tmp_path, adata=None, **request):
    dirs = DENOVO.job(tmp_path, adata, **request)
    assert DENOVO.run(dirs) == 0, (dirs["output"] / "reason.json").read_text()
    return read_output(dirs["output"])


def planted_type_agreement(values, n_neighbors=10):
    """Fraction of each cell's nearest neighbours of its own planted type (i % 2)."""
    kinds = np.arange(len(values)) % 2
    distances = ((values[:, None, :] - values[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    nearest = np.argsort(distances, axis=1)[:, :n_neighbors]
    return float((kinds[nearest] == kinds[:, None]).mean())


def test_trains_on_the_counts_with_the_batch_key_and_embeds_every_cell(tmp_path):
    adata = counts()
    values, ids, meta = run(tmp_path, adata)
    assert values.shape == (N_CELLS, N_LATENT) and np.isfinite(values).all()
    assert ids == list(adata.obs_names)
    assert meta["mode"] == "de_novo"
    assert meta["n_weight_tensors_loaded"] == 0 and meta["weights_checksum"] is None
    assert meta["n_batch"] == 2 and meta["batch_keys"] == ["batch"]
    assert meta["training_epochs"] == EPOCHS and meta["epochs_from"] == "parameter"
    assert meta["genes_used"] == 100 and meta["dataset_genes"] == N_GENES
    assert meta["training_cells"] == N_CELLS and np.isfinite(meta["train_elbo_last"])
    assert meta["settings"]["gene_likelihood"] == "nb" and meta["settings"]["n_layers"] == 1
    assert scvi.__version__ == meta["version"]
    # The planted types separate in the latent space.
    assert planted_type_agreement(values) > 0.9


def test_same_seed_same_embedding_other_seed_another_and_nothing_written(tmp_path, monkeypatch):
    # Lightning logs or checkpoints in the working directory would fail on the image's
    # read-only root filesystem.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    first, second, other = (
        run(tmp_path / name, seed=seed, parameters={"max_epochs": 3})[0]
        for name, seed in (("a", 3), ("b", 3), ("c", 4))
    )
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, other)
    assert list(cwd.iterdir()) == []


def test_no_batch_keys_is_one_batch(tmp_path):
    _, _, meta = run(tmp_path, batch_keys=[], parameters={"max_epochs": 1})
    assert meta["n_batch"] == 1 and meta["batch_keys"] == []


def test_batch_columns_are_concatenated_into_one_label(tmp_path):
    adata = counts()
    adata.obs["donor"] = [f"d{i % 3}" for i in range(N_CELLS)]
    _, _, meta = run(tmp_path, adata, batch_keys=["batch", "donor"], parameters={"max_epochs": 1})
    assert meta["n_batch"] == 6  # b0/b1 × d0/d1/d2


def test_default_epochs_come_from_scvi_tools_rule(tmp_path, monkeypatch):
    """``max_epochs`` 0 hands None to ``SCVI.train``, which applies scvi-tools' own rule."""
    import scvi.model.base._training_mixin as training

    seen = []

    def heuristic(n_obs, *args, **kwargs):
        seen.append(n_obs)
        return 2

    monkeypatch.setattr(training, "get_max_epochs_heuristic", heuristic)
    _, _, meta = run(tmp_path, parameters={"max_epochs": 0})
    assert seen == [N_CELLS]
    assert meta["training_epochs"] == 2 and meta["epochs_from"] == "scvi-tools heuristic"


@pytest.mark.parametrize("n_obs", [100, 19_999, 20_000, 20_001, 50_000, 250_000, 10**7])
def test_scvi_tools_rule_is_the_documented_one(n_obs):
    # What the spec and the README promise: min(round(20000 / cells * 400), 400), >= 1.
    from scvi.model._utils import get_max_epochs_heuristic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # scvi-tools warns when it gives 1
        epochs = get_max_epochs_heuristic(n_obs)
    assert epochs == max(min(round(20_000 / n_obs * 400), 400), 1)


def test_a_last_minibatch_of_one_cell_is_dropped(tmp_path):
    # 129 cells in minibatches of 64 leave one cell: BatchNorm cannot train on it.
    adata = counts(129)
    values, _, meta = run(tmp_path, adata, parameters={"max_epochs": 2})
    assert meta["last_small_batch_dropped"] is True
    assert values.shape == (129, N_LATENT)


def test_a_cell_without_counts_in_the_genes_is_still_embedded(tmp_path):
    adata = counts()
    x = adata.X.tolil()
    x[7, :] = 0
    adata.X = x.tocsr()
    values, ids, _ = run(tmp_path, adata, parameters={"max_epochs": 2})
    assert ids[7] == "cell7" and np.isfinite(values[7]).all()


def test_all_genes_when_n_top_genes_is_zero(tmp_path):
    _, _, meta = run(tmp_path, parameters={"n_top_genes": 0, "max_epochs": 1})
    assert meta["genes_used"] == N_GENES


@pytest.mark.parametrize("transform", ["log1p", "scaled"])
def test_normalised_input_is_refused(tmp_path, transform):
    adata = counts()
    adata.X = adata.X.log1p() if transform == "log1p" else adata.X * 0.5
    dirs = DENOVO.job(tmp_path, adata)
    assert_failed(DENOVO.run(dirs), dirs, "raw counts", "not non-negative integers")


def test_check_counts_accepts_counts_and_refuses_negative_and_infinite_values():
    import scipy.sparse as sp

    denovo.check_counts(sp.csr_matrix(np.array([[0.0, 3.0], [12.0, 0.0]])))
    for bad in (-1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="1 of the dataset's 2 stored values"):
            denovo.check_counts(sp.csr_matrix(np.array([[0.0, 3.0], [bad, 0.0]])))


def test_unknown_mode_fails(tmp_path):
    dirs = DENOVO.job(tmp_path, parameters={"mode": "fine_tune"})
    assert_failed(DENOVO.run(dirs), dirs, "unknown scVI mode 'fine_tune'")
