"""The ``planted_screen`` generator: a genome-wide-like CRISPR screen whose complexes
share gene programs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from czb.data.synthetic import KNOWN_COMPLEXES
from czb.data.synthetic.common import ensembl_like_ids, negative_binomial_counts

if TYPE_CHECKING:
    import anndata


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
