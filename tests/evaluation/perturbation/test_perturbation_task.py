"""The genetic perturbation prediction task on planted screens: the split rules, both
formulations' ranking of the baselines against an oracle, and the errors."""

import numpy as np
import pytest
import scipy.sparse as sp

from czb.core.errors import NotApplicableError, TaskError
from czb.data.synthetic.perturbations import planted_perturbations
from czb.evaluation.perturbation.expression import condition_means, log_normalize
from czb.evaluation.perturbation.prediction import cell_eval_metrics as ce
from czb.evaluation.perturbation.prediction import metrics as pm
from czb.evaluation.perturbation.prediction.baseline_predictors import (
    AdditiveLinearPredictor,
    ControlMeanPredictor,
)
from czb.evaluation.perturbation.prediction.data import (
    PerturbationContext,
    PerturbationData,
    Predictor,
)
from czb.evaluation.perturbation.prediction.splits import split_conditions
from czb.evaluation.perturbation.prediction.task import GeneticPerturbationPrediction
from czb.evaluation.registry import METRICS, get_task
from czb.evaluation.runner import run_task

SEEDS = (0, 1, 2)


def screen_data(**kw) -> PerturbationData:
    adata = planted_perturbations(**kw)
    return PerturbationData(
        counts=adata.X,
        conditions=adata.obs["condition"].astype(str).to_numpy(),
        control_label="ctrl",
        genes=adata.var_names.to_numpy(),
        batches=adata.obs["batch"].astype(str).to_numpy(),
        cell_ids=adata.obs_names.to_numpy(),
    )


@pytest.fixture(scope="module")
def screen():
    """12 singles and 12 pairs of them (50 cells each), 400 controls in 2 batches."""
    return screen_data(n_genes=300, n_targets=12, n_doubles=12, n_control_cells=400,
                       n_cells_per_condition=50, seed=0)


@pytest.fixture(scope="module")
def singles_only():
    return screen_data(n_genes=200, n_targets=10, n_doubles=0, n_control_cells=200,
                       n_cells_per_condition=40, seed=1)


class Oracle:
    """Reads the answers from the full, unmasked screen."""

    name = "oracle"

    def __init__(self, data: PerturbationData):
        self.X = data.log_normalized
        self.conditions = data.conditions

    def predict_expression_shift(self, train, test_conditions, *, seed):
        return condition_means(self.X, self.conditions, list(test_conditions))[1]

    def predict_masked_genes(self, data, cells, masked, *, seed):
        return self.X[cells].toarray()


class Broken:
    """Returns what ``make(expected_shape)`` gives."""

    def __init__(self, make):
        self.name = "broken"
        self.make = make

    def predict_expression_shift(self, train, test_conditions, *, seed):
        return self.make((len(test_conditions), train.n_genes))

    def predict_masked_genes(self, data, cells, masked, *, seed):
        return self.make(masked.shape)


def task(formulation, **params):
    if formulation == "masked_gene":
        params.setdefault("min_cells_matched", 30)
    return get_task("genetic_perturbation_prediction")(formulation=formulation, **params)


def scores(data, predictor, formulation, seeds=SEEDS, **params):
    result = run_task(task(formulation, **params), PerturbationContext(data, predictor), seeds,
                      raise_errors=True)
    assert result.status == "ok", result.error
    return result, {m.name: m for m in result.metrics}


@pytest.fixture(scope="module")
def shift(screen):
    return {p.name: scores(screen, p, "expression_shift")[1]
            for p in (ControlMeanPredictor(), AdditiveLinearPredictor(), Oracle(screen))}


@pytest.fixture(scope="module")
def masked(screen):
    return {p.name: scores(screen, p, "masked_gene")[1]
            for p in (ControlMeanPredictor(), AdditiveLinearPredictor(), Oracle(screen))}


# --------------------------------------------------------------------------- #
# Registration, data
# --------------------------------------------------------------------------- #


def test_registered_with_both_specs():
    from czb.specs.catalog import Catalog

    cls = get_task("genetic_perturbation_prediction")
    assert cls is GeneticPerturbationPrediction
    assert cls.info.kind == "perturbation" and cls.info.requires == ("condition",) and cls.info.stochastic
    assert set(cls.info.metrics) == (set(pm.EXPRESSION_SHIFT_METRICS) | set(ce.CELL_EVAL_METRICS)
                                     | {"spearman_correlation_calculation"})
    assert all(m in METRICS for m in cls.info.metrics)
    catalog = Catalog.load()
    for name, formulation in [("perturbation_expression_shift", "expression_shift"),
                              ("perturbation_masked_gene", "masked_gene")]:
        spec = catalog.task(name)
        assert spec.implementation == "genetic_perturbation_prediction"
        t = cls(**spec.parameters)
        assert t.params.formulation == formulation and t.params.pval_threshold == 1e-4
    with pytest.raises(TaskError, match="bad parameters"):
        cls(formulation="nope")
    with pytest.raises(TaskError, match="test_fraction"):
        cls(test_fraction=1.0)


