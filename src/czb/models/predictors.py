"""Perturbation predictors: what perturbation tasks score instead of embeddings.

A model whose spec says ``output: predictions`` predicts expression after genetic
perturbations (see :mod:`czb.evaluation.perturbation.prediction.task` for the
two formulations and the :class:`~czb.evaluation.perturbation.prediction.data.Predictor`
protocol). The in-process baselines (``control_mean``, ``additive_linear``) are scored
beside every such model, as PCA is beside every embedding.

This module turns specs into predictors and datasets into the task's
:class:`~czb.evaluation.perturbation.prediction.data.PerturbationData`.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from czb.core.errors import DatasetError, DatasetWarning, SpecError
from czb.specs.parameters import resolve_parameters

if TYPE_CHECKING:
    from czb.data.dataset import Dataset
    from czb.specs.schema import ModelSpec

#: The role that holds each cell's perturbation condition.
CONDITION_ROLE = "condition"
#: Predictors added to every perturbation comparison (unless ``--no-baseline``).
BASELINE_PREDICTORS = ("control_mean", "additive_linear")


class InProcessPredictor:
    """A baseline predictor computed here, with the ``describe`` every source has."""

    kind = "in-process"
    produces = "predictions"

    def __init__(self, spec: ModelSpec, implementation: Any):
        self.spec = spec
        self.name = spec.name
        self.implementation = implementation

    def bind(self, dataset: Dataset) -> None:
        """Nothing to check: the baselines take any perturbation dataset (docker
        predictors check organism and input here)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image": "in-process",
            "implementation": self.spec.implementation,
            "parameters": resolve_parameters(self.spec),
        }

    def predict_expression_shift(self, train: Any, test_conditions: Any, *, seed: int) -> np.ndarray:
        return self.implementation.predict_expression_shift(train, test_conditions, seed=seed)

    def predict_masked_genes(self, data: Any, cells: np.ndarray, masked: np.ndarray, *, seed: int) -> np.ndarray:
        return self.implementation.predict_masked_genes(data, cells, masked, seed=seed)

    def __repr__(self) -> str:
        return f"InProcessPredictor({self.name!r})"


def predictor_for_model(spec: ModelSpec, options: Any = None) -> Any:
    """The predictor a ``output: predictions`` model spec names: an in-process baseline,
    or a docker model (:class:`czb.models.docker.source.DockerModelSource`, which runs its
    image under the contract's perturbation requests).

    Raises
    ------
    SpecError
        Unknown baseline implementation, or parameters given to a baseline that takes none.
    """
    from czb.evaluation.perturbation.prediction.baseline_predictors import PREDICTORS

    if spec.kind == "docker":
        from czb.models.docker.source import DockerModelSource

        return DockerModelSource(spec, options)
    if spec.implementation not in PREDICTORS:
        msg = (
            f"model {spec.name!r}: unknown predictor implementation {spec.implementation!r}; "
            f"known: {', '.join(sorted(PREDICTORS))}"
        )
        raise SpecError(msg)
    if spec.parameters:
        msg = f"model {spec.name!r}: predictor {spec.implementation!r} takes no parameters"
        raise SpecError(msg)
    return InProcessPredictor(spec, PREDICTORS[spec.implementation]())


def perturbation_data(ds: Dataset) -> Any:
    """A dataset as perturbation tasks read it: raw counts, conditions, gene symbols.

    Genes are named by symbol (conditions name their target genes by symbol); datasets
    keyed by Ensembl ID need a symbol column (see :mod:`czb.data.genes`). The counts
    are in memory (a matrix on disk is read once, in row chunks).

    Raises
    ------
    DatasetError
        No ``condition`` role, no ``control_label``, the control label absent from the
        conditions, or expression that is not raw counts.
    """
    from czb.data.genes import model_genes
    from czb.data.matrix import BackedMatrix, iter_row_chunks
    from czb.evaluation.perturbation.prediction.data import PerturbationData

    spec = ds.spec
    if CONDITION_ROLE not in spec.extra_keys:
        msg = (
            f"dataset {ds.name!r}: perturbation tasks need the condition of each cell; map it "
            f"with extra_keys: {{{CONDITION_ROLE}: <obs column>}}"
        )
        raise DatasetError(msg)
    if spec.control_label is None:
        msg = f"dataset {ds.name!r}: perturbation tasks need control_label (the condition of control cells)"
        raise DatasetError(msg)
    if spec.expression != "raw_counts":
        msg = f"dataset {ds.name!r}: perturbation tasks read raw counts; the spec declares {spec.expression}"
        raise DatasetError(msg)
    from czb.core.missing import missing_mask

    raw_conditions = ds.role(CONDITION_ROLE)
    # A cell without a condition (or a batch, for control matching) is no perturbation.
    known = ~missing_mask(raw_conditions)
    if ds.batches is not None:
        known &= np.array([b is not None for b in ds.batches])
    if not known.all():
        warnings.warn(
            f"dataset {ds.name!r}: {int((~known).sum())} of {ds.n_cells} cells have no condition or no "
            "batch; perturbation tasks leave them out",
            DatasetWarning,
            stacklevel=2,
        )
    rows = np.flatnonzero(known)
    conditions = np.asarray(raw_conditions).astype(str)[rows]
    if not np.any(conditions == spec.control_label):
        shown = ", ".join(sorted(set(conditions))[:5])
        msg = (
            f"dataset {ds.name!r}: no cell has condition {spec.control_label!r} (control_label); "
            f"conditions include {shown}"
        )
        raise DatasetError(msg)
    genes = model_genes(ds, "symbol")
    counts = ds.adata.X
    keep = genes.keep if len(genes.keep) != ds.n_genes else None
    if isinstance(counts, BackedMatrix):
        # The tasks hold the counts in memory; read them once, chunk by chunk, keeping
        # only the symbol-mapped genes.
        import scipy.sparse as sp

        parts = [b if keep is None else b[:, keep] for _, b in iter_row_chunks(counts)]
        counts = sp.vstack(parts, format="csr")
    elif keep is not None:
        counts = counts[:, keep]
    if len(rows) < ds.n_cells:
        counts = counts[rows]
    return PerturbationData(
        counts=counts,
        conditions=conditions.astype(object),
        control_label=spec.control_label,
        genes=np.asarray(genes.ids, dtype=object),
        batches=None if ds.batches is None else ds.batches[rows],
        cell_ids=np.asarray(ds.adata.obs_names, dtype=object)[rows],
    )
