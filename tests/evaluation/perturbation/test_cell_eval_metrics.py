"""The Virtual Cell Challenge metrics (cell-eval): equal to cell-eval 0.8.2 on a planted
screen, each piece against scipy/sklearn or a hand-checked case, and planted truths.

The reference values (tests/fixtures/cell_eval_0.8.2_perturbation.json) were computed
by cell-eval 0.8.2 with pdex 0.3.0 (benchmarks/reference_cell_eval.py, run in a venv of
its own: cell-eval is not a czb dependency) on benchmarks/cell_eval_cases.py.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from czb.evaluation.perturbation.expression import condition_means
from czb.evaluation.perturbation.prediction import cell_eval_metrics as ce
from czb.evaluation.perturbation.prediction import metrics as pm
from czb.evaluation.registry import METRICS, load_all

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "cell_eval_0.8.2_perturbation.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
from cell_eval_cases import CONTROL, make_predictions, make_screen  # noqa: E402 - the reference's screen

#: czb name -> cell-eval name
CELL_EVAL_NAME = {
    "overlap_at_n": "overlap_at_N", "precision_at_n": "precision_at_N", "de_pr_auc": "pr_auc",
    "de_roc_auc": "roc_auc", "mae_all_genes": "mae",
}
#: Metrics of a prediction that changes nothing, which cell-eval computes from the
#: float32 rounding of the control mean (|log2FC| ~1e-7): czb counts no change there.
ROUNDING_NOISE = {"overlap_at_n", "de_direction_match", "de_spearman_lfc_sig"}


@pytest.fixture(scope="module")
def planted():
    """The reference screen with czb's inputs to :func:`ce.cell_eval_scores`, and the reference."""
    ref = json.loads(FIXTURE.read_text())
    X, labels, genes, _ = make_screen()
    assert X.astype(np.float64).sum() == pytest.approx(ref["checksum_X"], rel=1e-12)
    conditions = ref["conditions"]
    _, means = condition_means(X, labels, [CONTROL, *conditions])
    real_lfc, real_fdr = ce.observed_de(X, labels, control=CONTROL, groups=conditions)
    inputs = dict(
        observed=means[1:], control=means[0], conditions=conditions, genes=genes,
        n_cells=np.array([(labels == c).sum() for c in conditions]),
        controls=ce.ControlCells.of(X[labels == CONTROL]), real_lfc=real_lfc, real_fdr=real_fdr,
        control_label=CONTROL,
    )
    predictions = make_predictions()
    for name, profiles in predictions.items():
        assert profiles.astype(np.float64).sum() == pytest.approx(ref["predictors"][name]["checksum"], rel=1e-12)
    scored = {name: ce.cell_eval_scores(p, **inputs) for name, p in predictions.items()}
    return ref, inputs, predictions, scored


def test_registered_with_metadata():
    load_all()
    for name in ce.CELL_EVAL_METRICS:
        info = METRICS[name]
        assert info.reference and info.description and not info.stochastic
    for name in ("overlap_at_n", "discrimination_score_l1", "mae_all_genes"):
        assert METRICS[name].reference == "doi:10.1016/j.cell.2025.06.008"  # the VCC's three
    assert not METRICS["mae_all_genes"].higher_is_better and METRICS["mae_all_genes"].range == (0.0, None)
    assert METRICS["de_spearman_lfc_sig"].range == (-1.0, 1.0)
    assert all(METRICS[n].higher_is_better for n in ce.CELL_EVAL_METRICS if n != "mae_all_genes")


