"""The ``planted_perturbations`` generator: a Perturb-seq-like screen of single and
paired perturbations with additive effects."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from czb.data.synthetic.common import ensembl_like_ids, negative_binomial_counts

if TYPE_CHECKING:
    import anndata


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
    expressed = np.argsort(-base, kind="stable")[: max(n_genes // 2, n_targets)]  # clipped ties: by index
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
