"""Gene IDs for model input (czb.data.genes): symbols ↔ Ensembl IDs, never guessed.

Everything is offline: mapping tables are small TSV files written by the tests in the
published HGNC (header) and MGI (no header) layouts.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from czb.core.errors import DatasetError, FetchError
from czb.data.dataset import Dataset
from czb.data.genes import GENE_MAPS, GeneMap, model_genes, published_gene_map
from czb.data.reading import load_dataset
from czb.io import fetch as fetch_module
from czb.specs.schema import DatasetSpec

# Real human/mouse Ensembl IDs and symbols (the tests need the shapes, not the biology).
HUMAN = {
    "ENSG00000010610": "CD4",
    "ENSG00000153563": "CD8A",
    "ENSG00000177455": "CD19",
    "ENSG00000105374": "NKG7",
    "ENSG00000163736": "PPBP",
}
MOUSE = {
    "ENSMUSG00000023274": "Cd4",
    "ENSMUSG00000053977": "Cd8a",
    "ENSMUSG00000030724": "Cd19",
}


def make_dataset(
    var_names, var: dict | None = None, *, own: str = "ensembl", organism: str = "human",
    name: str = "toy",
) -> Dataset:
    n = len(var_names)
    adata = ad.AnnData(
        X=sp.csr_matrix(np.arange(1, 3 * n + 1, dtype=np.float32).reshape(3, n)),
        obs=pd.DataFrame({"cell_type": ["a", "b", "a"]}, index=["c0", "c1", "c2"]),
        var=pd.DataFrame(var or {}, index=pd.Index(list(var_names))),
    )
    spec = DatasetSpec(
        name=name, uri="synthetic:x", organism=organism, label_key="cell_type", gene_id_type=own
    )
    return Dataset(spec=spec, adata=adata)


def no_table(organism):
    raise AssertionError(f"a mapping table was loaded for {organism} although none is needed")


def write_hgnc(path: Path, rows: list[tuple[str, str]]) -> Path:
    """HGNC complete set layout: header line, symbol and ensembl_gene_id among other columns."""
    lines = ["hgnc_id\tsymbol\tname\tlocus_group\tensembl_gene_id\tentrez_id"]
    for i, (ensembl, symbol) in enumerate(rows):
        # HGNC names hold stray double quotes; they must not swallow the following fields.
        lines.append(f'HGNC:{i + 1}\t{symbol}\t"{symbol} molecule\tprotein-coding gene\t{ensembl}\t{i + 100}')
    path.write_text("\n".join(lines) + "\n")
    return path


def write_mgi(path: Path, rows: list[tuple[str, str]]) -> Path:
    """MGI MRK_ENSEMBL.rpt layout: no header; symbol in column 1, Ensembl gene ID in column 5."""
    lines = []
    for i, (ensembl, symbol) in enumerate(rows):
        lines.append(
            f"MGI:{1000 + i}\t{symbol}\t{symbol} antigen\t{30 + i}.5\t{i % 19 + 1}\t{ensembl}\t"
            f"ENSMUST{i:011d} ENSMUST{i + 1:011d}\tENSMUSP{i:011d}\tprotein coding gene\t"
            f"{1000 * i}\t{1000 * i + 500}\t+\tprotein_coding"
        )
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- dataset columns


def test_ensembl_dataset_with_feature_name_maps_to_symbols_without_a_table():
    # CELLxGENE: Ensembl IDs as var_names, symbols in var['feature_name'].
    ids = list(HUMAN)
    ds = make_dataset(ids, {"feature_name": pd.Categorical(list(HUMAN.values()))})
    genes = model_genes(ds, "symbol", load_gene_map=no_table)
    assert list(genes.ids) == list(HUMAN.values())
    assert list(genes.symbols) == list(HUMAN.values())
    assert list(genes.ensembl_ids) == ids
    np.testing.assert_array_equal(genes.keep, np.arange(5))
    assert genes.summary == {
        "gene_id_type": "symbol",
        "n_genes_dataset": 5,
        "mapping": "dataset var['feature_name']",
        "n_genes_model_input": 5,
        "n_genes_unmapped": 0,
        "n_genes_ambiguous": 0,
    }


def test_symbol_dataset_with_ensembl_id_column_maps_to_unversioned_ensembl():
    symbols = list(HUMAN.values())
    versioned = [f"{e}.{i + 3}" for i, e in enumerate(HUMAN)]
    ds = make_dataset(symbols, {"ensembl_id": versioned}, own="symbol")
    genes = model_genes(ds, "ensembl", load_gene_map=no_table)
    assert list(genes.ids) == list(HUMAN)  # the .N versions are gone
    assert list(genes.symbols) == symbols
    assert genes.summary["mapping"] == "dataset var['ensembl_id']"


def test_symbol_column_holding_ensembl_ids_is_not_taken_for_symbols():
    # A 'feature_name' column that holds Ensembl IDs (seen in the wild) is no help:
    # the mapping table is used instead.
    ids = list(HUMAN)
    ds = make_dataset(ids, {"feature_name": ids})
    table = GeneMap.from_pairs(list(HUMAN), list(HUMAN.values()), source="my table")
    genes = model_genes(ds, "symbol", load_gene_map=lambda organism: table)
    assert list(genes.ids) == list(HUMAN.values())
    assert genes.summary["mapping"] == "my table"


def test_ensembl_column_of_another_organism_is_not_used():
    # Mouse IDs in a human dataset's ensembl_id column: not this organism's IDs.
    ds = make_dataset(list(HUMAN.values())[:3], {"ensembl_id": list(MOUSE)}, own="symbol")
    table = GeneMap.from_pairs(list(HUMAN), list(HUMAN.values()), source="hgnc")
    genes = model_genes(ds, "ensembl", gene_map=table)
    assert list(genes.ids) == list(HUMAN)[:3]
    assert genes.summary["mapping"] == "hgnc"


def test_cz_benchmarks_style_file_loads_and_maps(tmp_path):
    # Through load_dataset: Ensembl IDs as var_names and symbols in feature_name.
    adata = make_dataset(list(HUMAN), {"feature_name": list(HUMAN.values())}).adata
    adata.obs["cell_type"] = adata.obs["cell_type"].astype("category")
    path = tmp_path / "d.h5ad"
    adata.write_h5ad(path)
    ds = load_dataset(
        DatasetSpec(name="file", uri=str(path), organism="human", label_key="cell_type")
    )
    genes = model_genes(ds, "symbol", load_gene_map=no_table)
    assert list(genes.ids) == list(HUMAN.values())


# --------------------------------------------------------------------------- mapping tables


def test_hgnc_table_layout_is_read(tmp_path):
    rows = [*HUMAN.items(), ("", "NOENSEMBL"), ("ENSG00000000003.7", "TSPAN6")]
    table = GeneMap.from_table(write_hgnc(tmp_path / "hgnc.txt", rows), GENE_MAPS["human"])
    assert table.source == GENE_MAPS["human"].uri
    assert table.ensembl_to_symbol == {**HUMAN, "ENSG00000000003": "TSPAN6"}
    assert table.symbol_to_ensembl["CD4"] == "ENSG00000010610"
    assert "NOENSEMBL" not in table.symbol_to_ensembl
    assert len(table) == 6


def test_mgi_table_layout_without_header_is_read(tmp_path):
    table = GeneMap.from_table(write_mgi(tmp_path / "MRK_ENSEMBL.rpt", list(MOUSE.items())), GENE_MAPS["mouse"])
    assert table.ensembl_to_symbol == MOUSE
    assert table.source == GENE_MAPS["mouse"].uri
    # A mouse dataset with Ensembl IDs only reaches symbols through the MGI table.
    ds = make_dataset(list(MOUSE), organism="mouse")
    genes = model_genes(ds, "symbol", load_gene_map=lambda organism: table)
    assert list(genes.ids) == list(MOUSE.values())
    assert genes.summary["mapping"] == GENE_MAPS["mouse"].uri


def test_default_table_layout_and_unreadable_table(tmp_path):
    path = tmp_path / "mine.tsv"
    path.write_text("ensembl_id\tsymbol\nENSG00000010610\tCD4\n")
    assert GeneMap.from_table(path).ensembl_to_symbol == {"ENSG00000010610": "CD4"}
    # An HGNC-layout source on a file without its columns: one clear DatasetError.
    with pytest.raises(DatasetError, match=r"gene mapping table .*mine.tsv: cannot read it"):
        GeneMap.from_table(path, GENE_MAPS["human"])
    with pytest.raises(DatasetError, match="cannot read it"):
        GeneMap.from_table(tmp_path / "absent.tsv")


def test_table_pairs_that_are_not_one_to_one_are_left_out():
    table = GeneMap.from_pairs(
        ["ENSG00000000001", "ENSG00000000001", "ENSG00000000002", "ENSG00000000003",
         "ENSG00000000004", "ENSG00000000004.2"],
        ["A1", "A2", "SHARED", "SHARED", "D", "D"],
        source="t",
    )  # fmt: skip
    # One ID with two symbols and one symbol with two IDs are dropped; the repeated
    # pair D (once with a version) is one pair.
    assert table.ensembl_to_symbol == {"ENSG00000000004": "D"}
    assert table.symbol_to_ensembl == {"D": "ENSG00000000004"}


# --------------------------------------------------------------------------- edge cases


def test_version_suffixes_of_dataset_ids_are_stripped_before_lookup():
    ds = make_dataset([f"{e}.5" for e in HUMAN])
    table = GeneMap.from_pairs(list(HUMAN), list(HUMAN.values()), source="t")
    genes = model_genes(ds, "symbol", gene_map=table)
    assert list(genes.ids) == list(HUMAN.values())
    assert list(genes.ensembl_ids) == list(HUMAN)
    assert list(model_genes(ds, "ensembl").ids) == list(HUMAN)
    # Only Ensembl IDs lose their .N suffix: a symbol with a dot is kept as it is.
    sym = make_dataset(["AC000061.1", "CD4"], own="symbol")
    assert list(model_genes(sym, "symbol").ids) == ["AC000061.1", "CD4"]


def test_no_case_folding():
    ds = make_dataset(["cd4", "CD8A"], own="symbol")
    table = GeneMap.from_pairs(list(HUMAN), list(HUMAN.values()), source="t")
    genes = model_genes(ds, "ensembl", gene_map=table)
    assert list(genes.ids) == ["ENSG00000153563"]
    assert genes.summary["n_genes_unmapped"] == 1


def test_two_genes_with_the_same_target_are_both_left_out_and_counted():
    # Two symbols of the dataset point at the same Ensembl ID: neither is passed on.
    symbols = ["CD4", "CD4-alias", "CD8A", "CD19"]
    ensembl = ["ENSG00000010610", "ENSG00000010610.2", "ENSG00000153563", "ENSG00000177455"]
    ds = make_dataset(symbols, {"ensembl_id": ensembl}, own="symbol")
    genes = model_genes(ds, "ensembl")
    np.testing.assert_array_equal(genes.keep, [2, 3])
    assert list(genes.ids) == ["ENSG00000153563", "ENSG00000177455"]
    assert genes.summary["n_genes_ambiguous"] == 2
    assert genes.summary["n_genes_unmapped"] == 0
    assert genes.summary["n_genes_model_input"] == 2


def test_unmapped_genes_are_left_out_and_counted():
    ids = list(HUMAN)
    symbols = ["CD4", None, "CD19", "", np.nan]
    ds = make_dataset(ids, {"feature_name": symbols})
    genes = model_genes(ds, "symbol")
    np.testing.assert_array_equal(genes.keep, [0, 2])
    assert list(genes.ids) == ["CD4", "CD19"]
    assert genes.summary["n_genes_unmapped"] == 3
    assert genes.summary["n_genes_ambiguous"] == 0
    # Genes missing from a mapping table are counted the same way.
    table = GeneMap.from_pairs(ids[:2], ["CD4", "CD8A"], source="t")
    genes = model_genes(make_dataset(ids), "symbol", gene_map=table)
    assert genes.summary["n_genes_unmapped"] == 3 and list(genes.ids) == ["CD4", "CD8A"]


def test_nothing_mapped_is_a_clear_dataset_error():
    ds = make_dataset(["NOTAGENE1", "NOTAGENE2", "NOTAGENE3"], own="symbol", name="lonely")
    table = GeneMap.from_pairs(list(HUMAN), list(HUMAN.values()), source="hgnc.txt")
    with pytest.raises(DatasetError) as excinfo:
        model_genes(ds, "ensembl", gene_map=table)
    message = str(excinfo.value)
    assert message == (
        "dataset 'lonely': none of its 3 symbol gene IDs maps to a ensembl ID (mapping: hgnc.txt)"
    )


def test_an_empty_given_map_is_used_and_never_replaced_by_a_download():
    ds = make_dataset(list(HUMAN))
    empty = GeneMap({}, {}, source="empty.tsv")
    with pytest.raises(DatasetError, match=r"none of its 5 ensembl gene IDs .*mapping: empty.tsv"):
        model_genes(ds, "symbol", gene_map=empty, load_gene_map=no_table)


def test_any_target_passes_the_datasets_own_ids_without_a_table():
    ds = make_dataset([f"{e}.1" for e in HUMAN])
    genes = model_genes(ds, "any", load_gene_map=no_table)
    assert genes.summary["gene_id_type"] == "ensembl"
    assert genes.summary["mapping"] is None
    assert list(genes.ids) == list(HUMAN)
    assert all(s is None for s in genes.symbols)

    sym = make_dataset(list(HUMAN.values()), own="symbol")
    genes = model_genes(sym, "any", load_gene_map=no_table)
    assert genes.summary["gene_id_type"] == "symbol"
    assert list(genes.ids) == list(HUMAN.values())
    assert all(e is None for e in genes.ensembl_ids)
    # The same target spelled out gives the same result.
    assert list(model_genes(sym, "symbol", load_gene_map=no_table).ids) == list(genes.ids)


# --------------------------------------------------------------------------- published tables


def test_published_gene_map_for_an_organism_without_a_table():
    with pytest.raises(DatasetError) as excinfo:
        published_gene_map("rat")
    message = str(excinfo.value)
    assert "no published gene ID mapping known for organism 'rat'" in message
    assert "known: human, mouse" in message
    assert "feature_name" in message  # says how to do without one
    # model_genes reaches the same error when a rat dataset needs a table.
    ds = make_dataset(["ENSRNOG00000000001", "ENSRNOG00000000002"], organism="rat")
    with pytest.raises(DatasetError, match="organism 'rat'"):
        model_genes(ds, "symbol")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(fetch_module, "_fetch_remote", refuse)


@pytest.mark.usefixtures("no_network")
def test_published_gene_map_offline_and_not_cached_is_a_fetch_error(monkeypatch):
    with pytest.raises(FetchError, match=r"hgnc_complete_set.txt is not in the cache .* offline"):
        published_gene_map("human", offline=True)
    monkeypatch.setenv("CZB_OFFLINE", "1")
    with pytest.raises(FetchError, match="MRK_ENSEMBL.rpt is not in the cache"):
        published_gene_map("mouse")
    # And a model run on a dataset that needs the table fails the same way.
    with pytest.raises(FetchError):
        model_genes(make_dataset(list(HUMAN)), "symbol")


def test_published_gene_map_reads_the_fetched_table_in_its_layout(tmp_path, monkeypatch):
    local = write_mgi(tmp_path / "MRK_ENSEMBL.rpt", list(MOUSE.items()))
    asked = []

    def fake_fetch(uri, **kwargs):
        asked.append((uri, kwargs))
        return local

    monkeypatch.setattr(fetch_module, "fetch", fake_fetch)
    table = published_gene_map("mouse", offline=True)
    assert asked == [(GENE_MAPS["mouse"].uri, {"offline": True})]
    assert table.ensembl_to_symbol == MOUSE
