"""Seeded generators of synthetic single-cell data with planted structure.

A generator is a function of keyword arguments (all JSON-serialisable, so they can
sit under ``params:`` in a dataset spec) that returns an ``AnnData`` of raw counts.
Specs refer to a generator as ``uri: synthetic:NAME``; :data:`GENERATORS` maps
``NAME`` to the function.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import anndata

#: Ensembl-style gene IDs are drawn from this range, like real human IDs
#: (ENSG00000000003 ... ENSG00000310000).
_GENE_NUMBER_RANGE = (3, 310_000)


def ensembl_like_ids(n_genes: int, *, prefix: str = "ENSG") -> list[str]:
    """Sorted, unique gene IDs shaped like Ensembl's (``prefix`` + 11 digits).

    The IDs depend only on ``n_genes`` and ``prefix`` (not on a data seed), so
    synthetic datasets of the same size share their genes.

    Parameters
    ----------
    n_genes
        How many IDs.
    prefix
        Ensembl gene prefix of the organism (``ENSG`` for human).

    Returns
    -------
    list of ``n_genes`` strings, e.g. ``'ENSG00000123456'``.
    """
    rng = np.random.default_rng(20_250_101)
    numbers = rng.choice(np.arange(*_GENE_NUMBER_RANGE), size=n_genes, replace=False)
    return [f"{prefix}{n:011d}" for n in np.sort(numbers)]


def negative_binomial_counts(rng: np.random.Generator, mu: np.ndarray, dispersion: float) -> np.ndarray:
    """Counts drawn around ``mu`` (gamma-Poisson = negative binomial with inverse dispersion
    ``dispersion``), as ``float32``; a cell left with no counts gets one read in its most
    expected gene, since an empty cell would fail validation (rare: only with tiny depth)."""
    counts = rng.poisson(rng.gamma(dispersion, mu / dispersion)).astype(np.float32)
    empty = counts.sum(axis=1) == 0
    counts[empty, mu[empty].argmax(axis=1)] = 1.0
    return counts


def planted_cells(
    n_cells: int = 1500,
    n_genes: int = 2000,
    n_cell_types: int = 6,
    n_batches: int = 3,
    *,
    batch_effect: float = 1.0,
    n_time_points: int = 5,
    n_donors_per_batch: int = 2,
    mean_counts: float = 3000.0,
    dispersion: float = 5.0,
    gene_prefix: str = "ENSG",
    seed: int = 0,
) -> anndata.AnnData:
    """Raw counts with planted cell types, batches and a time axis.

    Expected expression follows a low-rank log-linear model::

        log mu[c, g] = base[g]                                 # gene baseline
                     + program[type[c], g]                     # cell-type program
                     + tau[c] * trajectory[type[c], g]         # movement along time
                     + shift[batch[c], g]                      # batch effect
                     + noise[c] @ loadings[:, g]               # shared cell-to-cell variation

    normalised per cell to a log-normal library size, and counts are drawn from a
    negative binomial (gamma-Poisson) around ``mu``. ``tau = time_point / (T - 1)``
    moves cells of each type from their program towards a type-specific end state.
    Each batch multiplies every gene by its own factor ``exp(shift)`` whose log has
    standard deviation ``0.5 * batch_effect``. Cell types are separated clearly:
    a kNN classifier on 50 principal components of log-normalised counts reaches
    > 0.9 accuracy with the defaults, while unrelated embeddings stay at chance.

    Parameters
    ----------
    n_cells
        Number of cells.
    n_genes
        Number of genes.
    n_cell_types
        Number of planted cell types (uneven proportions, every type present).
    n_batches
        Number of batches; cells are assigned to batches at random.
    batch_effect
        Strength of the batch effect; ``0`` means none.
    n_time_points
        Number of time points (``obs['time_point']`` takes values ``0 .. T-1``).
    n_donors_per_batch
        Donors are nested in batches.
    mean_counts
        Median total counts per cell.
    dispersion
        Negative-binomial inverse dispersion ``theta`` (larger: closer to Poisson).
    gene_prefix
        Ensembl prefix of the gene IDs (``ENSMUSG`` for mouse-like data).
    seed
        Seed of everything random; the same arguments give the identical matrix.

    Returns
    -------
    AnnData with

    - ``X``: ``scipy.sparse.csr_matrix`` of shape ``(n_cells, n_genes)``, dtype
      ``float32`` holding integer counts; every cell has at least one count.
    - ``obs``: ``cell_type``, ``batch``, ``donor`` (categoricals) and
      ``time_point`` (``int64``), indexed by unique cell IDs ``cell_00000 ...``.
    - ``var_names``: human Ensembl-like IDs from :func:`ensembl_like_ids`.
    - ``uns['synthetic']``: the generator's name and arguments.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if min(n_cells, n_genes, n_cell_types, n_batches, n_time_points, n_donors_per_batch) < 1:
        msg = "planted_cells: sizes and counts must be at least 1"
        raise ValueError(msg)
    if n_cells < n_cell_types:
        msg = f"planted_cells: n_cells ({n_cells}) must be at least n_cell_types ({n_cell_types})"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)

    # Gene baseline: log-normal spread of expression levels, as in real data.
    base = rng.normal(0.0, 1.5, size=n_genes).clip(-5.0, 3.0)

    # Each type up-regulates its own markers (~5% of genes) and has its own
    # trajectory genes; the programs are what makes types separable.
    n_markers = max(3, n_genes // 20)
    program = np.zeros((n_cell_types, n_genes))
    trajectory = np.zeros((n_cell_types, n_genes))
    for t in range(n_cell_types):
        markers = rng.choice(n_genes, size=n_markers, replace=False)
        program[t, markers] = rng.normal(2.0, 0.5, size=n_markers)
        moving = rng.choice(n_genes, size=n_markers, replace=False)
        trajectory[t, moving] = rng.normal(0.0, 1.5, size=n_markers)

    shift = rng.normal(0.0, 0.5 * batch_effect, size=(n_batches, n_genes))
    n_noise_factors = 5
    loadings = rng.normal(0.0, 0.3, size=(n_noise_factors, n_genes))

    # Uneven type proportions, but every type gets at least one cell.
    proportions = rng.dirichlet(np.full(n_cell_types, 4.0))
    cell_type = np.concatenate(
        [
            np.arange(n_cell_types),
            rng.choice(n_cell_types, size=n_cells - n_cell_types, p=proportions),
        ]
    )
    rng.shuffle(cell_type)
    batch = rng.integers(0, n_batches, size=n_cells)
    donor = batch * n_donors_per_batch + rng.integers(0, n_donors_per_batch, size=n_cells)
    time_point = rng.integers(0, n_time_points, size=n_cells)
    tau = time_point / max(n_time_points - 1, 1)
    noise = rng.normal(0.0, 1.0, size=(n_cells, n_noise_factors))

    log_mu = (
        base[None, :]
        + program[cell_type]
        + tau[:, None] * trajectory[cell_type]
        + shift[batch]
        + noise @ loadings
    )
    log_mu -= log_mu.max(axis=1, keepdims=True)  # stable softmax
    proportions_per_gene = np.exp(log_mu)
    proportions_per_gene /= proportions_per_gene.sum(axis=1, keepdims=True)
    library = mean_counts * rng.lognormal(0.0, 0.35, size=n_cells)
    mu = proportions_per_gene * library[:, None]

    counts = negative_binomial_counts(rng, mu, dispersion)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"cell_type_{t}" for t in cell_type]),
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
            "donor": pd.Categorical([f"donor_{d}" for d in donor]),
            "time_point": time_point.astype(np.int64),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_cells)], name=None),
    )
    var = pd.DataFrame(index=pd.Index(ensembl_like_ids(n_genes, prefix=gene_prefix), name=None))
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.uns["synthetic"] = {
        "generator": "planted_cells",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_cell_types": n_cell_types,
        "n_batches": n_batches,
        "batch_effect": batch_effect,
        "n_time_points": n_time_points,
        "n_donors_per_batch": n_donors_per_batch,
        "mean_counts": mean_counts,
        "dispersion": dispersion,
        "seed": seed,
    }
    return adata


