"""The seeded cases of the sequential-organization reference: written by
``reference_sequential.py`` (run with cz-benchmarks installed) and read back by
``tests/evaluation/test_sequential.py``. numpy only, so both environments import it."""

import numpy as np


def make_cases():
    """Seeded embeddings ``X`` with time points ``t``, by case name."""
    cases = {}
    rng = np.random.default_rng(7)
    # A planted time axis: cells along a curve ordered by time, plus noise, in 10-D.
    t = rng.integers(0, 6, 600)
    tau = (t + rng.uniform(0, 1, 600)) / 6
    curve = np.stack([np.cos(3 * tau), np.sin(3 * tau), 2 * tau], axis=1)
    rotation = np.linalg.qr(rng.normal(size=(10, 10)))[0][:3]
    cases["curve"] = (curve @ rotation + 0.15 * rng.normal(size=(600, 10)), t)
    # No structure: Gaussian noise, continuous time points.
    cases["random"] = (rng.normal(size=(500, 10)), rng.uniform(0, 10, 500))
    # Weak structure, float time points with ties, numeric strings as cz-benchmarks accepts.
    t = rng.integers(0, 4, 400).astype(float) * 0.5
    X = rng.normal(size=(400, 8))
    X[:, 0] += 0.8 * t
    cases["weak"] = (X, t)
    cases["numeric_strings"] = (X, np.array([f"{v:g}" for v in t]))
    return cases
