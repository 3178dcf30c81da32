"""Seeded generators of synthetic single-cell data with planted structure.

A generator is a function of keyword arguments (all JSON-serialisable, so they can
sit under ``params:`` in a dataset spec) that returns an ``AnnData`` of raw counts.
Specs refer to a generator as ``uri: synthetic:NAME``;
:data:`~czb.data.synthetic.generators.GENERATORS` maps ``NAME`` to the function.

This package holds :data:`KNOWN_COMPLEXES`, the complexes planted by
:func:`~czb.data.synthetic.screen.planted_screen` and listed as known relationships.
"""

from __future__ import annotations

#: Well-known protein complexes (a few members each) used to plant shared gene
#: programs in :func:`planted_screen`. Memberships are textbook facts; every pair of
#: members is among CORUM's relationships (efaar-benchmarking 1.0), so a good embedding
#: of the screen recalls CORUM links.
KNOWN_COMPLEXES: dict[str, tuple[str, ...]] = {
    "20S proteasome (alpha ring)": ("PSMA1", "PSMA2", "PSMA3", "PSMA4", "PSMA5", "PSMA6", "PSMA7"),
    "MCM complex": ("MCM2", "MCM3", "MCM4", "MCM5", "MCM6", "MCM7"),
    "CCT (TRiC) chaperonin": ("TCP1", "CCT2", "CCT3", "CCT4", "CCT5", "CCT6A", "CCT7", "CCT8"),
    "RNA exosome": ("EXOSC2", "EXOSC3", "EXOSC4", "EXOSC5", "EXOSC7", "EXOSC8", "EXOSC9"),
    "RNA polymerase II": ("POLR2A", "POLR2B", "POLR2C", "POLR2D", "POLR2E", "POLR2G"),
    "eIF3": ("EIF3A", "EIF3B", "EIF3C", "EIF3D", "EIF3E", "EIF3G"),
    "THO complex": ("THOC1", "THOC2", "THOC3", "THOC5", "THOC6", "THOC7"),
    "Arp2/3 complex": ("ACTR2", "ACTR3", "ARPC2", "ARPC3", "ARPC4", "ARPC5"),
    "COP9 signalosome": ("GPS1", "COPS2", "COPS3", "COPS4", "COPS5", "COPS6", "COPS8"),
    "Origin recognition complex": ("ORC1", "ORC2", "ORC3", "ORC4", "ORC5", "ORC6"),
    "GINS complex": ("GINS1", "GINS2", "GINS3", "GINS4"),
    "Replication factor C": ("RFC1", "RFC2", "RFC3", "RFC4", "RFC5"),
    "SF3b complex": ("SF3B1", "SF3B2", "SF3B3", "SF3B4", "SF3B5", "PHF5A"),
    "TFIIH core": ("ERCC2", "ERCC3", "GTF2H1", "GTF2H2", "GTF2H3", "GTF2H4"),
    "Cohesin": ("SMC1A", "SMC3", "RAD21", "STAG2"),
    "PAF1 complex": ("PAF1", "CTR9", "LEO1", "CDC73"),
}
