"""scIB-style aggregate scores of batch integration (bio conservation vs batch correction).

The groups are scib-metrics' Benchmarker defaults, with ``batch_silhouette`` where the
Benchmarker of scib-metrics 0.5.10 has BRAS: bio conservation = label silhouette,
isolated labels, cLISI and k-means NMI/ARI (the Benchmarker's Leiden NMI/ARI is off by
default); batch correction = batch silhouette, iLISI, kBET, graph connectivity and PCR
comparison. Each task reports the raw (unscaled) group means; the Benchmarker's
headline numbers min-max scale every metric across the embeddings compared first,
which only a comparison of models can do: :func:`scaled_scib_totals`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from czb.evaluation.metrics import kbet, scib
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import MetricInfo, register_metric

#: Bio-conservation group (scib-metrics' Benchmarker defaults).
BIO_METRICS = (
    sil.SILHOUETTE_SCORE.name, scib.ISOLATED_LABELS.name, scib.CLISI_NORMALIZED.name,
    scib.NMI_KMEANS.name, scib.ARI_KMEANS.name,
)
#: Batch-correction group (the Benchmarker's, ``batch_silhouette`` for its BRAS).
BATCH_METRICS = (
    sil.BATCH_SILHOUETTE.name, mix.ILISI_NORMALIZED.name, kbet.KBET_PER_LABEL.name,
    scib.GRAPH_CONNECTIVITY.name, scib.PCR_COMPARISON.name,
)

SCIB_BIO_CONSERVATION = register_metric(
    MetricInfo(
        name="scib_bio_conservation",
        description="Unscaled mean of " + ", ".join(BIO_METRICS) + " (scib-metrics' Benchmarker "
        "bio-conservation group on raw values; its headline numbers are min-max scaled across the "
        "models compared).",
        reference="doi:10.1038/s41592-021-01336-8",
        stochastic=True,
        aggregate=True,
    )
)
SCIB_BATCH_CORRECTION = register_metric(
    MetricInfo(
        name="scib_batch_correction",
        description="Unscaled mean of " + ", ".join(BATCH_METRICS) + " (scib-metrics' Benchmarker "
        "batch-correction group on raw values; pcr_comparison only where the pre-integration PCA "
        "is given, else params name it as left out).",
        reference="doi:10.1038/s41592-021-01336-8",
        aggregate=True,
    )
)
SCIB_OVERALL = register_metric(
    MetricInfo(
        name="scib_overall",
        description="0.6 x scib_bio_conservation + 0.4 x scib_batch_correction (scIB's weights) on "
        "unscaled metric values. It does not stop noise from winning (a random embedding can score "
        "above one that keeps the biology): read it beside the random baseline's and knn_label_accuracy.",
        reference="doi:10.1038/s41592-021-01336-8",
        stochastic=True,
        aggregate=True,
    )
)

#: scIB's weights of the two aggregate groups.
BIO_WEIGHT, BATCH_WEIGHT = 0.6, 0.4


def scib_scores(bio: list[float], batch: list[float]) -> dict[str, float]:
    """Group means and their weighted total, on raw (unscaled) metric values in [0, 1]."""
    bio_score = float(np.mean(bio))
    batch_score = float(np.mean(batch))
    return {
        SCIB_BIO_CONSERVATION.name: bio_score,
        SCIB_BATCH_CORRECTION.name: batch_score,
        SCIB_OVERALL.name: BIO_WEIGHT * bio_score + BATCH_WEIGHT * batch_score,
    }


def scaled_scib_totals(
    per_model: Mapping[str, Mapping[str, float]],
    *,
    bio: Sequence[str] = BIO_METRICS,
    batch: Sequence[str] = BATCH_METRICS,
) -> dict[str, dict[str, float]]:
    """scib-metrics' Benchmarker totals (``get_results(min_max_scale=True)``) of several
    models scored on one dataset.

    Every metric of the two groups is min-max scaled across the models (a metric equal
    for all of them scales to 0, as scikit-learn's ``MinMaxScaler`` does); each model's
    group score is the mean of its scaled metrics, skipping those it lacks or that are
    NaN (NaN when it has none), and the total is ``0.6 bio + 0.4 batch``. Scaled totals
    rank the models compared and change with that set: they are not comparable across
    comparisons, the raw task totals are.

    Parameters
    ----------
    per_model
        Model name → metric name → raw value (mean over seeds), for one dataset. Metrics
        outside the groups are ignored.
    bio, batch
        The groups' metric names.

    Returns
    -------
    Model name → ``{"scib_bio_conservation", "scib_batch_correction", "scib_overall"}``
    scaled scores.
    """
    models = list(per_model)
    scaled: dict[str, dict[str, float]] = {m: {} for m in models}
    for name in (*bio, *batch):
        values = np.array([per_model[m].get(name, np.nan) for m in models], dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.any():
            continue
        low, span = values[finite].min(), np.ptp(values[finite])
        if span < 10 * np.finfo(np.float64).eps:  # MinMaxScaler's constant-feature rule
            span = 1.0
        for model, value, ok in zip(models, values, finite):
            if ok:
                scaled[model][name] = float((value - low) / span)

    def group_mean(values: dict[str, float], names: Sequence[str]) -> float:
        present = [values[n] for n in names if n in values]
        return float(np.mean(present)) if present else float("nan")

    out = {}
    for model in models:
        bio_score, batch_score = group_mean(scaled[model], bio), group_mean(scaled[model], batch)
        out[model] = {
            SCIB_BIO_CONSERVATION.name: bio_score,
            SCIB_BATCH_CORRECTION.name: batch_score,
            SCIB_OVERALL.name: BIO_WEIGHT * bio_score + BATCH_WEIGHT * batch_score,
        }
    return out
