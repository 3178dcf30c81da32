"""The PCA baselines' caps (issue 19): a default the data cannot fill (3000 genes of a
765-gene panel, 50 components of 30 cells) is used as far as it goes, silently, and the
embedding's info says what ran; a value someone chose that the data cannot meet warns.
"""

from __future__ import annotations

import json
import warnings

import pytest
from conftest import invoke, write_text
from test_embeddings import make_dataset, nb_counts

from czb.core.errors import EmbeddingWarning
from czb.models.baselines import PCABaseline, RawPCABaseline


def test_the_headline_command_prints_no_warning(tmp_path):
    out = tmp_path / "out"
    result = invoke("run", "--model", "pca", "--task", "clustering", "--dataset", "pbmc68k_reduced",
                    "--offline", "--seeds", "0", "--output-dir", out)
    assert result.exit_code == 0, result.output[-3000:]
    assert "warning:" not in result.stderr and "capped" not in result.output, result.stderr
    (path,) = (out / "results").glob("*.json")
    info = json.loads(path.read_text())["model"]["info"]
    assert info["parameters"]["n_top_genes"] == 3000 and "warnings" not in info
    assert info["effective_parameters"]["n_top_genes"] == info["n_genes_used"] == 765


def test_a_spec_that_asks_for_more_genes_than_the_dataset_has_warns(tmp_path):
    config = write_text(tmp_path / "specs", "models.yaml", """\
        models:
          pca_wide:
            kind: baseline
            implementation: pca
            input: any
            gene_id_type: any
            output_dim: 50
            parameters:
              n_top_genes: {type: int, default: 5000, minimum: 1}
              n_comps: {type: int, default: 50, minimum: 1}
        """).parent
    result = invoke("run", "--model", "pca_wide", "--task", "clustering", "--dataset", "pbmc68k_reduced",
                    "--offline", "--seeds", "0", "--no-baseline", "--config-dir", config,
                    "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output[-3000:]
    assert "warning: pca_wide: n_top_genes=5000 capped to the 765 genes of pbmc68k_reduced" in result.stderr


def test_pca_default_n_top_genes_uses_a_small_panel_whole_silently():
    dataset = make_dataset(nb_counts(120, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)
        emb = PCABaseline().embed(dataset)
    # Genes never detected have no dispersion and cannot be selected: all the others are used.
    assert emb.info["n_genes_used"] < 200 and emb.values.shape == (120, 50)
    assert emb.info["effective_parameters"]["n_top_genes"] == 200 and "warnings" not in emb.info


def test_pca_caps_a_chosen_n_top_genes_on_small_panel_with_a_warning():
    dataset = make_dataset(nb_counts(120, 200))
    with pytest.warns(EmbeddingWarning) as record:
        emb = PCABaseline(n_top_genes=1000).embed(dataset)
    messages = [str(w.message) for w in record]
    assert "pca: n_top_genes=1000 capped to the 200 genes of toy" in messages
    # Genes never detected have no dispersion and cannot be selected; said once, by us.
    n_used = emb.info["n_genes_used"]
    assert n_used < 200 and any(f"only {n_used} genes of toy" in m for m in messages)
    assert emb.values.shape == (120, 50)
    assert emb.info["effective_parameters"]["n_top_genes"] == 200
    assert any("capped" in w for w in emb.info["warnings"])


@pytest.mark.parametrize("cls", [PCABaseline, RawPCABaseline])
def test_pca_caps_n_comps_on_few_cells(cls):
    dataset = make_dataset(nb_counts(30, 200))
    genes = {"n_top_genes": 100} if cls is PCABaseline else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)  # the default 50 means "up to"
        emb = cls(**genes).embed(dataset)
    assert emb.values.shape == (30, 29) and emb.info["effective_parameters"]["n_comps"] == 29
    with pytest.warns(EmbeddingWarning, match=r"n_comps=40 capped to 29"):
        emb = cls(n_comps=40, **genes).embed(dataset)
    assert emb.values.shape == (30, 29)


@pytest.mark.parametrize("cls", [PCABaseline, RawPCABaseline])
def test_streamed_pca_caps_like_the_exact_path(cls, monkeypatch):
    from czb.models import pca

    monkeypatch.setattr(pca, "STREAMED_PCA_MIN_VALUES", 0)  # every matrix streams
    dataset = make_dataset(nb_counts(30, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbeddingWarning)
        emb = cls().embed(dataset)
    assert emb.info["solver"] == "streamed_randomized" and emb.values.shape == (30, 29)
    with pytest.warns(EmbeddingWarning, match=r"n_comps=40 capped to 29"):
        cls(n_comps=40).embed(dataset)