# --------------------------------------------------------------------------- #
# Equal to cell-eval 0.8.2
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("predictor", ["replicate", "noisy", "shuffled", "control_mean"])
@pytest.mark.parametrize("metric", ce.CELL_EVAL_METRICS)
def test_equals_cell_eval_per_condition(planted, predictor, metric):
    ref, _, _, scored = planted
    ours = scored[predictor][metric].to_numpy()
    theirs = np.array(ref["predictors"][predictor]["metrics"][CELL_EVAL_NAME.get(metric, metric)], dtype=float)
    if predictor == "control_mean" and metric in ROUNDING_NOISE:
        # No change has no direction and no ranking: sign 0, Spearman undefined (0),
        # DE genes in gene order; cell-eval's values here come from rounding noise.
        if metric != "overlap_at_n":
            assert (ours == 0.0).all()
        return
    # float32 pseudobulks in cell-eval: MAE agrees to ~1e-7; the rest are ranks and counts
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 if metric == "mae_all_genes" else 1e-12)


def test_de_counts_and_existing_metrics_equal_cell_eval(planted):
    ref, inputs, predictions, _ = planted
    for name, p in predictions.items():
        m = ref["predictors"][name]["metrics"]
        assert ((inputs["real_fdr"] < 0.05).sum(axis=1) == m["de_nsig_counts_real"]).all()
        _, fdr = ce.repeated_profile_de(p, inputs["n_cells"], inputs["controls"], inputs["control"])
        assert ((fdr < 0.05).sum(axis=1) == m["de_nsig_counts_pred"]).all()
        rows = np.arange(len(inputs["conditions"]))[:, None]
        gears = pm.expression_shift_scores(p, inputs["observed"], inputs["control"], rows)
        np.testing.assert_allclose(gears["mse_all_genes"], m["mse"], atol=1e-6)
        expected = np.array(m["pearson_delta"], dtype=float)  # NaN: no change, czb's 0
        np.testing.assert_allclose(gears["pearson_delta_all_genes"], np.nan_to_num(expected), atol=1e-6)


# --------------------------------------------------------------------------- #
# The pieces
# --------------------------------------------------------------------------- #


def test_observed_de_is_mannwhitneyu_with_continuity_and_bh():
    rng = np.random.default_rng(0)
    n1, n2, n_genes = 17, 29, 30
    X = rng.integers(0, 4, size=(n1 + n2, n_genes)).astype(float) * 0.7
    X[rng.uniform(size=X.shape) < 0.5] = 0.0
    X[:, 0] = 0.0  # zero in both groups: log2FC 0, p 1
    X[:n1, 1], X[n1:, 1] = 0.0, 1.0  # zero in the condition only: -inf
    labels = np.array(["a"] * n1 + ["c"] * n2)
    lfc, fdr = ce.observed_de(X, labels, control="c", groups=["a"])
    p = np.array([stats.mannwhitneyu(X[:n1, j], X[n1:, j], use_continuity=True, method="asymptotic").pvalue
                  for j in range(n_genes)])
    p[0] = 1.0  # scipy: NaN when every value ties; pdex: 1
    np.testing.assert_allclose(fdr[0], stats.false_discovery_control(p), rtol=1e-10)
    with np.errstate(invalid="ignore", divide="ignore"):
        fold = np.log2(np.expm1(X[:n1].mean(axis=0)) / np.expm1(X[n1:].mean(axis=0)))
    assert lfc[0, 0] == 0.0 and lfc[0, 1] == -np.inf
    np.testing.assert_allclose(lfc[0, 2:], fold[2:], rtol=1e-12)


