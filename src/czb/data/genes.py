"""Gene identifiers for model input: symbols ↔ Ensembl IDs from real mappings, never guessed.

A model declares the kind of gene ID it reads (scGPT and UCE: symbols; Geneformer,
TranscriptFormer and the Census scVI: Ensembl). A dataset holds one kind as its gene
IDs and often the other in a var column (every CELLxGENE dataset carries
``feature_name`` beside its Ensembl IDs). The other kind is taken, in order, from:

1. a var column of the dataset that holds it (:data:`~czb.data.gene_ids.SYMBOL_COLUMNS`,
   :data:`~czb.data.gene_ids.ENSEMBL_COLUMNS`), its Ensembl values checked against the
   organism's prefix;
2. a published mapping table (:data:`GENE_MAPS`: HGNC for human, MGI for mouse),
   fetched into the cache on first use, or one given by the user.

A gene whose ID has no counterpart, or whose counterpart is shared with another gene
(ambiguous), is left out of the model's input and counted; nothing is matched by
case-folding or by stripping version suffixes beyond Ensembl's own ``.N`` versions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import DatasetError
from czb.data.gene_ids import ENSEMBL_COLUMNS, SYMBOL_COLUMNS, ensembl_share
from czb.specs.schema import ORGANISMS

if TYPE_CHECKING:
    import pandas as pd

    from czb.data.dataset import Dataset

#: Share of a column's values that must look like the organism's Ensembl IDs.
MIN_ENSEMBL_SHARE = 0.9

_VERSION_SUFFIX = re.compile(r"\.\d+$")


@dataclass(frozen=True)
class GeneMapSource:
    """A published table mapping Ensembl gene IDs to symbols for one organism."""

    uri: str
    symbol_column: str | int
    ensembl_column: str | int
    #: Whether the first line names the columns (otherwise columns are 0-based numbers).
    header: bool = True
    license: str = ""
    citation: str = ""


# One authority per organism: the nomenclature committee's own table.
GENE_MAPS: dict[str, GeneMapSource] = {
    "human": GeneMapSource(
        uri="https://storage.googleapis.com/public-download-files/hgnc/tsv/tsv/hgnc_complete_set.txt",
        symbol_column="symbol",
        ensembl_column="ensembl_gene_id",
        license="CC0 (HGNC data are freely available)",
        citation="Seal et al. (2023) Nucleic Acids Res, doi:10.1093/nar/gkac888",
    ),
    "mouse": GeneMapSource(
        uri="https://www.informatics.jax.org/downloads/reports/MRK_ENSEMBL.rpt",
        symbol_column=1,
        ensembl_column=5,
        header=False,
        license="CC-BY-4.0 (MGI)",
        citation="Baldarelli et al. (2024) Genetics, doi:10.1093/genetics/iyae031",
    ),
}


@dataclass
class GeneMap:
    """A one-to-one-where-possible mapping between Ensembl gene IDs and symbols.

    Attributes
    ----------
    ensembl_to_symbol, symbol_to_ensembl
        Only unambiguous pairs: an ID that maps to several partners is left out.
    source
        Where the table came from (URI or path).
    """

    ensembl_to_symbol: dict[str, str]
    symbol_to_ensembl: dict[str, str]
    source: str

    @classmethod
    def from_pairs(cls, ensembl_ids: Any, symbols: Any, *, source: str) -> GeneMap:
        import pandas as pd

        pairs = pd.DataFrame({"ensembl": pd.Series(ensembl_ids, dtype=object),
                              "symbol": pd.Series(symbols, dtype=object)}).dropna()
        pairs = pairs.astype(str)
        pairs["ensembl"] = pairs["ensembl"].str.replace(_VERSION_SUFFIX, "", regex=True)
        pairs = pairs[(pairs["ensembl"] != "") & (pairs["symbol"] != "")].drop_duplicates()
        unique_e = ~pairs["ensembl"].duplicated(keep=False)
        unique_s = ~pairs["symbol"].duplicated(keep=False)
        one_to_one = pairs[unique_e & unique_s]
        return cls(
            ensembl_to_symbol=dict(zip(one_to_one["ensembl"], one_to_one["symbol"])),
            symbol_to_ensembl=dict(zip(one_to_one["symbol"], one_to_one["ensembl"])),
            source=source,
        )

    @classmethod
    def from_table(cls, path: Path, source: GeneMapSource | None = None) -> GeneMap:
        """Read a tab-separated table (HGNC/MGI layout per ``source``; default: columns
        ``ensembl_id`` and ``symbol`` with a header).

        Errors name the file, the line and the columns expected, never what the file
        holds (a downloaded "table" may be anything).
        """
        import pandas as pd

        from czb.data.relationships import check_regular_file

        source = source or GeneMapSource(uri=str(path), symbol_column="symbol", ensembl_column="ensembl_id")
        path = Path(path)
        what = "gene mapping table"
        check_regular_file(path, what)
        columns = [source.ensembl_column, source.symbol_column]
        _check_table_header(path, source, columns)
        try:
            table = pd.read_csv(
                path,
                sep="\t",
                header=0 if source.header else None,
                usecols=columns,
                dtype=str,
                comment=None,
                quoting=3,  # csv.QUOTE_NONE: HGNC fields contain stray quotes
            )
        except (OSError, ValueError, UnicodeDecodeError) as e:
            # pandas' messages may quote the file: say where, in our own words.
            line = re.search(r"line (\d+)", str(e))
            where = f" (near line {line.group(1)})" if line else ""
            msg = f"{what} {path}: cannot read it as a tab-separated table{where}"
            raise DatasetError(msg) from None
        return cls.from_pairs(
            table[source.ensembl_column], table[source.symbol_column], source=source.uri
        )

    def __len__(self) -> int:
        return len(self.ensembl_to_symbol)


@dataclass
class ModelGenes:
    """The genes of a dataset as a model will see them.

    Attributes
    ----------
    keep
        Integer array of shape ``(n_model_genes,)``: dataset gene columns passed on.
    ids
        Array of shape ``(n_model_genes,)``: their IDs of the kind the model reads.
    symbols, ensembl_ids
        Arrays of shape ``(n_model_genes,)``; ``None`` entries where unknown.
    summary
        Counts and provenance for the result file: genes in, passed on, without a
        counterpart, ambiguous, and where the mapping came from.
    """

    keep: np.ndarray
    ids: np.ndarray
    symbols: np.ndarray
    ensembl_ids: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def _check_table_header(path: Path, source: GeneMapSource, columns: list[str | int]) -> None:
    """The table's first line has the columns ``source`` names (by name, or enough of them)."""
    what = f"gene mapping table {path}: cannot read it"
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            first = f.readline(1 << 20)
    except UnicodeDecodeError:
        msg = f"{what}: line 1 is not UTF-8 text; expected a tab-separated table"
        raise DatasetError(msg) from None
    except OSError as e:
        msg = f"{what} ({e.strerror or type(e).__name__})"
        raise DatasetError(msg) from None
    fields = first.rstrip("\r\n").split("\t")
    if source.header:
        missing = [c for c in columns if c not in fields]
        if missing:
            msg = (
                f"{what}: line 1: expected a tab-separated header with columns "
                f"{', '.join(repr(c) for c in columns)}; {', '.join(repr(c) for c in missing)} not found"
            )
            raise DatasetError(msg)
    else:
        needed = max(int(c) for c in columns) + 1
        if len(fields) < needed:
            msg = f"{what}: line 1: expected at least {needed} tab-separated columns, found {len(fields)}"
            raise DatasetError(msg)


