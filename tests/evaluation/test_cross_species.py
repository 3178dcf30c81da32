"""Cross-species tasks on planted data: several species' cells stacked in one context.

Species share most cell types and each has one of its own. Three embeddings of the
same cells: species-agnostic (one centroid per type for every species), species-
separated (the same, with each species moved far away) and random.
"""

import itertools

import numpy as np
import pytest

from czb.core.errors import TaskError
from czb.evaluation import EvaluationContext
from czb.evaluation.metrics import classification
from czb.evaluation.registry import get_task, load_all
from czb.evaluation.runner import run_task

load_all()

SHARED = ("B", "NK", "T", "mono")
SPECIFIC = {"human": "pDC", "mouse": "mast", "macaque": "eos"}
MEAN3 = "MEAN(knn,lr,rf)"


def planted_species(species=("human", "mouse"), n_per_species=300, dim=16, *, mode="agnostic",
                    separation=4.0, seed=0):
    """(X, labels, species, donor) of cells of several species.

    ``mode``: ``agnostic`` (cell-type centroids shared across species, plus noise),
    ``separated`` (the same, each species shifted far away) or ``random``.
    """
    rng = np.random.default_rng(seed)
    types = [*SHARED, *SPECIFIC.values()]
    centers = {t: c for t, c in zip(types, rng.normal(size=(len(types), dim)) * separation)}
    X, labels, organism, donor = [], [], [], []
    for s in species:
        own = [*SHARED, SPECIFIC[s]]
        lab = rng.choice(own, n_per_species, p=[0.22] * 4 + [0.12])
        shift = rng.normal(size=dim) * (12.0 if mode == "separated" else 0.2)
        X.append(np.array([centers[t] for t in lab]) + shift + rng.normal(size=(n_per_species, dim)))
        labels.append(lab)
        organism.append(np.full(n_per_species, s))
        donor.append(np.array([f"d{i}" for i in rng.integers(0, 4, n_per_species)]))  # same names per species
    X = np.vstack(X)
    if mode == "random":
        X = rng.normal(size=X.shape)
    return X, np.concatenate(labels), np.concatenate(organism), np.concatenate(donor)


def context(X, labels, species, donor=None, **roles):
    extra = {"species": species, **({"donor": donor} if donor is not None else {}), **roles}
    return EvaluationContext(X, labels=labels, roles=extra, n_jobs=2)


def run(name, ctx, seeds=(0,), **params):
    result = run_task(get_task(name)(**params), ctx, seeds)
    assert result.status == "ok", result.error
    return result


@pytest.fixture(scope="module")
def integration():
    out = {}
    for mode in ("agnostic", "separated", "random"):
        X, labels, species, _ = planted_species(mode=mode)
        out[mode] = run("cross_species_integration", context(X, labels, species))
    return out


@pytest.fixture(scope="module")
def transfer():
    out = {}
    for mode in ("agnostic", "random"):
        X, labels, species, _ = planted_species(mode=mode)
        out[mode] = run("cross_species_label_prediction", context(X, labels, species))
    return out


def test_both_tasks_are_multi_dataset():
    for name in ("cross_species_integration", "cross_species_label_prediction"):
        info = get_task(name).info
        assert info.kind == "multi_dataset"
        assert set(info.requires) == {"labels", "species"}


# --- cross_species_integration ------------------------------------------------------------


def test_species_agnostic_embedding_mixes_and_conserves(integration):
    good = integration["agnostic"]
    assert good.metric("entropy_per_cell").value > 0.8
    assert good.metric("batch_silhouette").value > 0.85
    assert good.metric("ilisi_normalized").value > 0.6
    assert good.metric("silhouette_score", cell_types="shared").value > 0.75
    assert good.metric("adjusted_rand_index", cell_types="shared").value > 0.8
    assert good.metric("scib_overall").value > 0.8