def planted_perturbations(
    n_genes: int = 1000,
    n_targets: int = 24,
    n_doubles: int = 24,
    n_modules: int = 4,
    *,
    n_control_cells: int = 600,
    n_cells_per_condition: int = 60,
    n_batches: int = 2,
    knockdown: float = 2.0,
    module_size: int = 30,
    n_specific_genes: int = 10,
    interaction: float = 0.0,
    batch_effect: float = 0.2,
    mean_counts: float = 5000.0,
    dispersion: float = 10.0,
    control_label: str = "ctrl",
    seed: int = 0,
) -> anndata.AnnData:
    """Raw counts of a Perturb-seq-like screen with planted, additive perturbation effects.

    A control population plus cells carrying one (``"GENEA"``) or two
    (``"GENEA+GENEB"``) perturbed genes. Expected expression is log-linear::

        log mu[c, g] = base[g] + shift[batch[c], g] + noise[c] @ loadings[:, g]
                     + sum over perturbed genes p of cell c: effect[p, g]
                     + interaction term of the pair (only if ``interaction > 0``)

    and ``mu`` is scaled by a per-cell library size (with a constant that does not
    depend on the cell, so effects stay additive on log expected counts); counts are
    negative binomial (gamma-Poisson) around ``mu``. With ``interaction=0`` the
    effect of a pair is exactly the sum of the two single effects on log expression.

    Each single effect is sparse: the target itself is knocked down by
    ``knockdown`` (natural-log units), the genes of the target's module move by
    ``strength * program[module]`` (``module_size`` member genes, the module's
    targets among them, go down; a few other genes go up or down; ``strength`` is
    drawn per target in [0.6, 1.4]), and ``n_specific_genes`` genes of its own move
    by normal(0, 0.8). Targets of one module therefore have similar effects, so a
    perturbation unseen in training can be predicted from its module mates.

    Parameters
    ----------
    n_genes
        Number of genes (symbols ``GENE0000`` ...).
    n_targets
        Number of perturbed genes; each has a single-perturbation condition.
    n_doubles
        Number of distinct target pairs with a two-gene condition.
    n_modules
        Number of co-regulated modules; targets are dealt to modules in turn.
    n_control_cells
        Control cells (``condition == control_label``).
    n_cells_per_condition
        Cells per perturbation condition.
    n_batches
        Batches (like 10x GEM groups); every cell is assigned one at random.
    knockdown
        Knock-down of each target gene on log expression.
    module_size, n_specific_genes
        Genes moved by each module program and by each target's own effect.
    interaction
        Standard deviation of a sparse non-additive term added to every pair
        (20 genes); ``0`` keeps pairs exactly additive.
    batch_effect
        Standard deviation of the per-batch log shift of every gene.
    mean_counts
        Median total counts per cell.
    dispersion
        Negative-binomial inverse dispersion.
    control_label
        Condition label of control cells.
    seed
        Seed of everything random.

    Returns
    -------
    AnnData with

    - ``X``: ``scipy.sparse.csr_matrix`` ``(n_cells, n_genes)``, ``float32`` integer
      counts; controls first, then singles, then pairs.
    - ``obs``: ``condition`` (categorical: ``control_label``, ``GENEA``,
      ``GENEA+GENEB`` with the two symbols in sorted order), ``control`` (bool),
      ``batch`` (categorical), indexed by ``cell_00000 ...``.
    - ``var_names``: gene symbols; ``var['ensembl_id']``: Ensembl-like IDs.
    - ``uns['synthetic']``: the generator's name and arguments.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if min(n_genes, n_targets, n_modules, n_control_cells, n_cells_per_condition, n_batches) < 1:
        msg = "planted_perturbations: sizes and counts must be at least 1"
        raise ValueError(msg)
    if n_targets > n_genes // 2:
        msg = f"planted_perturbations: n_targets ({n_targets}) must be at most n_genes // 2"
        raise ValueError(msg)
    max_pairs = n_targets * (n_targets - 1) // 2
    if n_doubles > max_pairs:
        msg = f"planted_perturbations: n_doubles ({n_doubles}) exceeds the {max_pairs} possible pairs"
        raise ValueError(msg)
    if module_size + n_specific_genes >= n_genes:
        msg = "planted_perturbations: module_size + n_specific_genes must be below n_genes"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    symbols = np.array([f"GENE{i:04d}" for i in range(n_genes)])

    base = rng.normal(0.0, 1.2, size=n_genes).clip(-4.0, 3.0)
    # Targets are well expressed (as screened genes usually are), so knock-down shows.
    expressed = np.argsort(-base)[: max(n_genes // 2, n_targets)]
    targets = np.sort(rng.choice(expressed, size=n_targets, replace=False))
    module_of = np.arange(n_targets) % n_modules

    programs = np.zeros((n_modules, n_genes))
    others = np.setdiff1d(np.arange(n_genes), targets)
    for m in range(n_modules):
        own_targets = targets[module_of == m]
        n_members = max(module_size - len(own_targets), 0)
        members = np.concatenate([own_targets, rng.choice(others, size=n_members, replace=False)])
        programs[m, members] = -rng.normal(1.0, 0.2, size=len(members))
        moved = rng.choice(np.setdiff1d(others, members), size=max(module_size // 2, 1), replace=False)
        programs[m, moved] = rng.normal(0.0, 0.7, size=len(moved))

    effects = np.zeros((n_targets, n_genes))
    for t in range(n_targets):
        strength = rng.uniform(0.6, 1.4)
        specific = rng.choice(n_genes, size=n_specific_genes, replace=False)
        effects[t] = strength * programs[module_of[t]]
        effects[t, specific] += rng.normal(0.0, 0.8, size=n_specific_genes)
        effects[t, targets[t]] = -knockdown

    all_pairs = [(a, b) for a in range(n_targets) for b in range(a + 1, n_targets)]
    pair_rows = rng.choice(len(all_pairs), size=n_doubles, replace=False) if n_doubles else []
    pairs = sorted(all_pairs[i] for i in pair_rows)

    # Condition table: (label, effect vector on log expression).
    labels = [control_label]
    condition_effects = [np.zeros(n_genes)]
    for t in range(n_targets):
        labels.append(str(symbols[targets[t]]))
        condition_effects.append(effects[t])
    for a, b in pairs:
        effect = effects[a] + effects[b]
        if interaction > 0:
            genes = rng.choice(n_genes, size=20, replace=False)
            effect = effect.copy()
            effect[genes] += rng.normal(0.0, interaction, size=20)
        labels.append(f"{symbols[targets[a]]}+{symbols[targets[b]]}")
        condition_effects.append(effect)
    condition_effects = np.stack(condition_effects)

    sizes = np.array([n_control_cells] + [n_cells_per_condition] * (len(labels) - 1))
    condition = np.repeat(np.arange(len(labels)), sizes)
    n_cells = len(condition)
    batch = rng.integers(0, n_batches, size=n_cells)
    shift = rng.normal(0.0, batch_effect, size=(n_batches, n_genes))
    n_noise_factors = 3
    loadings = rng.normal(0.0, 0.2, size=(n_noise_factors, n_genes))
    noise = rng.normal(0.0, 1.0, size=(n_cells, n_noise_factors))

    log_mu = base[None, :] + shift[batch] + noise @ loadings + condition_effects[condition]
    library = mean_counts * rng.lognormal(0.0, 0.3, size=n_cells)
    mu = np.exp(log_mu) * (library / np.exp(base).sum())[:, None]
    counts = negative_binomial_counts(rng, mu, dispersion)

    obs = pd.DataFrame(
        {
            "condition": pd.Categorical(np.asarray(labels)[condition], categories=labels),
            "control": condition == 0,
            "batch": pd.Categorical([f"batch_{b}" for b in batch]),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_cells)], name=None),
    )
    var = pd.DataFrame({"ensembl_id": ensembl_like_ids(n_genes)}, index=pd.Index(symbols, name=None))
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.uns["synthetic"] = {
        "generator": "planted_perturbations",
        "n_genes": n_genes,
        "n_targets": n_targets,
        "n_doubles": n_doubles,
        "n_modules": n_modules,
        "n_control_cells": n_control_cells,
        "n_cells_per_condition": n_cells_per_condition,
        "n_batches": n_batches,
        "knockdown": knockdown,
        "module_size": module_size,
        "n_specific_genes": n_specific_genes,
        "interaction": interaction,
        "batch_effect": batch_effect,
        "mean_counts": mean_counts,
        "dispersion": dispersion,
        "control_label": control_label,
        "seed": seed,
    }
    return adata


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


def planted_screen(
    n_genes: int = 1000,
    n_unexpressed: int = 24,
    n_singletons: int = 16,
    *,
    n_complexes: int = 16,
    n_batches: int = 10,
    n_cells_per_perturbation: int = 24,
    n_control_cells_per_batch: int = 60,
    program_size: int = 40,
    effect_strength: float = 1.0,
    knockdown: float = 2.0,
    batch_effect: float = 0.3,
    mean_counts: float = 4000.0,
    dispersion: float = 10.0,
    control_label: str = "non-targeting",
    seed: int = 0,
) -> anndata.AnnData:
    """Raw counts of a genome-wide-like CRISPR screen with planted complex programs.

    The data behind the perturbation-analysis hierarchy (Bendidi et al. 2024):
    single-gene knock-downs spread over experimental batches, controls in every
    batch, and three kinds of perturbed gene:

    - members of :data:`KNOWN_COMPLEXES` (the first ``n_complexes``): every member
      of a complex moves the complex's own program of ``program_size`` genes, scaled
      by a strength drawn per member in [0.6, 1.4] (times ``effect_strength``), plus a
      few genes of its own; members of one complex therefore have similar profiles,
      and a good embedding recalls their (CORUM) relationships;
    - ``n_singletons`` expressed genes (``SOLO001`` ...) each with a program of its own;
    - ``n_unexpressed`` genes (``UNEXP001`` ...) that are (almost) not expressed and
      whose knock-down changes nothing: the null of perturbation consistency.

    Expected expression is log-linear::

        log mu[c, g] = base[g] + shift[batch[c], g] + noise[c] @ loadings[:, g] + effect[p(c), g]

    where the target itself drops by ``knockdown``; counts are negative binomial
    around ``mu`` scaled by a log-normal library size.

    Parameters
    ----------
    n_genes
        Genes measured (symbols; complex members, singleton and unexpressed targets
        among them, fillers ``GENE0000`` ...).
    n_unexpressed, n_singletons, n_complexes
        Perturbed genes of each kind.
    n_batches
        Experimental batches (like 10x GEM groups); cells are dealt to batches at random.
    n_cells_per_perturbation
        Cells per perturbed gene.
    n_control_cells_per_batch
        Control cells in each batch.
    program_size
        Genes moved by each complex's (and singleton's) program.
    effect_strength
        Scale of every program; ``0`` leaves only the knock-down of the target.
    knockdown
        Drop of the target gene's log expression.
    batch_effect
        Standard deviation of each batch's log shift per gene.
    mean_counts
        Median total counts per cell.
    dispersion
        Negative-binomial inverse dispersion.
    control_label
        Perturbation label of control cells.
    seed
        Seed of everything random.

    Returns
    -------
    AnnData with

    - ``X``: ``scipy.sparse.csr_matrix`` ``(n_cells, n_genes)``, ``float32`` counts;
    - ``obs``: ``gene`` (perturbed gene symbol or ``control_label``), ``is_control``
      (bool), ``gem_group`` (batch, categorical), ``target_kind`` (``complex``,
      ``singleton``, ``unexpressed``, ``control``) and ``complex`` (name or "");
    - ``var_names``: gene symbols; ``var['ensembl_id']``: Ensembl-like IDs;
    - ``uns['synthetic']``: the generator's name and arguments.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    if n_complexes > len(KNOWN_COMPLEXES):
        msg = f"planted_screen: at most {len(KNOWN_COMPLEXES)} complexes are known, asked for {n_complexes}"
        raise ValueError(msg)
    if min(n_batches, n_cells_per_perturbation, n_control_cells_per_batch) < 1:
        msg = "planted_screen: batches and cell counts must be at least 1"
        raise ValueError(msg)
    complexes = list(KNOWN_COMPLEXES.items())[:n_complexes]
    members = [g for _, genes in complexes for g in genes]
    singletons = [f"SOLO{i + 1:03d}" for i in range(n_singletons)]
    unexpressed = [f"UNEXP{i + 1:03d}" for i in range(n_unexpressed)]
    targets = members + singletons + unexpressed
    if not targets:
        msg = "planted_screen: needs at least one perturbed gene (n_complexes, n_singletons or n_unexpressed)"
        raise ValueError(msg)
    n_fillers = n_genes - len(targets)
    if n_fillers < program_size:
        msg = f"planted_screen: n_genes ({n_genes}) leaves fewer than program_size genes besides the targets"
        raise ValueError(msg)
    symbols = np.array(targets + [f"GENE{i:04d}" for i in range(n_fillers)])
    rng = np.random.default_rng(seed)

    base = rng.normal(0.0, 1.0, size=n_genes).clip(-3.0, 3.0)
    base[: len(members) + n_singletons] = rng.uniform(0.5, 2.0, size=len(members) + n_singletons)
    unexpressed_idx = np.arange(len(members) + n_singletons, len(targets))
    base[unexpressed_idx] = -12.0  # essentially never detected

    def program() -> np.ndarray:
        genes = rng.choice(n_genes, size=program_size, replace=False)
        out = np.zeros(n_genes)
        out[genes] = rng.normal(0.0, 1.0, size=program_size)
        return out * effect_strength

    effects: list[np.ndarray] = []
    kinds: list[str] = []
    complex_of: list[str] = []
    for name, genes in complexes:
        shared = program()
        for _ in genes:
            own = np.zeros(n_genes)
            own[rng.choice(n_genes, size=5, replace=False)] = rng.normal(0.0, 0.5, size=5)
            effects.append(rng.uniform(0.6, 1.4) * shared + own * effect_strength)
            kinds.append("complex")
            complex_of.append(name)
    for _ in singletons:
        effects.append(program())
        kinds.append("singleton")
        complex_of.append("")
    for _ in unexpressed:
        effects.append(np.zeros(n_genes))
        kinds.append("unexpressed")
        complex_of.append("")
    effect = np.stack(effects)
    effect[np.arange(len(targets)), np.arange(len(targets))] -= knockdown

    # Cells: controls in every batch, perturbed cells dealt to batches at random.
    pert = np.concatenate([np.full(n_control_cells_per_batch * n_batches, -1),
                           np.repeat(np.arange(len(targets)), n_cells_per_perturbation)])
    batch = np.concatenate([np.repeat(np.arange(n_batches), n_control_cells_per_batch),
                            rng.integers(0, n_batches, size=len(targets) * n_cells_per_perturbation)])
    n_cells = len(pert)
    shift = rng.normal(0.0, batch_effect, size=(n_batches, n_genes))
    loadings = rng.normal(0.0, 0.2, size=(3, n_genes))
    noise = rng.normal(0.0, 1.0, size=(n_cells, 3))
    log_mu = base[None, :] + shift[batch] + noise @ loadings
    perturbed = pert >= 0
    log_mu[perturbed] += effect[pert[perturbed]]
    library = mean_counts * rng.lognormal(0.0, 0.3, size=n_cells)
    mu = np.exp(log_mu) * (library / np.exp(base).sum())[:, None]
    counts = negative_binomial_counts(rng, mu, dispersion)

    labels = np.where(perturbed, symbols[np.maximum(pert, 0)], control_label)
    obs = pd.DataFrame(
        {
            "gene": pd.Categorical(labels),
            "is_control": ~perturbed,
            "gem_group": pd.Categorical([f"gem_{b:02d}" for b in batch]),
            "target_kind": pd.Categorical(np.where(perturbed, np.asarray(kinds)[np.maximum(pert, 0)], "control")),
            "complex": np.where(perturbed, np.asarray(complex_of, dtype=object)[np.maximum(pert, 0)], ""),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_cells)], name=None),
    )
    var = pd.DataFrame({"ensembl_id": ensembl_like_ids(n_genes)}, index=pd.Index(symbols, name=None))
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.uns["synthetic"] = {
        "generator": "planted_screen",
        "n_genes": n_genes, "n_unexpressed": n_unexpressed, "n_singletons": n_singletons,
        "n_complexes": n_complexes, "n_batches": n_batches,
        "n_cells_per_perturbation": n_cells_per_perturbation,
        "n_control_cells_per_batch": n_control_cells_per_batch, "program_size": program_size,
        "effect_strength": effect_strength, "knockdown": knockdown, "batch_effect": batch_effect,
        "mean_counts": mean_counts, "dispersion": dispersion, "control_label": control_label, "seed": seed,
    }
    return adata


