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
from czb.evaluation.estimates import Estimate
from czb.evaluation.metrics import bio_floor, scib
from czb.evaluation.metrics import clustering as clu
from czb.evaluation.metrics import mixing as mix
from czb.evaluation.metrics import silhouette as sil
from czb.evaluation.registry import TaskInfo, register_task
from czb.evaluation.task import MetricValue
from czb.evaluation.tasks.batch_integration import (
    INTEGRATION_METRICS,
    BatchIntegrationParams,
    IntegrationTask,
    label_floor,
    scib_batch_values,
    scib_bio_values,
    scib_totals,
)

#: Why pcr_comparison is left out of a cross-species comparison (the pipeline gives none).
NO_SHARED_PRE_INTEGRATION = (
    "no representation of all species' cells before integration: each species' PCA is fitted on its "
    "own dataset's genes")


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
      skipped), ``ilisi_normalized``, ``kbet_per_label`` (types in one species are not
      scored, by its definition), ``pcr_comparison`` (with the pre-integration PCA) and
      ``graph_connectivity`` of the shared cell types;
    * bio conservation on the cells of *shared* cell types (``params.cell_types =
      "shared"``: types with at least ``min_cells_per_species`` cells in two or more
      species): label ``silhouette_score``, ``clisi_normalized`` (neighbourhoods in the
      whole embedding, median over shared-type cells), k-means ``nmi_kmeans`` /
      ``ari_kmeans`` (of the shared-type cells, one cluster per shared type) and Leiden
      (resolution 1.0, 15 neighbours, on the whole embedding) ``adjusted_rand_index`` /
      ``normalized_mutual_info``. Species-specific types cannot be mixed, so they are
      left out of these scores and named in ``params.unshared_labels``;
      ``isolated_labels`` is scib-metrics' with species as batch over all types (the
      isolated ones are those in the fewest species, the species-specific ones if any);
    * ``silhouette_score`` with ``params.cell_types = "within_species"``: the label
      silhouette computed inside each species (all its types), mean over species. Not
      in the total; it tells "species kept apart but each well structured" from
      "structure destroyed";
    * ``scib_bio_conservation`` and ``scib_batch_correction`` (unscaled means of
      scib-metrics' Benchmarker groups, :mod:`czb.evaluation.metrics.aggregate`) and
      ``scib_overall`` = 0.6 bio + 0.4 mixing.

    The weighting keeps noise below a well-integrated embedding, but not necessarily
    below one that leaves the species wholly apart (both fail integration; noise keeps
    its near-perfect mixing scores): compare bio conservation and the within-species
    silhouette, not the total alone.
    """

    info = TaskInfo(
        name="cross_species_integration",
        description="Species mixing (entropy, batch silhouette, iLISI, kBET, graph connectivity, PCR; "
        "species as batch) with bio conservation on species-shared cell types and scIB totals.",
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
                       metrics="bio conservation of shared cell types, and the scIB totals")

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
        shared_params = {
            "cell_types": "shared",
            "n_cell_types": len(shared),
            "unshared_labels": ",".join(unshared),
        }
        shared_key = f"shared cell types, min {p.min_cells_per_species} per species"
        # Seed-independent values: computed once per embedding, repeated for every seed.
        # Memo keys name the species so they never collide with batch-based values.
        mixing: dict[str, Estimate | float] = {
            mix.ENTROPY_PER_CELL.name: context.memo(
                ("entropy_per_cell", p.entropy_neighbors, "species"),
                lambda: mix.entropy_estimate(idx[:, : p.entropy_neighbors], species, n_cells=n),
            ),
            sil.BATCH_SILHOUETTE.name: context.silhouette("silhouette_batch[species]", labels, batches=species),
            mix.ILISI_NORMALIZED.name: context.memo(
                ("ilisi_normalized", p.lisi_neighbors, "species"),
                lambda: mix.ilisi_estimate(idx[:, : p.lisi_neighbors], dist[:, : p.lisi_neighbors], species,
                                           n_cells=n, rows=rows),
            ),
            **scib_batch_values(context, labels, species, key=f"species; {shared_key}", full=rows is None,
                                params=p, connectivity_cells=in_shared),
        }
        bio: dict[str, Estimate | float] = {
            sil.SILHOUETTE_SCORE.name: context.silhouette(f"silhouette_label[{shared_key}]", labels[in_shared],
                                                          cells=in_shared),
            scib.CLISI_NORMALIZED.name: context.memo(
                ("clisi_normalized", p.lisi_neighbors, shared_key),
                lambda: scib.clisi_estimate(idx[:, : p.lisi_neighbors], dist[:, : p.lisi_neighbors], labels,
                                            n_cells=n, rows=rows, cells=in_shared),
            ),
            **scib_bio_values(context, labels, species, key="species", seed=seed, cells=in_shared),
        }
        # A species whose cells hold fewer than 2 labels (or one per cell) has no label silhouette.
        scorable = [s for s in species_names(species) if group_problem(labels[species == s]) is None]
        within = [
            context.silhouette(f"silhouette_label[{s}]", labels[species == s], cells=species == s).value
            for s in scorable
        ]
        clusters = context.leiden(1.0, seed=seed, k=p.n_neighbors)
        bio[clu.ADJUSTED_RAND_INDEX.name] = clu.adjusted_rand_index(labels[in_shared], clusters[in_shared])
        bio[clu.NORMALIZED_MUTUAL_INFO.name] = clu.normalized_mutual_info(labels[in_shared], clusters[in_shared])
        bio[bio_floor.KNN_LABEL_ACCURACY.name] = label_floor(context, labels, key="labels")
        absent = {}
        if context.pre_integration is None:
            absent[scib.PCR_COMPARISON.name] = NO_SHARED_PRE_INTEGRATION
            context.skip_metric(scib.PCR_COMPARISON.name, NO_SHARED_PRE_INTEGRATION)
        # Drops what is not defined, with its reason.
        totals = scib_totals(context, {k: getattr(v, "value", v) for k, v in {**mixing, **bio}.items()},
                             absent=absent)
        skipped = context.notes.get("not_applicable", {})
        of_shared = {scib.GRAPH_CONNECTIVITY.name, *bio} - {scib.ISOLATED_LABELS.name, bio_floor.KNN_LABEL_ACCURACY.name}
        out = []
        for name, v in {**mixing, **bio}.items():
            if name in skipped:
                continue
            params = shared_params if name in of_shared else {}
            out.append(MetricValue.from_estimate(name, v, **params) if isinstance(v, Estimate)
                       else MetricValue(name, v, dict(params)))
        n_species = len(species_names(species))
        if within:
            params = {"cell_types": "within_species"}
            if len(within) < n_species:
                params["n_species_scored"] = len(within)
            out.append(MetricValue(sil.SILHOUETTE_SCORE.name, float(np.mean(within)), params))
        else:
            context.skip_metric(f"{sil.SILHOUETTE_SCORE.name}[within_species]",
                                f"none of the {n_species} species has 2 or more labels (and fewer labels than cells)")
        return [*out, *totals]
