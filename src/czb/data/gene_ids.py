"""Telling what kind of gene IDs a list holds: Ensembl IDs of which organism, or symbols."""

from __future__ import annotations

import re
from collections.abc import Iterable

from czb.data.messages import examples
from czb.specs.schema import ORGANISMS

#: var columns that hold gene symbols, most specific first (CELLxGENE: feature_name).
SYMBOL_COLUMNS = ("gene_symbol", "feature_name", "gene_symbols", "symbol", "gene_name", "gene_names")
#: var columns that hold Ensembl gene IDs (CELLxGENE: feature_id; 10x: gene_ids).
ENSEMBL_COLUMNS = ("ensembl_id", "feature_id", "gene_ids", "gene_id", "ensembl_gene_id")

# An Ensembl gene ID is its organism's prefix followed directly by digits (11 for
# vertebrates), optionally with a version. Requiring the digits matters: human
# 'ENSG' is also the start of gorilla 'ENSGGOG' and chicken 'ENSGALG' IDs.
ANY_ENSEMBL = re.compile(r"^(?:ENS[A-Z]*G\d{6,}|FBgn\d{5,}|WBGene\d{5,})(?:\.\d+)?$")
PREFIX_PATTERNS = {
    name: re.compile(rf"^{re.escape(o.ensembl_prefix)}\d{{5,}}(?:\.\d+)?$")
    for name, o in ORGANISMS.items()
}
#: Share of gene IDs that must fit the organism's Ensembl prefix.
MIN_ENSEMBL_SHARE = 0.9
#: Genes looked at when guessing what gene IDs are (enough for a stable share).
_GENE_SAMPLE = 5000


def gene_sample(names: Iterable[str]) -> list[str]:
    names = list(names)
    if len(names) <= _GENE_SAMPLE:
        return names
    step = len(names) / _GENE_SAMPLE
    return [names[int(i * step)] for i in range(_GENE_SAMPLE)]


def pattern_share(pattern: re.Pattern, names: list[str]) -> float:
    return sum(bool(pattern.match(n)) for n in names) / max(len(names), 1)


def ensembl_share(names: Iterable[str], organism: str) -> float:
    """Share of ``names`` that are Ensembl gene IDs of ``organism`` (``0..1``)."""
    return pattern_share(PREFIX_PATTERNS[organism], gene_sample(str(n) for n in names))


def describe_gene_ids(names: list[str]) -> str:
    """What the gene IDs look like, for error messages ('mouse Ensembl IDs', ...)."""
    best, best_share = None, 0.0
    for organism, pattern in PREFIX_PATTERNS.items():
        share = pattern_share(pattern, names)
        if share > best_share:
            best, best_share = organism, share
    if best is not None and best_share >= 0.5:
        matching = [n for n in names if PREFIX_PATTERNS[best].match(n)]
        prefix = ORGANISMS[best].ensembl_prefix
        return f"look like {best} Ensembl IDs ({prefix}..., e.g. {examples(matching)})"
    if pattern_share(ANY_ENSEMBL, names) >= 0.5:
        matching = [n for n in names if ANY_ENSEMBL.match(n)]
        return (
            f"look like Ensembl IDs of an organism czb does not know (e.g. {examples(matching)})"
        )
    others = [n for n in names if not ANY_ENSEMBL.match(n)]
    return f"look like gene symbols (e.g. {examples(others)})"