def test_species_separated_embedding_fails_mixing_but_is_good_within_species(integration):
    sep, good = integration["separated"], integration["agnostic"]
    assert sep.metric("entropy_per_cell").value < 0.05
    assert sep.metric("ilisi_normalized").value < 0.05
    assert sep.metric("batch_silhouette").value < good.metric("batch_silhouette").value - 0.3
    assert sep.metric("silhouette_score", cell_types="within_species").value > 0.75
    # Shared types are split by species, so conservation across species is poor.
    assert sep.metric("silhouette_score", cell_types="shared").value < good.metric(
        "silhouette_score", cell_types="shared").value - 0.1
    assert sep.metric("scib_overall").value < good.metric("scib_overall").value - 0.15


def test_random_embedding_cannot_win_cross_species_integration(integration):
    rnd, good = integration["random"], integration["agnostic"]
    # Noise mixes species at least as well as a good embedding...
    assert rnd.metric("entropy_per_cell").value > 0.95
    assert rnd.metric("batch_silhouette").value > 0.9
    # ...but destroys the cell types, so it loses the total.
    assert rnd.metric("silhouette_score", cell_types="shared").value == pytest.approx(0.5, abs=0.05)
    assert rnd.metric("adjusted_rand_index", cell_types="shared").value < 0.1
    assert good.metric("scib_overall").value > rnd.metric("scib_overall").value + 0.2


def test_scib_metrics_with_species_as_batch(integration):
    good, sep, rnd = integration["agnostic"], integration["separated"], integration["random"]
    shared = {"cell_types": "shared"}
    # Shared types mixed across species: kBET accepts, each type one connected piece.
    assert good.metric("kbet_per_label").value > 0.5 > 0.05 > sep.metric("kbet_per_label").value
    assert good.metric("graph_connectivity", **shared).value > 0.95
    assert sep.metric("graph_connectivity", **shared).value < 0.7  # each type split by species
    for name in ("clisi_normalized", "nmi_kmeans", "ari_kmeans"):
        assert good.metric(name, **shared).value > 0.8, name
        assert rnd.metric(name, **shared).value < 0.5, name
    # Isolated labels (species as batch): the species-specific types, kept apart by both.
    assert good.metric("isolated_labels").params == {}
    assert good.metric("isolated_labels").value > 0.7 > 0.55 > rnd.metric("isolated_labels").value
    assert "pcr_comparison" in good.computation["not_applicable"]
    assert good.metric("scib_overall").params == {"without": "pcr_comparison"}


def test_pcr_comparison_with_species_as_batch():
    X, labels, species, _ = planted_species(mode="agnostic")
    before, _, _, _ = planted_species(mode="separated")  # the same cells, species apart
    result = run("cross_species_integration", EvaluationContext(
        X, labels=labels, roles={"species": species}, pre_integration=before))
    assert result.metric("pcr_comparison").value > 0.9
    assert result.metric("scib_overall").params == {}


def test_integration_reports_species_specific_types(integration):
    m = integration["agnostic"].metric("silhouette_score", cell_types="shared")
    assert m.params["unshared_labels"] == "mast,pDC"
    assert m.params["n_cell_types"] == len(SHARED)


def test_integration_needs_two_species():
    X, labels, _, _ = planted_species(n_per_species=100)
    for name in ("cross_species_integration", "cross_species_label_prediction"):
        r = run_task(get_task(name)(), context(X, labels, np.full(len(X), "human")), (0,))
        assert r.status == "not_applicable"
        assert "at least 2 organisms" in r.error and "'human'" in r.error
        r = run_task(get_task(name)(), EvaluationContext(X, labels=labels), (0,))
        assert r.status == "not_applicable" and "species" in r.error


def test_integration_without_shared_types_is_not_applicable():
    X, labels, species, _ = planted_species(n_per_species=100)
    renamed = np.char.add(species, np.char.add(":", labels))  # per-species vocabularies
    r = run_task(get_task("cross_species_integration")(), context(X, renamed, species), (0,))
    assert r.status == "not_applicable" and "vocabulary" in r.error


# --- cross_species_label_prediction ------------------------------------------------------


def test_transfer_from_species_agnostic_embedding_is_accurate(transfer):
    good = transfer["agnostic"]
    for pair in (("human", "mouse"), ("mouse", "human")):
        for clf in ("lr", "knn", "rf", MEAN3):
            m = good.metric("accuracy", train_species=pair[0], test_species=pair[1], classifier=clf)
            assert m.value > 0.9, (pair, clf)
    mean = dict(train_species="MEAN", test_species="MEAN", classifier=MEAN3)
    assert good.metric("accuracy", **mean).value > 0.95
    assert good.metric("f1", **mean).value > 0.9
    assert good.metric("auroc", **mean).value > 0.95