#: Generators that ``uri: synthetic:NAME`` specs can name.
GENERATORS: dict[str, Callable[..., anndata.AnnData]] = {
    "planted_cells": planted_cells,
    "planted_perturbations": planted_perturbations,
    "planted_screen": planted_screen,
}


# --------------------------------------------------------------------------- parameters

#: Most values (cells × genes, plus the per-type, per-batch and per-target rows of
#: genes) a generator may make: its working arrays are dense float64, several at a
#: time, about 50 bytes per value at the peak (50M values: about 2.5 GB).
MAX_GENERATED_VALUES = 50_000_000

_COUNT = 10_000_000
#: Accepted range of each generator parameter (inclusive), by name; a name means the
#: same in every generator. For strings, the range of their length.
PARAM_RANGES: dict[str, tuple[Any, Any]] = {
    "n_cells": (1, _COUNT),
    "n_genes": (1, _GENE_NUMBER_RANGE[1] - _GENE_NUMBER_RANGE[0]),
    "n_cell_types": (1, 10_000),
    "n_batches": (1, 10_000),
    "n_time_points": (1, 10_000),
    "n_donors_per_batch": (1, 10_000),
    "n_targets": (1, 2_000),  # pairs of targets are listed: n_targets² / 2 of them
    "n_doubles": (0, 2_000_000),
    "n_modules": (1, 10_000),
    "n_control_cells": (1, _COUNT),
    "n_cells_per_condition": (1, _COUNT),
    "module_size": (0, 300_000),
    "n_specific_genes": (0, 300_000),
    "n_unexpressed": (0, 10_000),
    "n_singletons": (0, 10_000),
    "n_complexes": (0, 16),  # len(KNOWN_COMPLEXES)
    "n_cells_per_perturbation": (1, _COUNT),
    "n_control_cells_per_batch": (1, _COUNT),
    "program_size": (1, 300_000),
    "seed": (0, 2**63 - 1),
    "batch_effect": (0.0, 100.0),
    "interaction": (0.0, 100.0),
    "effect_strength": (0.0, 100.0),
    "knockdown": (-50.0, 50.0),
    "mean_counts": (1.0, 1e7),
    "dispersion": (0.01, 1e6),  # smaller: gamma draws overflow the Poisson sampler
    "gene_prefix": (1, 20),  # length of the string
    "control_label": (1, 200),
}


