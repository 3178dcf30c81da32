"""The generators ``synthetic:NAME`` specs can name, and the check of their parameters."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from czb.data.synthetic import KNOWN_COMPLEXES
from czb.data.synthetic.cells import planted_cells
from czb.data.synthetic.common import GENE_NUMBER_RANGE
from czb.data.synthetic.perturbations import planted_perturbations
from czb.data.synthetic.screen import planted_screen

if TYPE_CHECKING:
    import anndata

#: Generators that ``uri: synthetic:NAME`` specs can name.
GENERATORS: dict[str, Callable[..., anndata.AnnData]] = {
    "planted_cells": planted_cells,
    "planted_perturbations": planted_perturbations,
    "planted_screen": planted_screen,
}

#: Bumped when a generator makes other data from the same arguments, so that work keyed
#: by a dataset's digest is not reused across the change (absent: revision 1).
REVISIONS: dict[str, int] = {
    # 2: targets drawn from a stably sorted gene order (the quicksort's order of tied
    # expression levels depended on numpy's SIMD dispatch, so on the CPU).
    "planted_perturbations": 2,
}


# --------------------------------------------------------------------------- parameters

#: Most values (cells × genes, plus the per-type, per-batch and per-target rows of
#: genes) a generator may make: its working arrays are dense float64, several at a
#: time, about 50 bytes per value at the peak (50M values: about 2.5 GB).
MAX_GENERATED_VALUES = 50_000_000

_COUNT = 10_000_000
#: Accepted range of each generator parameter (inclusive), by name; a name means the
#: same in every generator. For strings, the range of their length.
PARAM_RANGES: dict[str, tuple[Any, Any]] = {
    "n_cells": (1, _COUNT),
    "n_genes": (1, GENE_NUMBER_RANGE[1] - GENE_NUMBER_RANGE[0]),
    "n_cell_types": (1, 10_000),
    "n_batches": (1, 10_000),
    "n_time_points": (1, 10_000),
    "n_donors_per_batch": (1, 10_000),
    "n_targets": (1, 2_000),  # pairs of targets are listed: n_targets² / 2 of them
    "n_doubles": (0, 2_000_000),
    "n_modules": (1, 10_000),
    "n_control_cells": (1, _COUNT),
    "n_cells_per_condition": (1, _COUNT),
    "module_size": (0, 300_000),
    "n_specific_genes": (0, 300_000),
    "n_unexpressed": (0, 10_000),
    "n_singletons": (0, 10_000),
    "n_complexes": (0, 16),  # len(KNOWN_COMPLEXES)
    "n_cells_per_perturbation": (1, _COUNT),
    "n_control_cells_per_batch": (1, _COUNT),
    "program_size": (1, 300_000),
    "seed": (0, 2**63 - 1),
    "batch_effect": (0.0, 100.0),
    "interaction": (0.0, 100.0),
    "effect_strength": (0.0, 100.0),
    "knockdown": (-50.0, 50.0),
    "mean_counts": (1.0, 1e7),
    "dispersion": (0.01, 1e6),  # smaller: gamma draws overflow the Poisson sampler
    "gene_prefix": (1, 20),  # length of the string
    "control_label": (1, 200),
}


def _describe_type(value: Any) -> str:
    names = {bool: "a boolean", str: "a string", list: "a list", dict: "a mapping", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


def _check_param(name: str, kind: str, value: Any) -> None:
    low, high = PARAM_RANGES[name]
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            msg = f"parameter {name!r} must be an integer from {low} to {high}, not {_describe_type(value)}"
            raise ValueError(msg)
        if not low <= value <= high:
            msg = f"parameter {name!r} must be an integer from {low} to {high}, not {value}"
            raise ValueError(msg)
    elif kind == "float":
        span = f"from {low:g} to {high:g}"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            msg = f"parameter {name!r} must be a number {span}, not {_describe_type(value)}"
            raise ValueError(msg)
        if not (math.isfinite(value) and low <= value <= high):
            msg = f"parameter {name!r} must be a number {span}, not {float(value):g}"
            raise ValueError(msg)
    else:  # str
        if not isinstance(value, str):
            msg = f"parameter {name!r} must be a string, not {_describe_type(value)}"
            raise ValueError(msg)
        if not low <= len(value) <= high or not value.isprintable():
            msg = f"parameter {name!r} must be {low} to {high} printable characters"
            raise ValueError(msg)


def _generated_values(generator: str, p: dict[str, Any]) -> int:
    """Dense values the generator's biggest arrays hold together (rows × genes)."""
    if generator == "planted_cells":
        rows = p["n_cells"] + p["n_batches"] + 2 * p["n_cell_types"]
    elif generator == "planted_perturbations":
        conditions = 1 + p["n_targets"] + p["n_doubles"]
        rows = p["n_control_cells"] + p["n_cells_per_condition"] * (conditions - 1) + conditions + p["n_targets"]
    else:  # planted_screen
        members = sum(len(g) for g in list(KNOWN_COMPLEXES.values())[: p["n_complexes"]])
        targets = members + p["n_singletons"] + p["n_unexpressed"]
        rows = p["n_control_cells_per_batch"] * p["n_batches"] + p["n_cells_per_perturbation"] * targets
        rows += targets + p["n_batches"]
    return rows * p["n_genes"]


def check_params(generator: str, arguments: dict[str, Any]) -> None:
    """Check a generator's arguments (defaults filled in) before anything is generated.

    Types and ranges per :data:`PARAM_RANGES`, and the total size per
    :data:`MAX_GENERATED_VALUES`, so a wrong-typed, negative or huge value is one clear
    error, never a traceback from inside numpy or an allocation of terabytes.

    Parameters
    ----------
    generator
        A key of :data:`GENERATORS`.
    arguments
        Every argument of the generator, by name.

    Raises
    ------
    ValueError
        Naming the parameter and what it must be.
    """
    import inspect

    signature = inspect.signature(GENERATORS[generator])
    for name, parameter in signature.parameters.items():
        kind = str(parameter.annotation)
        _check_param(name, kind, arguments[name])
    values = _generated_values(generator, arguments)
    if values > MAX_GENERATED_VALUES:
        msg = (
            f"the parameters ask for about {values:,} generated values (cells × genes and the "
            f"like); at most {MAX_GENERATED_VALUES:,} are allowed: use fewer cells or genes"
        )
        raise ValueError(msg)
