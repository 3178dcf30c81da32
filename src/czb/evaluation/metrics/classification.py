"""Cross-validated label prediction from an embedding (cz-benchmarks' protocol)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from czb.evaluation.registry import MetricInfo, register_metric

_CV = "StratifiedKFold(5, shuffled, seeded) cross-validation"
MEAN_FOLD_ACCURACY = register_metric(
    MetricInfo("mean_fold_accuracy", f"Accuracy, mean over folds of {_CV}.",
               "https://github.com/chanzuckerberg/cz-benchmarks", stochastic=True)
)
MEAN_FOLD_F1 = register_metric(
    MetricInfo("mean_fold_f1", f"Macro F1 (binary F1 for two classes), mean over folds of {_CV}.",
               "https://github.com/chanzuckerberg/cz-benchmarks", stochastic=True)
)
MEAN_FOLD_PRECISION = register_metric(
    MetricInfo("mean_fold_precision", f"Macro precision, mean over folds of {_CV}.",
               "https://github.com/chanzuckerberg/cz-benchmarks", stochastic=True)
)
MEAN_FOLD_RECALL = register_metric(
    MetricInfo("mean_fold_recall", f"Macro recall, mean over folds of {_CV}.",
               "https://github.com/chanzuckerberg/cz-benchmarks", stochastic=True)
)
MEAN_FOLD_AUROC = register_metric(
    MetricInfo("mean_fold_auroc", f"One-vs-rest macro AUROC of predicted probabilities, mean over folds of {_CV}.",
               "https://github.com/chanzuckerberg/cz-benchmarks", stochastic=True)
)

#: Fold score name → metric name.
FOLD_SCORES = {
    "accuracy": MEAN_FOLD_ACCURACY.name,
    "f1": MEAN_FOLD_F1.name,
    "precision": MEAN_FOLD_PRECISION.name,
    "recall": MEAN_FOLD_RECALL.name,
    "auroc": MEAN_FOLD_AUROC.name,
}

CLASSIFIERS = ("lr", "knn", "rf")

#: Up to this many cells, cz-benchmarks' protocol exactly; above, the atlas-scale one
#: (see :func:`make_classifier`).
EXACT_MAX_CELLS = 50_000
#: Atlas scale: each random-forest tree grows on a bootstrap sample of this many cells.
RF_MAX_SAMPLES = 20_000
#: Atlas scale: logistic regression fits on a seeded random subset of at most this many
#: training cells. 51 × #classes parameters are pinned down long before 10^5 cells, and
#: an 800,000-cell fold would cost a minute per fit.
LR_MAX_SAMPLES = 100_000
#: scikit-learn's default, which cz-benchmarks keeps: logistic regression stops after this
#: many L-BFGS iterations, converged or not (``converged`` of :func:`fit_and_score`).
LR_MAX_ITER = 100


#: Start order of the fits (lowest first): the forest is the costliest by far.
_FIT_COST_RANK = {"rf": 0, "lr": 1, "knn": 2}


class ScaledKnnClassifier:
    """``StandardScaler(with_mean=False)`` → uniform 5-NN vote, on czb's neighbour search.

    The same classifier as scikit-learn's pipeline, but the search is
    :func:`czb.evaluation.neighbors.knn_search`: tiled and multi-threaded, exact up to
    its size limit and faiss IVF above, so 10^6-cell folds take seconds, not hours.
    Vote ties go to the first class in sorted order, as in scikit-learn.
    """

    def __init__(self, n_neighbors: int = 5):
        self.n_neighbors = n_neighbors

    def fit(self, X: np.ndarray, y: np.ndarray) -> ScaledKnnClassifier:
        self.scale_ = _standard_scale(X)
        self.classes_, self.codes_ = np.unique(y, return_inverse=True)
        self.reference_ = np.asarray(X / self.scale_, dtype=np.float32)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from czb.evaluation.neighbors import knn_search

        idx, _ = knn_search(self.reference_, np.asarray(X / self.scale_, dtype=np.float32), self.n_neighbors)
        votes = self.codes_[idx]
        n, k = votes.shape
        counts = np.bincount((np.arange(n)[:, None] * len(self.classes_) + votes).ravel(),
                             minlength=n * len(self.classes_)).reshape(n, len(self.classes_))
        return counts / k

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class SubsampledForest:
    """scikit-learn's ``RandomForestClassifier(n_estimators, max_samples, random_state=seed)``,
    each tree grown on its bootstrap sample gathered into a compact array.

    scikit-learn grows every tree on the whole training set with the bootstrap draw counts
    as sample weights, so each split reads feature values scattered over all rows: at
    800,000 training cells a 20,000-cell tree waits on memory (a fold's fit and prediction
    take 46 s, 39 s on compact rows). Here each tree gets the same seed and the same draw as
    scikit-learn's (its per-tree seeds from ``RandomState(seed)``, the draw by
    ``RandomState(tree seed).randint``), and is fit on the drawn rows only, in index
    order, weighted by their counts: the split search then sees the same values in the
    same order, and the trees and probabilities are scikit-learn's.
    """

    def __init__(self, *, n_estimators: int = 100, max_samples: int = RF_MAX_SAMPLES, seed: int = 0):
        self.n_estimators, self.max_samples, self.seed = n_estimators, max_samples, seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> SubsampledForest:
        from sklearn.tree import DecisionTreeClassifier

        X = np.ascontiguousarray(X, dtype=np.float32)  # the forest's own input type
        self.classes_, codes = np.unique(y, return_inverse=True)
        n = len(X)
        seeds = np.random.RandomState(self.seed)
        self.trees_ = []
        for _ in range(self.n_estimators):
            tree_seed = seeds.randint(np.iinfo(np.int32).max)
            draw = np.random.RandomState(tree_seed).randint(0, n, min(self.max_samples, n))
            counts = np.bincount(draw, minlength=n)
            rows = np.flatnonzero(counts)
            tree = DecisionTreeClassifier(max_features="sqrt", random_state=tree_seed)
            tree.fit(X[rows], codes[rows], sample_weight=counts[rows].astype(np.float64))
            self.trees_.append(tree)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        proba = np.zeros((len(X), len(self.classes_)))
        for tree in self.trees_:  # a tree's classes are those its draw held
            proba[:, tree.classes_] += tree.predict_proba(X)
        return proba / len(self.trees_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def _standard_scale(X: np.ndarray) -> np.ndarray:
    """Per-column population standard deviation; 1 for constant columns (as ``StandardScaler``)."""
    scale = np.asarray(X, dtype=np.float64).std(axis=0)
    return np.where(scale > 0, scale, 1.0)


class ScaledLogisticRegression:
    """``StandardScaler(with_mean=False)`` → ``LogisticRegression()``, in numpy.

    scikit-learn's objective and optimiser: mean multinomial (binomial for two classes)
    log-loss plus ``‖W‖² / (2 C n)`` (intercepts unpenalised), minimised from zeros by
    scipy's L-BFGS-B with scikit-learn's settings (``max_iter`` 100, ``gtol`` = ``tol``,
    ``ftol`` 64 eps, 50 line-search steps). Loss and gradient are two GEMMs and a softmax,
    where scikit-learn's loss takes 0.4 s per iteration on a 160,000-cell fold (40 s per
    fit). The optimum is the same; a fit stopped at 100 iterations before converging can
    differ from scikit-learn's in round-off. ``converged_`` is ``False`` when L-BFGS
    stopped before meeting its tolerance (where scikit-learn warns ``ConvergenceWarning``).
    """

    def __init__(self, *, C: float = 1.0, max_iter: int = LR_MAX_ITER, tol: float = 1e-4):
        self.C, self.max_iter, self.tol = C, max_iter, tol

    def fit(self, X: np.ndarray, y: np.ndarray) -> ScaledLogisticRegression:
        from scipy.optimize import minimize
        from scipy.special import expit, log_expit

        self.scale_ = _standard_scale(X)
        n, p = X.shape
        # A column of ones carries the intercepts: one GEMM each way per evaluation.
        Z = np.empty((n, p + 1))
        np.divide(X, self.scale_, out=Z[:, :p])
        Z[:, p] = 1.0
        self.classes_, codes = np.unique(y, return_inverse=True)
        binary = len(self.classes_) == 2
        n_out = 1 if binary else len(self.classes_)
        l2 = 1.0 / (self.C * n)
        target = codes.astype(np.float64)
        rows = np.arange(n)

        def loss_and_gradient(w: np.ndarray) -> tuple[float, np.ndarray]:
            W = w.reshape(n_out, p + 1)
            raw = Z @ W.T
            if binary:
                r = raw[:, 0]
                # log(1 + e^r) − y r, stably
                loss = float(np.sum(-log_expit(r) + (1.0 - target) * r)) / n
                residual = (expit(r) - target)[:, None]
            else:  # log-sum-exp and softmax in place
                loss = -float(raw[rows, codes].sum())
                top = raw.max(axis=1)
                raw -= top[:, None]
                residual = np.exp(raw, out=raw)
                total = residual.sum(axis=1)
                loss = (loss + float(np.sum(top + np.log(total)))) / n
                residual /= total[:, None]
                residual[rows, codes] -= 1.0
            loss += 0.5 * l2 * float(np.sum(W[:, :p] ** 2))
            grad = (residual.T @ Z) / n
            grad[:, :p] += l2 * W[:, :p]
            return loss, grad.ravel()

        result = minimize(loss_and_gradient, np.zeros(n_out * (p + 1)), method="L-BFGS-B", jac=True,
                          options={"maxiter": self.max_iter, "maxls": 50, "gtol": self.tol,
                                   "ftol": 64 * np.finfo(float).eps})
        W = result.x.reshape(n_out, p + 1)
        self.coef_, self.intercept_ = W[:, :p], W[:, p]
        self.n_iter_ = int(result.nit)
        self.converged_ = bool(result.status == 0)
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from scipy.special import expit, softmax

        raw = (np.asarray(X, dtype=np.float64) / self.scale_) @ self.coef_.T + self.intercept_
        if raw.shape[1] == 1:
            positive = expit(raw[:, 0])
            return np.column_stack([1.0 - positive, positive])
        return softmax(raw, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def make_classifier(name: str, *, seed: int, atlas_scale: bool = False, n_train: int | None = None):
    """The classifiers cz-benchmarks uses, with the same settings.

    ``lr``: ``StandardScaler(with_mean=False)`` → ``LogisticRegression()``;
    ``knn``: ``StandardScaler(with_mean=False)`` → ``KNeighborsClassifier(5)``;
    ``rf``: ``RandomForestClassifier(100 trees, random_state=seed)`` (trees need no scaling).

    With ``atlas_scale`` (datasets above :data:`EXACT_MAX_CELLS` cells) three change, so
    that a 10^6-cell fold fits in minutes: ``lr`` is :class:`ScaledLogisticRegression`
    (the same model and optimiser, fit on at most :data:`LR_MAX_SAMPLES` cells of the
    fold), ``knn`` is :class:`ScaledKnnClassifier`
    (approximate neighbours above the search's exact limit), and each forest tree grows
    on a bootstrap sample of :data:`RF_MAX_SAMPLES` cells (scikit-learn's
    ``max_samples``, grown by :class:`SubsampledForest`) instead of one as large as the
    fold (``n_train`` cells, when that is more); 100 trees still draw more cells than the
    fold holds.
    """
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "lr":
        if atlas_scale:
            return ScaledLogisticRegression()
        return Pipeline([("scaler", StandardScaler(with_mean=False)),
                         ("lr", LogisticRegression(max_iter=LR_MAX_ITER))])
    if name == "knn":
        if atlas_scale:
            return ScaledKnnClassifier(n_neighbors=5)
        return Pipeline([("scaler", StandardScaler(with_mean=False)), ("knn", KNeighborsClassifier(n_neighbors=5))])
    if name == "rf":
        if atlas_scale and (n_train is None or n_train > RF_MAX_SAMPLES):
            return SubsampledForest(n_estimators=100, max_samples=RF_MAX_SAMPLES, seed=seed)
        return Pipeline([("rf", RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1))])
    msg = f"unknown classifier {name!r}; known: {', '.join(CLASSIFIERS)}"
    raise ValueError(msg)


def filter_small_classes(labels: np.ndarray, min_class_size: int) -> tuple[np.ndarray, list[str]]:
    """Mask of cells whose label has at least ``min_class_size`` cells, and the dropped labels."""
    counts = pd.Series(labels).value_counts()
    dropped = sorted(counts.index[counts < min_class_size].astype(str))
    return np.isin(labels, counts.index[counts >= min_class_size]), dropped


def require_classes(labels: np.ndarray, min_class_size: int) -> int:
    """The number of classes with at least ``min_class_size`` cells, or
    :class:`~czb.core.errors.NotApplicableError` when fewer than 2 have that many (a classifier
    of one class predicts it perfectly, whatever the embedding)."""
    from czb.core.errors import NotApplicableError

    counts = pd.Series(np.asarray(labels)).value_counts()
    n_classes = int((counts >= min_class_size).sum())
    if n_classes < 2:
        msg = (f"label prediction needs at least 2 labels with >= {min_class_size} cells each; "
               f"{n_classes} of the {len(counts)} labels have that many")
        raise NotApplicableError(msg)
    return n_classes


def score_fold(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy, F1, precision, recall (macro, or binary for two classes) and OvR macro AUROC."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    average = "binary" if n_classes == 2 else "macro"
    labels = np.arange(n_classes)
    kw = {"average": average, "zero_division": 0}
    if average == "macro":
        kw["labels"] = labels
    auroc = (
        roc_auc_score(y_true, proba[:, 1])
        if n_classes == 2
        else roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels)
    )
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1": float(f1_score(y_true, y_pred, **kw)),
        "precision": float(precision_score(y_true, y_pred, **kw)),
        "recall": float(recall_score(y_true, y_pred, **kw)),
        "auroc": float(auroc),
    }


def fit_and_predict(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    seed: int,
    atlas_scale: bool = False,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fit classifier ``name`` (:func:`make_classifier`) on rows ``train``, predict rows ``test``.

    Fit and prediction run on one BLAS/OpenMP thread, whatever the caller's limit (joblib
    gives each worker ``cpu_count // n_jobs``): how OpenBLAS splits a GEMM over threads
    moves its round-off, which a logistic regression stopped at :data:`LR_MAX_ITER`
    iterations carries into its scores, so the value would depend on the machine.
    Parallelism is across folds (processes). The atlas-scale kNN is left to its search,
    which runs tiles in parallel threads and ranks neighbours by recomputed float64
    distances.

    Returns
    -------
    classes
        The classes seen in training (sorted).
    proba
        ``(len(test), len(classes))`` predicted probabilities.
    converged
        ``False`` when a logistic regression stopped before meeting its tolerance
        (scikit-learn's ``ConvergenceWarning``, caught here rather than shown per fold);
        ``True`` for the other classifiers.
    """
    import warnings
    from contextlib import nullcontext

    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    clf = make_classifier(name, seed=seed, atlas_scale=atlas_scale, n_train=len(train))
    if atlas_scale and name == "lr" and len(train) > LR_MAX_SAMPLES:
        train = np.sort(np.random.default_rng(seed).choice(train, size=LR_MAX_SAMPLES, replace=False))
    pinned = nullcontext() if isinstance(clf, ScaledKnnClassifier) else threadpool_limits(limits=1)
    with pinned, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(X[train], y[train])
        proba = clf.predict_proba(X[test])
    converged = bool(getattr(clf, "converged_", True))
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return np.asarray(clf.classes_), proba, converged


def fit_and_score(
    name: str,
    X: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    n_classes: int,
    seed: int,
    atlas_scale: bool = False,
) -> dict:
    """Fit classifier ``name`` on rows ``train`` and score it on rows ``test`` (:func:`fit_and_predict`).

    Parameters
    ----------
    X, y
        ``(n, dim)`` features and ``(n,)`` integer labels in ``0..n_classes-1``.
    train, test
        Row indices.

    Returns
    -------
    :func:`score_fold`'s scores (a class absent from ``train`` gets probability 0) and
    ``converged`` (:func:`fit_and_predict`).
    """
    classes, raw, converged = fit_and_predict(name, X, y, train, test, seed, atlas_scale)
    proba = np.zeros((len(test), n_classes))
    proba[:, classes] = raw  # a class absent from train gets 0
    # For all three classifiers predict() is the most probable class (first on ties):
    # taken from the probabilities rather than a second pass over the test cells.
    predicted = classes[np.argmax(raw, axis=1)]
    return {**score_fold(y[test], predicted, proba, n_classes), "converged": converged}


@dataclass
class CrossValidation:
    """Per-fold scores of every classifier.

    Attributes
    ----------
    folds
        One row per (classifier, fold) with the five scores and ``converged``
        (:func:`fit_and_predict`).
    dropped_labels
        Labels removed for having fewer than ``min_class_size`` cells.
    n_cells
        Cells used after filtering.
    atlas_scale
        Whether the atlas-scale classifiers of :func:`make_classifier` were used.
    """

    folds: pd.DataFrame
    dropped_labels: list[str]
    n_cells: int
    atlas_scale: bool = False

    def lr_not_converged(self) -> tuple[int, int]:
        """Logistic-regression fits that stopped before converging, and all of them."""
        lr = self.folds[self.folds["classifier"] == "lr"]
        return int((~lr["converged"].astype(bool)).sum()), len(lr)


def cross_validate_classifiers(
    X: np.ndarray,
    labels: np.ndarray,
    *,
    seed: int = 42,
    n_folds: int = 5,
    min_class_size: int = 10,
    classifiers: tuple[str, ...] = CLASSIFIERS,
    n_jobs: int = 1,
    exact: bool | None = None,
) -> CrossValidation:
    """Stratified k-fold prediction of ``labels`` from ``X`` with each classifier.

    Parameters
    ----------
    X
        ``(n_cells, n_dims)`` embedding.
    labels
        ``(n_cells,)`` labels; classes with fewer than ``min_class_size`` cells are dropped.
    seed
        Seeds the fold split and the random forest.
    n_jobs
        Worker processes; the (classifier, fold) fits run in parallel.
    exact
        cz-benchmarks' classifiers at any size (``True``), the atlas-scale ones of
        :func:`make_classifier` at any size (``False``), or above
        :data:`EXACT_MAX_CELLS` cells (``None``).
    """
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels).astype(str)
    keep, dropped = filter_small_classes(labels, min_class_size)
    X = np.ascontiguousarray(X[keep])
    y_cat = pd.Categorical(labels[keep])  # codes follow sorted label names, as in cz-benchmarks
    y = np.asarray(y_cat.codes, dtype=np.int64)
    n_classes = len(y_cat.categories)
    if n_classes < 2:
        require_classes(labels, min_class_size)  # says why
    splits = list(StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(X, y))
    jobs = [(name, fold, train, test) for name in classifiers for fold, (train, test) in enumerate(splits)]
    atlas_scale = len(y) > EXACT_MAX_CELLS if exact is None else not exact
    # The costliest fits start first, so the last ones to finish are short and no worker
    # waits long on another's forest (the rows keep the order of ``jobs``).
    order = sorted(range(len(jobs)), key=lambda j: _FIT_COST_RANK.get(jobs[j][0], 0))
    done = Parallel(n_jobs=min(n_jobs, len(jobs)))(
        delayed(fit_and_score)(jobs[j][0], X, y, jobs[j][2], jobs[j][3], n_classes, seed, atlas_scale) for j in order
    )
    scores = [None] * len(jobs)
    for j, s in zip(order, done):
        scores[j] = s
    rows = [{"classifier": name, "fold": fold, **s} for (name, fold, _, _), s in zip(jobs, scores)]
    return CrossValidation(folds=pd.DataFrame(rows), dropped_labels=dropped, n_cells=int(keep.sum()),
                           atlas_scale=atlas_scale)