def test_repeated_profile_de_equals_testing_the_repeated_cells():
    """The closed form equals pdex's test run on the profile repeated as cells, with values
    that tie control values, zeros and a negative one."""
    rng = np.random.default_rng(1)
    n_ctrl, n_genes = 40, 12
    C = np.round(rng.exponential(1.0, size=(n_ctrl, n_genes)), 1)
    C[rng.uniform(size=C.shape) < 0.4] = 0.0
    P = np.round(rng.exponential(1.0, size=(3, n_genes)), 1)
    P[0, :4] = C[0, :4]  # ties with a control value
    P[1, 4:6] = 0.0  # ties with the zeros
    P[2, 6] = -0.3
    n_cells = np.array([5, 1, 23])
    control = C.mean(axis=0)
    lfc, fdr = ce.repeated_profile_de(P, n_cells, ce.ControlCells.of(C), control)
    for i in range(3):
        X = np.vstack([np.repeat(P[i][None], n_cells[i], axis=0), C])
        labels = np.array(["a"] * n_cells[i] + ["c"] * n_ctrl)
        p = np.array([stats.mannwhitneyu(X[labels == "a", j], C[:, j], use_continuity=True,
                                         method="asymptotic").pvalue for j in range(n_genes)])
        p[np.isnan(p)] = 1.0
        np.testing.assert_allclose(fdr[i], stats.false_discovery_control(p), rtol=1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        fold = np.log2(np.expm1(P) / np.expm1(control))
    np.testing.assert_allclose(lfc, np.where(np.isnan(fold), 0.0, fold), rtol=1e-12)
    assert lfc[2, 6] == 0.0  # negative mean: pdex's NaN -> 0


def test_de_agreement_hand_checked():
    real_lfc = np.array([2.0, -3.0, -2.0, 0.1, np.inf, 1.0])
    real_fdr = np.array([0.01, 0.01, 0.04, 0.5, 0.001, 0.06])
    pred_lfc = np.array([2.0, 0.5, -1.0, -1.5, 0.0, 4.0])
    pred_fdr = np.array([0.01, 0.02, 0.3, 0.01, 0.9, 1e-12])
    out = ce.de_agreement(real_lfc, real_fdr, pred_lfc, pred_fdr)
    # R (by |log2FC|; inf first, 0 before 2 in gene order) = [4, 1, 0, 2]; P = [5, 0, 3, 1]
    assert out["overlap_at_n"] == pytest.approx(2 / 4)  # P[:4] holds 0 and 1
    assert out["precision_at_n"] == pytest.approx(2 / 4)  # R[:4] holds 0 and 1
    assert out["de_sig_genes_recall"] == pytest.approx(2 / 4)
    # signs over R: gene 4 (+ vs 0) no, 1 (- vs +) no, 0 yes, 2 yes
    assert out["de_direction_match"] == pytest.approx(2 / 4)
    r = stats.spearmanr(real_lfc[[4, 1, 0, 2]], pred_lfc[[4, 1, 0, 2]]).statistic
    assert out["de_spearman_lfc_sig"] == pytest.approx(r)
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels, score = real_fdr < 0.05, -np.log10(np.clip(pred_fdr, 1e-10, 1))
    assert out["de_pr_auc"] == pytest.approx(average_precision_score(labels, score))
    assert out["de_roc_auc"] == pytest.approx(roc_auc_score(labels, score))
    # Only 2 of 4 observed DE genes fit a budget of 2 predicted ones: precision counts R[:2].
    few = ce.de_agreement(real_lfc, real_fdr, pred_lfc, np.where(np.arange(6) < 2, 0.01, 0.9))
    assert few["precision_at_n"] == pytest.approx(1 / 2) and few["overlap_at_n"] == pytest.approx(2 / 4)
    # No observed DE gene: overlap 0, the rest undefined
    none = ce.de_agreement(real_lfc, np.ones(6), pred_lfc, pred_fdr)
    assert none["overlap_at_n"] == 0.0 and np.isnan(none["de_direction_match"]) and np.isnan(none["de_roc_auc"])


def test_auc_equals_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(2)
    labels = rng.uniform(size=300) < 0.2
    scores = np.round(rng.normal(size=300) + labels, 1)  # many ties
    ap, roc = ce._auc(labels, scores)
    assert ap == pytest.approx(average_precision_score(labels, scores), rel=1e-12)
    assert roc == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)