def _strip_version(ids: np.ndarray) -> np.ndarray:
    return np.array([_VERSION_SUFFIX.sub("", str(i)) for i in ids], dtype=object)


def _looks_ensembl(values: Any, organism: str) -> bool:
    return ensembl_share([str(v) for v in values], organism) >= MIN_ENSEMBL_SHARE


def _column(var: pd.DataFrame, names: tuple[str, ...], *, ensembl: bool, organism: str) -> str | None:
    for name in names:
        if name in var.columns:
            values = var[name].dropna().astype(str)
            if len(values) == 0:
                continue
            if ensembl and not _looks_ensembl(values, organism):
                continue
            if not ensembl and _looks_ensembl(values, organism):
                continue  # a "symbol" column that holds Ensembl IDs is no help
            return name
    return None


def model_genes(
    dataset: Dataset,
    target: str,
    *,
    gene_map: GeneMap | None = None,
    load_gene_map: Any = None,
) -> ModelGenes:
    """Map a dataset's genes to the ID kind a model reads.

    Parameters
    ----------
    dataset
        Its ``var_names`` hold IDs of ``dataset.spec.gene_id_type``.
    target
        ``"ensembl"``, ``"symbol"`` or ``"any"`` (the dataset's own kind).
    gene_map
        A mapping to use when the dataset has no column with the other kind.
    load_gene_map
        Callable ``(organism) -> GeneMap`` called only when a mapping table is needed
        and ``gene_map`` is ``None`` (default: :func:`published_gene_map`).

    Returns
    -------
    :class:`ModelGenes`; genes without an unambiguous counterpart are left out.

    Raises
    ------
    DatasetError
        When no gene at all can be mapped, or no mapping exists for the organism.
    """
    spec = dataset.spec
    own = spec.gene_id_type
    target = own if target == "any" else target
    var = dataset.adata.var
    ids = np.asarray(dataset.adata.var_names.astype(str), dtype=object)
    n = len(ids)
    summary: dict[str, Any] = {"gene_id_type": target, "n_genes_dataset": n}

    # Both kinds, one array per kind; None where unknown.
    if own == "ensembl":
        ensembl = _strip_version(ids)
        col = _column(var, SYMBOL_COLUMNS, ensembl=False, organism=spec.organism)
        symbols = var[col].to_numpy(dtype=object) if col else np.full(n, None, dtype=object)
    else:
        symbols = ids.copy()
        col = _column(var, ENSEMBL_COLUMNS, ensembl=True, organism=spec.organism)
        ensembl = _strip_version(var[col].to_numpy(dtype=object)) if col else np.full(n, None, dtype=object)
    if col is not None:
        summary["mapping"] = f"dataset var[{col!r}]"
    elif target != own:
        if gene_map is None:  # not `or`: an empty GeneMap is falsy (it has __len__)
            gene_map = (load_gene_map or published_gene_map)(spec.organism)
        summary["mapping"] = gene_map.source
        if own == "ensembl":
            symbols = np.array([gene_map.ensembl_to_symbol.get(e) for e in ensembl], dtype=object)
        else:
            ensembl = np.array([gene_map.symbol_to_ensembl.get(s) for s in symbols], dtype=object)
    else:
        summary["mapping"] = None

    symbols = np.array([None if _missing(s) else str(s) for s in symbols], dtype=object)
    ensembl = np.array([None if _missing(e) else str(e) for e in ensembl], dtype=object)
    wanted = ensembl if target == "ensembl" else symbols
    known = np.array([w is not None for w in wanted])
    # A target ID shared by several dataset genes would be a guess: leave all of them out.
    import pandas as pd

    duplicated = pd.Series(wanted).duplicated(keep=False).to_numpy() & known
    keep = np.flatnonzero(known & ~duplicated)
    summary.update(
        n_genes_model_input=int(len(keep)),
        n_genes_unmapped=int((~known).sum()),
        n_genes_ambiguous=int(duplicated.sum()),
    )
    if len(keep) == 0:
        msg = (
            f"dataset {dataset.name!r}: none of its {n} {own} gene IDs maps to a {target} ID "
            f"(mapping: {summary['mapping'] or 'none'})"
        )
        raise DatasetError(msg)
    return ModelGenes(
        keep=keep,
        ids=wanted[keep],
        symbols=symbols[keep],
        ensembl_ids=ensembl[keep],
        summary=summary,
    )


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return str(value) in ("", "nan", "None")


def published_gene_map(organism: str, *, offline: bool | None = None) -> GeneMap:
    """The published mapping table of ``organism`` (:data:`GENE_MAPS`), fetched and cached.

    Raises
    ------
    DatasetError
        No published table is known for the organism.
    FetchError
        The table is not cached and cannot be downloaded (or ``offline``).
    """
    from czb.io.fetch import fetch

    if organism not in GENE_MAPS:
        msg = (
            f"no published gene ID mapping known for organism {organism!r} "
            f"(known: {', '.join(sorted(GENE_MAPS))}); give the dataset a var column with "
            f"both kinds of ID ({', '.join(SYMBOL_COLUMNS[:2])} / {', '.join(ENSEMBL_COLUMNS[:2])})"
        )
        raise DatasetError(msg)
    assert organism in ORGANISMS
    source = GENE_MAPS[organism]
    path = fetch(source.uri, offline=offline)
    return GeneMap.from_table(Path(path), source)