def test_predictors_follow_the_protocol():
    assert isinstance(ControlMeanPredictor(), Predictor) and isinstance(AdditiveLinearPredictor(), Predictor)
    assert ControlMeanPredictor.name == "control_mean" and AdditiveLinearPredictor.name == "additive_linear"


def test_data_log_normalized_cached_subset_and_hidden(screen):
    X = screen.log_normalized
    assert sp.isspmatrix_csr(X) and X.dtype == np.float32 and screen.log_normalized is X
    np.testing.assert_allclose(X.toarray(), log_normalize(screen.counts).toarray(), rtol=1e-6)
    rows = np.array([5, 3, 700])
    sub = screen.subset(rows)
    assert (sub.log_normalized != X[rows]).nnz == 0 and list(sub.conditions) == list(screen.conditions[rows])
    hidden = sp.csr_matrix((np.ones(2, dtype=bool), ([3, 4], [10, 11])), shape=X.shape)
    masked = screen.hide(hidden)
    assert masked.counts[3, 10] == 0 and masked.counts[4, 11] == 0 and masked.log_normalized[3, 10] == 0
    assert screen.counts[3, 10] != 0 or screen.counts[4, 11] != 0  # the original is untouched
    dense = PerturbationData(screen.counts[:50].toarray(), screen.conditions[:50], "ctrl", screen.genes)
    np.testing.assert_allclose(dense.log_normalized.toarray(), X[:50].toarray())
    with pytest.raises(TaskError, match="conditions has shape"):
        PerturbationData(screen.counts, screen.conditions[:-1], "ctrl", screen.genes)


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #


def test_split_holds_out_pairs_whose_singles_train(screen):
    labels = sorted(set(screen.conditions) - {"ctrl"})
    pairs = [c for c in labels if "+" in c]
    splits = [split_conditions(screen.conditions, "ctrl", test_fraction=0.2, seed=s) for s in range(6)]
    for split in splits:
        assert split.mode == "combo_seen2" and len(split.test) == 2  # round(0.2 * 12)
        assert sorted(split.train + split.test) == labels
        for pair in split.test:
            assert pair in pairs and all(g in split.train for g in pair.split("+"))
    assert len({tuple(s.test) for s in splits}) > 3  # seeds differ ...
    again = split_conditions(screen.conditions, "ctrl", test_fraction=0.2, seed=4)
    assert again.test == splits[4].test  # ... and repeat
    # A pair whose single is missing is never held out; one eligible pair is enough.
    one = split_conditions(["ctrl", "A", "B", "C+D", "A+B"], "ctrl", test_fraction=0.5, seed=0)
    assert (one.test, one.train, one.mode) == (["A+B"], ["A", "B", "C+D"], "combo_seen2")


def test_split_falls_back_to_singles(singles_only):
    split = split_conditions(singles_only.conditions, "ctrl", test_fraction=0.2, seed=0)
    assert split.mode == "single" and len(split.test) == 2 and len(split.train) == 8
    assert split_conditions(["ctrl", "A", "B"], "ctrl", test_fraction=0.9, seed=0).train  # one trains
    with pytest.raises(NotApplicableError, match="at least 2"):
        split_conditions(["ctrl", "A"], "ctrl", test_fraction=0.2, seed=0)


# --------------------------------------------------------------------------- #
# Expression shift
# --------------------------------------------------------------------------- #


def test_expression_shift_additive_beats_control_and_oracle_is_perfect(shift):
    c, a, o = (shift[n] for n in ("control_mean", "additive_linear", "oracle"))
    v = lambda s, name: s[name].value  # noqa: E731
    # Planted pairs are additive: the additive model is near the truth on every metric.
    assert v(a, "mse_top20_de") < 0.05 * v(c, "mse_top20_de")
    assert v(a, "mse_all_genes") < 0.3 * v(c, "mse_all_genes")
    assert v(a, "pearson_delta_top20_de") > 0.9 and v(c, "pearson_delta_top20_de") == 0.0
    assert v(a, "pearson_delta_all_genes") > 0.8 and v(c, "pearson_delta_all_genes") == 0.0
    assert v(a, "jaccard_de_genes") > 0.5 and v(c, "jaccard_de_genes") == 0.0
    assert v(o, "mse_top20_de") == 0.0 and v(o, "mse_all_genes") == 0.0
    assert v(o, "pearson_delta_top20_de") == pytest.approx(1.0)
    assert v(o, "pearson_delta_all_genes") == pytest.approx(1.0) and v(o, "jaccard_de_genes") == 1.0
    params = a["mse_top20_de"].params
    assert params["split"] == "combo_seen2" and params["formulation"] == "expression_shift"
    assert (params["n_train_conditions"], params["n_test_conditions"]) == (22, 2)
    assert all(len(m.values_raw) == len(SEEDS) for m in a.values())


