"""Label prediction's logistic regression: non-convergence is recorded, threads are pinned."""

from __future__ import annotations

import inspect
import json
import os
import platform
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import classification
from czb.evaluation.registry import get_task
from czb.evaluation.runner import run_task


def blobs(offset: float, n: int = 1000, p: int = 50, k: int = 10, seed: int = 0):
    """Gaussian classes. With a large common ``offset`` the means dwarf the spread
    (``StandardScaler(with_mean=False)`` keeps them): at offset 1000 and 1000 or 2000 cells, L-BFGS
    needs 250-700 iterations; at offset 0, under 20."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(k, p))[y] + rng.normal(size=(n, p)) + offset
    return X, np.char.add("type", y.astype(str))


@pytest.mark.parametrize("exact", [True, False], ids=["scikit-learn", "atlas-scale"])
def test_unconverged_fits_are_counted_not_warned(exact):
    for offset, stalled in ((1000.0, 5), (0.0, 0)):
        X, labels = blobs(offset)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cv = classification.cross_validate_classifiers(X, labels, seed=0, classifiers=("lr", "knn"),
                                                           n_jobs=1, exact=exact)
        assert cv.lr_not_converged() == (stalled, 5), offset
        assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        assert cv.folds.loc[cv.folds.classifier == "knn", "converged"].all()


def test_other_warnings_of_a_fit_still_reach_the_caller(monkeypatch):
    class Warns:
        classes_ = np.array([0, 1])

        def fit(self, X, y):
            warnings.warn("lbfgs failed to converge", ConvergenceWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
            return self

        def predict_proba(self, X):
            return np.full((len(X), 2), 0.5)

    monkeypatch.setattr(classification, "make_classifier", lambda *a, **k: Warns())
    X, y = np.zeros((4, 2)), np.array([0, 1, 0, 1])
    with pytest.warns(UserWarning, match="something else") as caught:
        _, _, converged = classification.fit_and_predict("lr", X, y, np.arange(2), np.arange(2, 4), seed=0)
    assert converged is False
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]


def _run(X, labels, seeds, context=None):
    context = context or EvaluationContext(X, labels=labels, n_jobs=1)
    task = get_task("label_prediction")(classifiers=("lr", "knn"))
    context.plan([task])
    return run_task(task, context, seeds, raise_errors=True), context


def test_label_prediction_notes_non_convergence_over_its_seeds():
    X, labels = blobs(1000.0)
    result, context = _run(X, labels, [0, 1])
    assert result.computation["lr_not_converged"] == {"folds": 10, "of": 10, "max_iter": 100}
    again, _ = _run(X, labels, [3], context)  # a new run on the same context counts afresh
    assert again.computation["lr_not_converged"] == {"folds": 5, "of": 5, "max_iter": 100}
    easy, _ = _run(*blobs(0.0), [0, 1])
    assert "lr_not_converged" not in easy.computation


_SAME_UNDER_ANY_LIMIT = textwrap.dedent("""
    import json
    import numpy as np
    from threadpoolctl import threadpool_limits
    from czb.evaluation.metrics import classification

    X, labels = blobs(1000.0, n=2000)
    y = np.unique(labels, return_inverse=True)[1]
    train, test = np.arange(1600), np.arange(1600, 2000)
    same = {}
    for atlas in (False, True):
        out = {}
        for limit in (1, 2):
            with threadpool_limits(limits=limit):
                _, proba, converged = classification.fit_and_predict("lr", X, y, train, test, 0, atlas)
                scores = classification.fit_and_score("lr", X, y, train, test, 10, 0, atlas)
            out[limit] = (proba.tobytes(), scores, converged)
        same[str(atlas)] = [out[1][0] == out[2][0], out[1][1] == out[2][1], out[1][2], out[2][2]]
    print(json.dumps(same))
""")


def test_logistic_regression_does_not_depend_on_the_callers_thread_limit():
    """Bitwise the same probabilities and scores under 1 and 2 BLAS threads outside.

    Unpinned, OpenBLAS's Haswell kernels (any x86-64-v3 CPU) round these GEMMs differently
    on 2 threads, and the fit stopped at the cap moves probabilities by up to 2e-5; a
    subprocess, since the kernels are chosen when the library loads."""
    env = dict(os.environ)
    if platform.machine().lower() in ("x86_64", "amd64"):
        env["OPENBLAS_CORETYPE"] = "Haswell"
    script = "import numpy as np\n" + inspect.getsource(blobs) + _SAME_UNDER_ANY_LIMIT
    done = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    same = json.loads(done.stdout.strip().splitlines()[-1])
    # Both implementations; the fits stop at the cap, the case where round-off shows.
    assert same == {"False": [True, True, False, False], "True": [True, True, False, False]}