def test_discrimination_hand_checked():
    observed = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    names = ["A", "B", "C"]
    none = [np.array([], dtype=int)] * 3
    for distance in ("l1", "l2", "cosine"):
        assert (ce.discrimination_scores(observed, observed, names, none, distance=distance) == 1.0).all()
    # Every prediction is C's change: A ranks C, then itself (1 - 1/3)...
    pred = np.tile(observed[2], (3, 1))
    np.testing.assert_allclose(ce.discrimination_scores(pred, observed, names, none), [2 / 3, 1 / 3, 1.0])
    # Target genes left out: Y's change is only at its target (column 0), so without it
    # Y ties X, which comes first in label order.
    two = np.array([[1.0, 0.0, 0.5], [0.0, 0.0, 0.5]])
    targets = [np.array([0]), np.array([1])]
    np.testing.assert_allclose(ce.discrimination_scores(two, two, ["Y", "X"], none[:2]), [1.0, 1.0])
    np.testing.assert_allclose(ce.discrimination_scores(two, two, ["Y", "X"], targets), [0.5, 1.0])
    # A zero prediction is at cosine distance 1 from everything: ties in label order
    zero = np.zeros((3, 3))
    np.testing.assert_allclose(ce.discrimination_scores(zero, observed, ["C", "A", "B"], none, distance="cosine"),
                               [1 / 3, 1.0, 2 / 3])
    # In the scores every target gene of a label is left out ("X+Y": X and Y; "C+ctrl": C):
    # X+Y's change is only at its targets, so it ties C+ctrl, which sorts first.
    genes = np.array(["X", "Y", "C", "D"])
    profiles = np.array([[2.0, 2.0, 1.0, 1.5], [1.0, 1.0, 1.0, 1.5]])
    frame = ce.cell_eval_scores(
        profiles, profiles, np.ones(4), conditions=["X+Y", "C+ctrl"], genes=genes, n_cells=np.array([3, 3]),
        controls=ce.ControlCells.of(np.ones((5, 4))), real_lfc=np.zeros((2, 4)), real_fdr=np.ones((2, 4)),
    )
    np.testing.assert_allclose(frame["discrimination_score_l1"], [0.5, 1.0])
    with pytest.raises(ValueError, match="unknown distance"):
        ce.discrimination_scores(zero, observed, names, none, distance="l3")


# --------------------------------------------------------------------------- #
# Planted truths
# --------------------------------------------------------------------------- #


def test_perfect_control_and_shuffled_predictions(planted):
    _, inputs, predictions, scored = planted
    perfect = ce.summarize_cell_eval(ce.cell_eval_scores(inputs["observed"], **inputs))
    assert perfect["mae_all_genes"] == 0.0
    for name in ("discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
                 "de_direction_match", "de_spearman_lfc_sig"):
        assert perfect[name] == pytest.approx(1.0), name
    # A mean profile repeated as cells is not the cells: its DE is close, not equal.
    assert 0.7 < perfect["overlap_at_n"] < 1.0 and perfect["de_sig_genes_recall"] > 0.9
    good, control, shuffled = (ce.summarize_cell_eval(scored[n]) for n in ("replicate", "control_mean", "shuffled"))
    n = len(inputs["conditions"])
    # "No change": its distance to a condition's change is that change's size, so the
    # ranks are a permutation over conditions: chance, (n + 1) / (2n), for L1.
    assert control["discrimination_score_l1"] == pytest.approx((n + 1) / (2 * n), abs=1.5 / n)
    assert control["de_direction_match"] == 0.0 and control["de_sig_genes_recall"] < good["de_sig_genes_recall"]
    for name in ("overlap_at_n", "discrimination_score_l1", "de_direction_match", "de_spearman_lfc_sig"):
        assert good[name] > shuffled[name] + 0.2 and good[name] > control[name] + 0.2, name
    assert good["mae_all_genes"] < shuffled["mae_all_genes"]


def test_shapes_are_checked(planted):
    _, inputs, _, _ = planted
    with pytest.raises(ValueError, match="shapes differ"):
        ce.cell_eval_scores(inputs["observed"][:, :5], **inputs)