def test_expression_shift_scores_the_baselines_as_cell_eval_does(shift):
    c, a, o = (shift[n] for n in ("control_mean", "additive_linear", "oracle"))
    v = lambda s, name: s[name].value  # noqa: E731
    assert all(set(ce.CELL_EVAL_METRICS) <= set(s) for s in (c, a, o))
    assert v(o, "mae_all_genes") == 0.0 and v(o, "discrimination_score_l1") == 1.0
    assert v(o, "de_direction_match") == 1.0 and v(o, "de_spearman_lfc_sig") == pytest.approx(1.0)
    # "No change": no direction, no ranking; with 2 test conditions, PDS at chance (3/4).
    assert v(c, "de_direction_match") == 0.0 and v(c, "de_spearman_lfc_sig") == 0.0
    assert v(c, "discrimination_score_l1") == 0.75
    assert v(a, "discrimination_score_l1") == 1.0 and v(a, "de_direction_match") > 0.85
    assert v(a, "overlap_at_n") > v(c, "overlap_at_n") + 0.5 and v(a, "mae_all_genes") < v(c, "mae_all_genes")
    assert v(o, "overlap_at_n") > v(a, "overlap_at_n")
    params = a["overlap_at_n"].params
    assert params["n_conditions_with_de"] == 2 and params["n_test_conditions"] == 2


def test_expression_shift_seeds_differ_and_repeat(screen):
    _, first = scores(screen, AdditiveLinearPredictor(), "expression_shift", seeds=(0, 1))
    _, again = scores(screen, AdditiveLinearPredictor(), "expression_shift", seeds=(0, 1))
    for name in pm.EXPRESSION_SHIFT_METRICS:
        raw = first[name].values_raw
        assert raw == again[name].values_raw
    assert first["mse_all_genes"].values_raw[0] != first["mse_all_genes"].values_raw[1]


def test_expression_shift_on_unseen_singles(singles_only):
    _, c = scores(singles_only, ControlMeanPredictor(), "expression_shift", seeds=(0, 1))
    _, a = scores(singles_only, AdditiveLinearPredictor(), "expression_shift", seeds=(0, 1))
    assert a["mse_top20_de"].params["split"] == "single"
    # The linear model predicts a held-out single from its module mates.
    assert a["mse_top20_de"].value < 0.6 * c["mse_top20_de"].value
    assert a["pearson_delta_top20_de"].value > 0.5 and a["jaccard_de_genes"].value > 0.2


def test_unmeasured_targets_are_reported_not_fatal(singles_only):
    genes = singles_only.genes.copy()
    target = sorted(set(singles_only.conditions) - {"ctrl"})[0]
    genes[list(genes).index(target)] = "RENAMED"  # the target is no longer a measured gene
    data = PerturbationData(singles_only.counts, singles_only.conditions, "ctrl", genes,
                            batches=singles_only.batches)
    _, a = scores(data, AdditiveLinearPredictor(), "expression_shift", seeds=(0, 1, 2, 3))
    assert a["mse_all_genes"].params["n_conditions_unmeasured_target"] == 1
    assert np.isfinite(a["mse_all_genes"].value)


# --------------------------------------------------------------------------- #
# Masked genes
# --------------------------------------------------------------------------- #


def test_masked_gene_ranks_oracle_additive_control(masked):
    name = "spearman_correlation_calculation"
    c, a, o = (masked[n][name] for n in ("control_mean", "additive_linear", "oracle"))
    # "No change" has no ranking to offer: Spearman is undefined, reported as 0.
    assert c.values_raw == [0.0] * len(SEEDS)
    # The observed values rank the masked genes' fold changes well, not perfectly: the
    # observed change is a Wilcoxon log2 fold change of expm1 means, the predicted one
    # a log ratio of log-expression means.
    assert o.value > 0.75
    # Additive/linear sees no value of a masked gene in its condition: pairs borrow the
    # singles' visible changes, singles the linear model's; clearly above 0, well below
    # the oracle.
    assert 0.2 < a.value < o.value - 0.2
    assert min(a.values_raw) > 0.1
    params = a.params
    assert params["formulation"] == "masked_gene" and params["n_conditions_scored"] == 24
    assert params["n_conditions_skipped"] == 0 and params["n_conditions_unmatched"] == 0


