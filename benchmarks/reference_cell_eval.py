"""Reference cell-eval 0.8.2 values on a planted screen, for tests/fixtures.

Run in a virtual environment of its own (cell-eval is not a czb dependency)::

    python3 -m venv /tmp/ce-venv && /tmp/ce-venv/bin/pip install cell-eval==0.8.2
    cd benchmarks && /tmp/ce-venv/bin/python reference_cell_eval.py \\
        > ../tests/fixtures/cell_eval_0.8.2_perturbation.json

czb's predictors return one mean profile per condition. cell-eval scores such a
prediction the way its own mean baseline (``cell_eval._baseline.build_base_mean_adata``)
is built: each condition's predicted profile repeated once per observed cell of the
condition, with the observed control cells as the predicted controls. Every metric of
the ``full`` profile that czb reports, or compares with, is recorded per perturbation
(a list in the order of ``conditions``; ``null`` for cell-eval's NaN or missing value);
``clustering_agreement`` and ``pearson_edistance`` (cell-level, cross-perturbation) are
not computed.
The screen and the predictions come from ``cell_eval_cases``, which the test imports
too; the checksums let the test confirm it has the same data.
"""

import json
import math
import sys
import tempfile
from importlib.metadata import version

import anndata as ad
import numpy as np
import pandas as pd
from cell_eval import MetricsEvaluator
from cell_eval_cases import CONTROL, make_predictions, make_screen  # beside this script

SKIPPED = ["clustering_agreement", "pearson_edistance"]
RECORDED = [
    "overlap_at_N", "precision_at_N", "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall",
    "pr_auc", "roc_auc", "mae", "discrimination_score_l1", "discrimination_score_l2",
    "discrimination_score_cosine", "mse", "pearson_delta", "de_nsig_counts_real", "de_nsig_counts_pred",
]


def _value(v):
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else ("inf" if math.isinf(v) else v)


def _anndata(X, labels, genes):
    return ad.AnnData(X=X, obs=pd.DataFrame({"target": labels}, index=[f"c{i}" for i in range(len(labels))]),
                      var=pd.DataFrame(index=genes))


def main():
    X, labels, genes, _ = make_screen()
    conditions = sorted(set(labels) - {CONTROL})
    n_cells = {c: int((labels == c).sum()) for c in conditions}
    real = _anndata(X, labels, genes)
    out = {
        "_source": f"cell-eval {version('cell-eval')} (pdex {version('pdex')}) MetricsEvaluator"
        "(control_pert='non-targeting', pert_col='target').compute(profile='full') on "
        "benchmarks/cell_eval_cases.py; predictions repeated per observed cell, observed controls",
        "skipped_metrics": SKIPPED,
        "checksum_X": float(X.astype(np.float64).sum()),
        "conditions": conditions,
        "predictors": {},
    }
    for name, profiles in make_predictions().items():
        rows = [np.repeat(profiles[i][None, :], n_cells[c], axis=0) for i, c in enumerate(conditions)]
        pred_labels = np.concatenate([[c] * n_cells[c] for c in conditions] + [labels[labels == CONTROL]])
        pred = _anndata(np.vstack(rows + [X[labels == CONTROL]]), pred_labels, genes)
        with tempfile.TemporaryDirectory() as outdir:
            evaluator = MetricsEvaluator(adata_pred=pred, adata_real=real.copy(), control_pert=CONTROL,
                                         pert_col="target", num_threads=1, outdir=outdir)
            results, _ = evaluator.compute(profile="full", skip_metrics=SKIPPED, write_csv=False)
        rows = {row["perturbation"]: row for row in results.iter_rows(named=True)}
        per = {m: [_value(rows[c].get(m)) for c in conditions] for m in RECORDED}
        out["predictors"][name] = {"checksum": float(profiles.astype(np.float64).sum()), "metrics": per}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
