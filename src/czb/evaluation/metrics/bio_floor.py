"""The bio-conservation floor: can a cell's label still be told from its neighbours?

scIB's totals average unscaled metrics, so an embedding that keeps no biology can
outscore one that does (a random embedding mixes batches perfectly). The floor is
checked on its own: leave-one-out k-nearest-neighbour label accuracy on the shared
graph, against its chance level, the share of the most frequent label (what always
guessing that label scores; a random embedding's neighbours vote about that well). An
embedding is *near chance* when its chance-corrected accuracy
``(accuracy - chance) / (1 - chance)`` is below :data:`NEAR_CHANCE` = 0.2, the upper
end of "slight" agreement in Landis & Koch's reading of kappa (doi:10.2307/2529310):
it recovers less than a fifth of what the labels hold beyond guessing. The report marks
such an embedding beside its aggregates, whatever their value.

A task records the floor as the metric ``knn_label_accuracy`` and, for the report, in
its result's ``computation`` under :data:`NOTE_KEY` (:meth:`BioFloor.describe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from czb.evaluation.estimates import Estimate, mean_estimate
from czb.evaluation.registry import MetricInfo, register_metric

#: Neighbours per cell the floor reads from the shared graph, the cell itself included
#: (so 14 others vote): the 15-neighbour graph integration tasks build for Leiden anyway.
GRAPH_K = 15
#: Chance-corrected accuracy below which an embedding is near chance.
NEAR_CHANCE = 0.2
#: Key of the floor in a result's ``computation``.
NOTE_KEY = "bio_floor"
#: Most rows, and most row × label counts, per block of the vote.
_BLOCK_ROWS, _BLOCK_COUNTS = 65_536, 1 << 22

KNN_LABEL_ACCURACY = register_metric(
    MetricInfo(
        name="knn_label_accuracy",
        description="Share of cells whose label is the most common label among their 14 nearest other "
        "cells (ties to the label of the nearest tied cell): leave-one-out kNN label accuracy, the "
        "bio-conservation floor beside scIB's totals.",
        reference="doi:10.1109/TIT.1967.1053964",
        per_cell_mean=True,
    )
)


def near_chance(accuracy: float, chance: float) -> bool:
    """Whether ``accuracy`` is near ``chance``: chance-corrected below :data:`NEAR_CHANCE`
    (always, when chance is 1: one label, nothing to recover)."""
    if chance >= 1.0:
        return True
    return (accuracy - chance) / (1.0 - chance) < NEAR_CHANCE


@dataclass(frozen=True)
class BioFloor:
    """Leave-one-out kNN label accuracy and its chance level.

    Attributes
    ----------
    accuracy
        Mean over cells of whether the neighbours' vote gives the cell's label, with its
        bootstrap CI over cells (or donors).
    chance
        Share of the most frequent label.
    k
        Neighbours that voted (the cell itself excluded).
    """

    accuracy: Estimate
    chance: float
    k: int

    @property
    def near_chance(self) -> bool:
        return near_chance(self.accuracy.value, self.chance)

    def describe(self) -> dict[str, Any]:
        """The floor for a result's ``computation[NOTE_KEY]`` (read by the report)."""
        return {"metric": KNN_LABEL_ACCURACY.name, "accuracy": self.accuracy.value, "chance": self.chance,
                "k": self.k, "near_chance": self.near_chance,
                "rule": f"near chance when (accuracy - chance) / (1 - chance) < {NEAR_CHANCE}; "
                        "chance = share of the most frequent label"}


def floor_from_note(note: Any) -> tuple[float, float] | None:
    """``(accuracy, chance)`` from a result's ``computation[NOTE_KEY]`` (untrusted: a
    note that is not two numbers in [0, 1] gives ``None``)."""
    if not isinstance(note, dict):
        return None
    values = (note.get("accuracy"), note.get("chance"))
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
               for v in values):
        return None
    return float(values[0]), float(values[1])


def knn_votes(knn_indices: np.ndarray, codes: np.ndarray, n_labels: int) -> np.ndarray:
    """Per row of ``knn_indices`` (neighbours nearest first, the cell itself left out),
    the label code most common among them; ties go to the tied label whose first cell
    comes nearest."""
    n, k = knn_indices.shape
    out = np.empty(n, dtype=np.int64)
    block = max(1, min(_BLOCK_ROWS, _BLOCK_COUNTS // max(n_labels, 1)))
    for start in range(0, n, block):
        voters = codes[knn_indices[start : start + block]]
        rows = len(voters)
        flat = (np.arange(rows)[:, None] * n_labels + voters).ravel()
        counts = np.bincount(flat, minlength=rows * n_labels).reshape(rows, n_labels)
        top = counts.max(axis=1)
        tied = np.take_along_axis(counts, voters, axis=1) == top[:, None]
        out[start : start + rows] = voters[np.arange(rows), tied.argmax(axis=1)]
    return out


def knn_label_floor(
    knn_indices: np.ndarray, labels: np.ndarray, *, clusters: np.ndarray | None = None, seed: int = 0,
) -> BioFloor:
    """The floor of an embedding from its neighbour graph.

    Parameters
    ----------
    knn_indices
        ``(n_cells, k)`` neighbours of every cell, nearest first, the cell itself in
        column 0 (:class:`~czb.evaluation.neighbors.NeighborGraph`); columns ``1..k-1``
        vote, so pass ``graph.knn(GRAPH_K)[0]``.
    labels
        ``(n_cells,)`` labels, none missing.
    clusters
        ``(n_cells,)`` donor of each cell: the accuracy's bootstrap CI is over donors.
    seed
        Seed of the bootstrap.
    """
    codes, uniques = pd.factorize(np.asarray(labels))
    others = np.asarray(knn_indices)[:, 1:]
    if others.shape[1] == 0:
        msg = "the floor needs each cell's neighbours besides itself; the graph has none"
        raise ValueError(msg)
    predicted = knn_votes(others, codes, len(uniques))
    correct = (predicted == codes).astype(np.float64)
    chance = float(np.bincount(codes).max() / len(codes))
    return BioFloor(mean_estimate(correct, clusters=clusters, seed=seed), chance, others.shape[1])