def test_masked_gene_skips_and_reports(singles_only):
    # Every single has 40 cells: with 50 needed none is matched, so nothing can be scored.
    result = run_task(task("masked_gene", min_cells_matched=50),
                      PerturbationContext(singles_only, Oracle(singles_only)), (0,))
    assert result.status == "not_applicable" and "no condition has at least 5" in result.error
    assert "10 with fewer than 50 cells not matched" in result.error
    # A high bar on the number of masked genes skips some conditions, and says which.
    _, o = scores(singles_only, Oracle(singles_only), "masked_gene", seeds=(0,), min_masked_genes=12)
    params = o["spearman_correlation_calculation"].params
    assert params["n_conditions_skipped"] > 0 and params["n_conditions_scored"] > 0
    assert params["n_conditions_scored"] + params["n_conditions_skipped"] == 10
    assert len(params["skipped_conditions"].split(",")) == params["n_conditions_skipped"]


def test_masked_gene_predictor_sees_only_masked_input(screen):
    seen = {}

    class Spy(Oracle):
        name = "spy"

        def predict_masked_genes(self, data, cells, masked, *, seed):
            seen.update(data=data, cells=cells, masked=masked)
            return super().predict_masked_genes(data, cells, masked, seed=seed)

    scores(screen, Spy(screen), "masked_gene", seeds=(0,))
    data, cells, masked = seen["data"], seen["cells"], seen["masked"]
    assert masked.shape == (len(cells), screen.n_genes) and masked.dtype == bool and masked.any()
    hidden_rows, hidden_genes = np.nonzero(masked)
    assert (np.asarray(data.counts[cells[hidden_rows], hidden_genes]) == 0).all()
    assert (np.asarray(screen.counts[cells[hidden_rows], hidden_genes]) > 0).any()
    # Controls are selected (as matched controls) but never masked.
    is_control = screen.conditions[cells] == "ctrl"
    assert is_control.any() and not masked[is_control].any()


# --------------------------------------------------------------------------- #
# Errors and the runner's entry point
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("formulation", ["expression_shift", "masked_gene"])
@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda shape: np.zeros((shape[0], shape[1] + 1)), "returned shape"),
        (lambda shape: np.full(shape, np.nan), "NaN"),
        (lambda shape: [["a"] * shape[1]] * shape[0], "not a numeric matrix"),
    ],
)
def test_bad_predictor_output_is_a_task_error(singles_only, formulation, make, message):
    with pytest.raises(TaskError, match=f"predictor 'broken'.*{message}"):
        run_task(task(formulation, min_cells_matched=30), PerturbationContext(singles_only, Broken(make)),
                 (0,), raise_errors=True)
    result = run_task(task(formulation, min_cells_matched=30), PerturbationContext(singles_only, Broken(make)), (0,))
    assert result.status == "failed" and "broken" in result.error


def test_missing_control_label_is_a_clear_error(singles_only):
    data = PerturbationData(singles_only.counts, singles_only.conditions, "non-targeting", singles_only.genes)
    result = run_task(task("expression_shift"), PerturbationContext(data, ControlMeanPredictor()), (0,))
    assert result.status == "failed"
    assert "control label 'non-targeting' is not among" in result.error and "'ctrl'" in result.error
    one = singles_only.subset(np.flatnonzero(np.isin(singles_only.conditions, ["ctrl", singles_only.conditions[-1]])))
    result = run_task(task("masked_gene"), PerturbationContext(one, ControlMeanPredictor()), (0,))
    assert result.status == "not_applicable" and "at least 2 non-control conditions" in result.error


def test_runs_through_run_task_and_not_on_embeddings(singles_only):
    from czb.evaluation.context import EvaluationContext

    result = run_task(task("expression_shift"), PerturbationContext(singles_only, AdditiveLinearPredictor()), (0, 1))
    assert result.status == "ok" and result.seeds == [0, 1]
    assert {m.name for m in result.metrics} == set(pm.EXPRESSION_SHIFT_METRICS) | set(ce.CELL_EVAL_METRICS)
    embedding = EvaluationContext(np.zeros((10, 2)), labels=np.array(["a"] * 10))
    result = run_task(task("expression_shift"), embedding, (0,))
    assert result.status == "not_applicable" and "PerturbationContext" in result.error
