"""Cross-species integration: are species mixed while cell types stay apart?

The task receives one :class:`~czb.evaluation.context.EvaluationContext` holding the
embeddings of several datasets stacked, with the roles ``labels`` (cell types, in one
vocabulary across species) and ``species`` (organism per cell).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from czb.core.errors import NotApplicableError
from czb.evaluation.applicability import group_problem, require_groups
from czb.evaluation.context import EvaluationContext
from czb.evaluation.metrics import clustering as clu
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue
from czb.evaluation.tasks.batch_integration import (
    INTEGRATION_METRICS,
    BatchIntegrationParams,
    IntegrationTask,
    scib_totals,
)


class CrossSpeciesIntegrationParams(BatchIntegrationParams):
    #: A cell type is "shared" when at least two species have this many cells of it.
    min_cells_per_species: int = 10


def species_names(species: np.ndarray) -> list[str]:
    """Distinct species, in order of first appearance (the datasets' stacking order)."""
    return [str(s) for s in pd.unique(np.asarray(species).astype(str))]


def require_species(context: EvaluationContext, task: str) -> np.ndarray:
    """The ``species`` role as strings; :class:`NotApplicableError` unless it names >= 2 species."""
    species = np.asarray(context.require("species")).astype(str)
    names = species_names(species)
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        msg = (
            f"task {task!r} compares species and needs datasets of at least 2 organisms; "
            f"found {found} (add datasets of another organism to the run)"
        )
        raise NotApplicableError(msg)
    return species


def shared_cell_types(labels: np.ndarray, species: np.ndarray, min_cells: int) -> tuple[list[str], list[str]]:
    """Cell types with at least ``min_cells`` cells in two or more species, and all the others.

    Returns
    -------
    ``(shared, unshared)``, both sorted label names.
    """
    counts = pd.crosstab(np.asarray(labels).astype(str), np.asarray(species).astype(str))
    n_species_with_type = (counts >= min_cells).sum(axis=1)
    shared = sorted(counts.index[n_species_with_type >= 2])
    unshared = sorted(counts.index[n_species_with_type < 2])
    return shared, unshared


@register_task
class CrossSpeciesIntegration(IntegrationTask):
    """cz-benchmarks' ``entropy_per_cell`` and ``batch_silhouette`` with species as the batch,
    plus the bio conservation that keeps them honest.

    Mixing alone rewards destroying structure (random noise mixes species perfectly),
    so the result also holds bio conservation and scIB's weighted total
    ``0.6 bio + 0.4 mixing``, as in ``batch_integration``:

    * mixing (species as batch): ``entropy_per_cell`` (k = 200, cz-benchmarks' value;
      reported but, being size-dependent, left out of the total), ``batch_silhouette``
      (cz-benchmarks' value: per cell type over all cells, types seen in one species
      skipped) and ``ilisi_normalized``;
    * bio conservation on the cells of *shared* cell types (``params.cell_types =
      "shared"``: types with at least ``min_cells_per_species`` cells in two or more
      species): label ``silhouette_score`` and Leiden (resolution 1.0, 15 neighbours,
      on the whole embedding) ``adjusted_rand_index`` / ``normalized_mutual_info``.
      Species-specific types cannot be mixed, so they are left out of these scores and
      named in ``params.unshared_labels``;
    * ``silhouette_score`` with ``params.cell_types = "within_species"``: the label
      silhouette computed inside each species (all its types), mean over species. Not
      in the total; it tells "species kept apart but each well structured" from
      "structure destroyed";
    * ``scib_bio_conservation`` (mean of the three shared-type bio scores),
      ``scib_batch_correction`` (mean of ``batch_silhouette`` and ``ilisi_normalized``)
      and ``scib_overall`` = 0.6 bio + 0.4 mixing.

    The weighting keeps noise below a well-integrated embedding, but not necessarily
    below one that leaves the species wholly apart (both fail integration; noise keeps
    its near-perfect mixing scores): compare bio conservation and the within-species
    silhouette, not the total alone.
    """

    info = TaskInfo(
        name="cross_species_integration",
        description="Species mixing (entropy, batch silhouette, iLISI; species as batch) with "
        "bio conservation on species-shared cell types and an scIB total.",
        metrics=INTEGRATION_METRICS,
        requires=("labels", "species"),
        stochastic=True,
        reference="doi:10.1038/s41592-021-01336-8",
        kind="multi_dataset",
    )
    Params = CrossSpeciesIntegrationParams

    def check(self, context: EvaluationContext) -> None:
        super().check(context)
        species = require_species(context, self.info.name)
        labels = np.asarray(context.require("labels")).astype(str)
        shared, _ = self._shared(labels, species)
        require_groups(labels[np.isin(labels, shared)], what="shared cell type", task=self.info.name,
                       metrics="silhouette, ARI and NMI of shared cell types, and the scIB totals")

    def _shared(self, labels: np.ndarray, species: np.ndarray) -> tuple[list[str], list[str]]:
        shared, unshared = shared_cell_types(labels, species, self.params.min_cells_per_species)
        if not shared:
            msg = (
                f"task {self.info.name!r}: no cell type has >= {self.params.min_cells_per_species} cells "
                f"in two species ({', '.join(species_names(species))}), so conservation across species "
                "cannot be measured; are the datasets' labels in one vocabulary (e.g. Cell Ontology)?"
            )
            raise NotApplicableError(msg)
        return shared, unshared

    def run(self, context: EvaluationContext, *, seed: int) -> list[MetricValue]:
        p = self.params
        labels = np.asarray(context.require("labels")).astype(str)
        species = require_species(context, self.info.name)
        shared, unshared = self._shared(labels, species)
        in_shared = np.isin(labels, shared)

        rows, idx, dist = context.cell_neighborhoods(self.neighborhoods_needed(context.n_cells))
        n = context.n_cells
        # Seed-independent values: computed once per embedding, repeated for every seed.
        # Memo keys name the species so they never collide with batch-based values.
        mixing = {
            mix.ENTROPY_PER_CELL.name: context.memo(
                ("entropy_per_cell", p.entropy_neighbors, "species"),
                lambda: mix.entropy_estimate(idx[:, : p.entropy_neighbors], species, n_cells=n),
            ).value,
            sil.BATCH_SILHOUETTE.name: context.silhouette(
                "silhouette_batch[species]", labels, batches=species
            ).value,
            mix.ILISI_NORMALIZED.name: context.memo(
                ("ilisi_normalized", p.lisi_neighbors, "species"),
                lambda: mix.ilisi_estimate(idx[:, : p.lisi_neighbors], dist[:, : p.lisi_neighbors], species,
                                           n_cells=n, rows=rows),
            ).value,
        }
        sil_shared = context.silhouette(
            f"silhouette_label[shared cell types, min {p.min_cells_per_species} per species]",
            labels[in_shared], cells=in_shared,
        ).value
        # A species whose cells hold fewer than 2 labels (or one per cell) has no label silhouette.
        scorable = [s for s in species_names(species) if group_problem(labels[species == s]) is None]
        within = [
            context.silhouette(f"silhouette_label[{s}]", labels[species == s], cells=species == s).value
            for s in scorable
        ]
        clusters = context.leiden(1.0, seed=seed, k=p.n_neighbors)
        ari = clu.adjusted_rand_index(labels[in_shared], clusters[in_shared])
        nmi = clu.normalized_mutual_info(labels[in_shared], clusters[in_shared])
        values = {**mixing, sil.SILHOUETTE_SCORE.name: sil_shared, clu.ADJUSTED_RAND_INDEX.name: ari,
                  clu.NORMALIZED_MUTUAL_INFO.name: nmi}
        totals = scib_totals(context, values)  # drops what is not defined, with its reason
        shared_params = {
            "cell_types": "shared",
            "n_cell_types": len(shared),
            "unshared_labels": ",".join(unshared),
        }
        out = [MetricValue(name, value) for name, value in values.items() if name in mixing]
        out += [MetricValue(name, values[name], shared_params) for name in
                (sil.SILHOUETTE_SCORE.name, clu.ADJUSTED_RAND_INDEX.name, clu.NORMALIZED_MUTUAL_INFO.name)
                if name in values]
        n_species = len(species_names(species))
        if within:
            params = {"cell_types": "within_species"}
            if len(within) < n_species:
                params["n_species_scored"] = len(within)
            out.append(MetricValue(sil.SILHOUETTE_SCORE.name, float(np.mean(within)), params))
        else:
            context.skip_metric(f"{sil.SILHOUETTE_SCORE.name}[within_species]",
                                f"none of the {n_species} species has 2 or more labels (and fewer labels than cells)")
        return [*out, *(MetricValue(name, value) for name, value in totals.items())]