def test_transfer_from_random_embedding_is_chance(transfer):
    rnd = transfer["random"]
    mean = dict(train_species="MEAN", test_species="MEAN", classifier=MEAN3)
    assert rnd.metric("accuracy", **mean).value == pytest.approx(1 / len(SHARED), abs=0.08)
    assert rnd.metric("auroc", **mean).value == pytest.approx(0.5, abs=0.06)


def test_unshared_labels_are_reported_not_scored(transfer):
    """Each species' own type is left out on both sides and named; cz-benchmarks would
    train on human's pDC and crash computing AUROC on mouse cells, which have none."""
    for m in transfer["agnostic"].metrics:
        if m.params["train_species"] == "MEAN":
            assert m.params["n_pairs"] == 2 and m.params["skipped_pairs"] == ""
            continue
        assert m.params["unshared_labels"] == "mast,pDC"
        assert m.params["n_labels"] == len(SHARED)
        assert np.isfinite(m.value)


def test_absent_test_class_does_not_break_auroc():
    """Train species has a type the test species lacks entirely (cz-benchmarks 0.15.1:
    ValueError 'Number of classes in y_true not equal to the number of columns in y_score')."""
    X, labels, species, _ = planted_species(n_per_species=200, seed=4)
    r = run("cross_species_label_prediction", context(X, labels, species))
    for pair in (("human", "mouse"), ("mouse", "human")):
        for clf in ("lr", "knn", "rf"):
            assert 0.9 < r.metric("auroc", train_species=pair[0], test_species=pair[1], classifier=clf).value <= 1.0


def test_rare_type_in_one_species_is_unshared_and_two_label_pairs_work():
    """A type with too few cells in one species is reported like an absent one; a pair
    left with two labels is scored (binary F1 and AUROC)."""
    X, labels, species, _ = planted_species(n_per_species=200, seed=5)
    keep = ~np.isin(labels, ["NK", "mono"]) | ((species == "mouse") & (labels == "NK"))
    keep[np.flatnonzero((species == "human") & (labels == "NK"))[:5]] = True  # 5 human NK < 10
    r = run("cross_species_label_prediction", context(X[keep], labels[keep], species[keep]))
    m = r.metric("auroc", train_species="human", test_species="mouse", classifier="lr")
    assert m.params["n_labels"] == 2
    assert m.params["unshared_labels"] == "NK,mast,pDC"
    assert m.value > 0.9
    assert r.metric("f1", train_species="human", test_species="mouse", classifier="lr").value > 0.9


def test_three_species_give_every_ordered_pair():
    X, labels, species, _ = planted_species(("human", "mouse", "macaque"), n_per_species=150)
    r = run("cross_species_label_prediction", context(X, labels, species))
    pairs = {(m.params["train_species"], m.params["test_species"]) for m in r.metrics}
    expected = set(itertools.permutations(["human", "mouse", "macaque"], 2))
    assert pairs == expected | {("MEAN", "MEAN")} and len(expected) == 6
    for train, test in expected:
        clfs = {m.params["classifier"] for m in r.metrics
                if m.name == "recall" and (m.params["train_species"], m.params["test_species"]) == (train, test)}
        assert clfs == {"lr", "knn", "rf", MEAN3}
    mean = r.metric("accuracy", train_species="MEAN", classifier="rf")
    per_pair = [r.metric("accuracy", train_species=a, test_species=b, classifier="rf").value for a, b in expected]
    assert mean.params["n_pairs"] == 6
    assert mean.value == pytest.approx(np.mean(per_pair))


def test_no_aggregation_by_default_needs_no_sample_ids():
    """cz-benchmarks 0.15.1 aggregates by default and fails without sample IDs
    ('Mismatched lengths ... sample_ids=0'); here cells are classified unless asked."""
    assert get_task("cross_species_label_prediction")().params.aggregate_by is None
    X, labels, species, _ = planted_species(n_per_species=120)
    r = run("cross_species_label_prediction", context(X, labels, species))
    assert r.metric("accuracy", train_species="human", test_species="mouse", classifier="lr").params["n_train"] > 90


