"""The planted screen of the cell-eval reference: written by ``reference_cell_eval.py``
(run with cell-eval installed) and read back by
``tests/evaluation/perturbation/test_cell_eval_metrics.py``. numpy only, so both
environments import it.

Eight single-gene knockdowns (labelled by their target gene, as the Virtual Cell
Challenge labels them) and controls; each knockdown moves its target and 12 other
genes (two share half of theirs; one is weak; one switches on a gene that controls
never express, so its observed log2 fold change is infinite). Predictions are mean
log-normalised profiles per condition, rows in sorted label order.
"""

import numpy as np

CONTROL = "non-targeting"
N_GENES = 120
N_CONDITIONS = 8
N_CONTROL_CELLS = 150


def _cells(rng, mean, n):
    """``n`` cells of negative-binomial counts around ``mean`` (per gene), log-normalised
    (``log1p(counts / total * 1e4)``) as float32."""
    size = rng.lognormal(0.0, 0.3, size=(n, 1))
    counts = rng.poisson(rng.gamma(5.0, size * mean[None, :] / 5.0))
    total = counts.sum(axis=1, keepdims=True)
    return np.log1p(counts / total * 1e4).astype(np.float32)


def make_screen(seed=0):
    """``(X, labels, genes, replicate)``: log-normalised cells (float32), their
    condition labels, gene names, and the mean profile of an independent draw of 40
    cells per condition (a good prediction; rows in sorted label order)."""
    rng = np.random.default_rng(seed)
    genes = np.array([f"G{i:03d}" for i in range(N_GENES)])
    base = 0.5 * np.exp(rng.normal(0.0, 1.5, N_GENES))
    base[-1] = 0.0  # never expressed in controls
    effects = []
    for i in range(N_CONDITIONS):
        effect = np.ones(N_GENES)
        effect[i] = 0.1  # the knocked-down target
        moved = rng.choice(np.arange(N_CONDITIONS, N_GENES - 1), 12, replace=False)
        if i == 1:
            moved[:6] = effects[0][1][:6]  # shares half its genes with condition 0
        log2_effect = rng.choice([-1.0, 1.0], 12) * rng.uniform(0.8, 2.5, 12)
        if i == 7:
            log2_effect *= 0.3  # weak
        effect[moved] = 2.0 ** log2_effect
        effects.append((effect, moved))
    labels, blocks = [CONTROL] * N_CONTROL_CELLS, [_cells(rng, base, N_CONTROL_CELLS)]
    means = []
    for i, (effect, _) in enumerate(effects):
        mean = base * effect
        if i == 2:
            mean[-1] = 2.0  # switched on
        n = 40 + 3 * i
        blocks.append(_cells(rng, mean, n))
        labels += [genes[i]] * n
        means.append(mean)
    replicate = np.stack([_cells(rng, mean, 40).astype(np.float64).mean(axis=0) for mean in means])
    return np.vstack(blocks), np.array(labels), genes, replicate.astype(np.float32)


def make_predictions(seed=0):
    """Predicted profiles ``(n_conditions, n_genes)`` float32 by predictor name."""
    X, labels, _, replicate = make_screen(seed)
    rng = np.random.default_rng(seed + 1)
    control = X[labels == CONTROL].astype(np.float64).mean(axis=0)
    noisy = np.clip(replicate + rng.normal(0.0, 0.05, replicate.shape), 0.0, None)
    return {
        "replicate": replicate,
        "noisy": noisy.astype(np.float32),
        "control_mean": np.tile(control, (N_CONDITIONS, 1)).astype(np.float32),
        "shuffled": np.roll(replicate, 1, axis=0),
    }
