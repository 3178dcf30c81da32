"""scIB-style aggregate scores of batch integration (bio conservation vs batch correction)."""

from __future__ import annotations

import numpy as np

from czb.evaluation.registry import MetricInfo, register_metric

SCIB_BIO_CONSERVATION = register_metric(
    MetricInfo(
        name="scib_bio_conservation",
        description="Mean of silhouette_score, adjusted_rand_index and normalized_mutual_info.",
        reference="doi:10.1038/s41592-021-01336-8",
        stochastic=True,
    )
)
SCIB_BATCH_CORRECTION = register_metric(
    MetricInfo(
        name="scib_batch_correction",
        description="Mean of batch_silhouette and ilisi_normalized.",
        reference="doi:10.1038/s41592-021-01336-8",
    )
)
SCIB_OVERALL = register_metric(
    MetricInfo(
        name="scib_overall",
        description="0.6 x scib_bio_conservation + 0.4 x scib_batch_correction (scIB's weights), "
        "so an embedding cannot win integration by erasing biology.",
        reference="doi:10.1038/s41592-021-01336-8",
        stochastic=True,
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