def test_aggregation_by_donor():
    X, labels, species, donor = planted_species(n_per_species=200)
    r = run("cross_species_label_prediction", context(X, labels, species, donor), aggregate_by="donor")
    m = r.metric("accuracy", train_species="human", test_species="mouse", classifier="lr")
    # One unit per (donor, shared label): 4 donors x 4 types on each side.
    assert (m.params["n_train"], m.params["n_test"]) == (16, 16)
    assert m.value > 0.9
    r = run_task(get_task("cross_species_label_prediction")(aggregate_by="sample"),
                 context(X, labels, species, donor), (0,))
    assert r.status == "not_applicable" and "declare no sample" in r.error
    with pytest.raises(TaskError, match="aggregate_by"):
        get_task("cross_species_label_prediction")(aggregate_by="cell")


def test_aggregated_units_are_group_means():
    from czb.evaluation.tasks.cross_species_label_prediction import aggregate_units

    X = np.arange(12, dtype=float).reshape(6, 2)
    labels = np.array(["a", "a", "b", "a", "a", "a"])
    species = np.array(["h", "h", "h", "m", "m", "m"])
    donor = np.array(["d1", "d1", "d1", "d1", "d2", "d2"])  # "d1" in both species: distinct units
    u = aggregate_units(X, labels, species, donor)
    got = sorted(zip(u.species, u.labels, map(tuple, u.X)))
    assert got == [("h", "a", (1.0, 2.0)), ("h", "b", (4.0, 5.0)), ("m", "a", (6.0, 7.0)), ("m", "a", (9.0, 10.0))]


def test_classifiers_are_label_predictions_and_deterministic_ones_fit_once(monkeypatch):
    """Same factory and settings as within-species label_prediction; lr and kNN do not
    depend on the seed, so with two seeds only the random forest is refitted."""
    from sklearn.base import BaseEstimator

    built = []
    real = classification.make_classifier
    monkeypatch.setattr(classification, "make_classifier",
                        lambda name, *, seed, **kw: built.append((name, seed, real(name, seed=seed, **kw))) or built[-1][2])

    def settings(est):
        out = {}
        for k, v in est.get_params(deep=True).items():
            if k == "steps":
                v = [(n, type(e).__name__) for n, e in v]
            elif isinstance(v, BaseEstimator):
                v = type(v).__name__
            out[k] = v
        return out

    X, labels, species, _ = planted_species(n_per_species=120)
    ctx = context(X, labels, species)
    ctx.n_jobs = 1  # fits in this process, so the spy sees them
    r = run("cross_species_label_prediction", ctx, seeds=(0, 1))
    cross = {(n, s): settings(e) for n, s, e in built}
    assert sorted(n for n, _, _ in built) == ["knn"] * 2 + ["lr"] * 2 + ["rf"] * 4  # 2 pairs
    lr = r.metric("accuracy", train_species="human", test_species="mouse", classifier="lr")
    assert lr.values_raw[0] == lr.values_raw[1]

    built.clear()
    within = EvaluationContext(X[species == "human"], labels=labels[species == "human"], n_jobs=1)
    assert run_task(get_task("label_prediction")(), within, (0, 1)).status == "ok"
    for (name, seed), params in cross.items():
        same = [settings(e) for n, s, e in built if (n, s) == (name, seed)]
        assert same and all(p == params for p in same), name
    assert cross[("rf", 0)]["rf__n_estimators"] == 100 and cross[("rf", 1)]["rf__random_state"] == 1
    assert cross[("knn", 0)]["knn__n_neighbors"] == 5


def test_transfer_records_logistic_regressions_that_did_not_converge():
    X, labels, species, _ = planted_species()
    easy = run("cross_species_label_prediction", context(X, labels, species))
    assert "lr_not_converged" not in easy.computation
    # A large common offset (kept by StandardScaler(with_mean=False)) stalls L-BFGS at its cap.
    hard = run("cross_species_label_prediction", context(X * 0.05 + 1000.0, labels, species))
    assert hard.computation["lr_not_converged"] == {"fits": 2, "of": 2, "max_iter": 100}