def _describe_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "a mapping", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _check_param(name: str, kind: str, value: Any) -> None:
    low, high = PARAM_RANGES[name]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            msg = f"parameter {name!r} must be an integer from {low} to {high}, not {_describe_type(value)}"
            raise ValueError(msg)
        if not low <= value <= high:
            msg = f"parameter {name!r} must be an integer from {low} to {high}, not {value}"
            raise ValueError(msg)
    elif kind == "float":
        span = f"from {low:g} to {high:g}"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            msg = f"parameter {name!r} must be a number {span}, not {_describe_type(value)}"
            raise ValueError(msg)
        if not (math.isfinite(value) and low <= value <= high):
            msg = f"parameter {name!r} must be a number {span}, not {float(value):g}"
            raise ValueError(msg)
    else:  # str
        if not isinstance(value, str):
            msg = f"parameter {name!r} must be a string, not {_describe_type(value)}"
            raise ValueError(msg)
        if not low <= len(value) <= high or not value.isprintable():
            msg = f"parameter {name!r} must be {low} to {high} printable characters"
            raise ValueError(msg)


def _generated_values(generator: str, p: dict[str, Any]) -> int:
    """Dense values the generator's biggest arrays hold together (rows × genes)."""
    if generator == "planted_cells":
        rows = p["n_cells"] + p["n_batches"] + 2 * p["n_cell_types"]
    elif generator == "planted_perturbations":
        conditions = 1 + p["n_targets"] + p["n_doubles"]
        rows = p["n_control_cells"] + p["n_cells_per_condition"] * (conditions - 1) + conditions + p["n_targets"]
    else:  # planted_screen
        members = sum(len(g) for g in list(KNOWN_COMPLEXES.values())[: p["n_complexes"]])
        targets = members + p["n_singletons"] + p["n_unexpressed"]
        rows = p["n_control_cells_per_batch"] * p["n_batches"] + p["n_cells_per_perturbation"] * targets
        rows += targets + p["n_batches"]
    return rows * p["n_genes"]


def check_params(generator: str, arguments: dict[str, Any]) -> None:
    """Check a generator's arguments (defaults filled in) before anything is generated.

    Types and ranges per :data:`PARAM_RANGES`, and the total size per
    :data:`MAX_GENERATED_VALUES`, so a wrong-typed, negative or huge value is one clear
    error, never a traceback from inside numpy or an allocation of terabytes.

    Parameters
    ----------
    generator
        A key of :data:`GENERATORS`.
    arguments
        Every argument of the generator, by name.

    Raises
    ------
    ValueError
        Naming the parameter and what it must be.
    """
    import inspect

    signature = inspect.signature(GENERATORS[generator])
    for name, parameter in signature.parameters.items():
        kind = str(parameter.annotation)
        _check_param(name, kind, arguments[name])
    values = _generated_values(generator, arguments)
    if values > MAX_GENERATED_VALUES:
        msg = (
            f"the parameters ask for about {values:,} generated values (cells × genes and the "
            f"like); at most {MAX_GENERATED_VALUES:,} are allowed: use fewer cells or genes"
        )
        raise ValueError(msg)
