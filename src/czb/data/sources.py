"""Where a dataset's data comes from besides a file to fetch: files shipped inside
installed packages (``builtin:``) and seeded generators (``synthetic:``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from czb.core.errors import DatasetError
from czb.data.synthetic.generators import GENERATORS, REVISIONS, check_params
from czb.specs.schema import DatasetSpec

if TYPE_CHECKING:
    import anndata

#: ``builtin:NAME`` → (package, path of the file inside the package).
BUILTINS: dict[str, tuple[str, str]] = {
    "scanpy/pbmc68k_reduced": ("scanpy", "datasets/10x_pbmc68k_reduced.h5ad"),
}


def _builtin_path(name: str, dataset: str) -> Path:
    """Path of a file shipped inside an installed package, found without importing it."""
    import importlib.util

    if name in BUILTINS:
        package, inner = BUILTINS[name]
    else:  # builtin:PACKAGE/PATH/INSIDE/IT
        package, _, inner = name.partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        msg = (
            f"dataset {dataset!r}: builtin:{name} needs the package {package!r}, "
            "which is not installed"
        )
        raise DatasetError(msg)
    for location in spec.submodule_search_locations:
        path = Path(location) / inner
        if path.is_file():
            return path
    msg = (
        f"dataset {dataset!r}: builtin:{name} not found in the installed {package!r} "
        f"(looked for {inner}); known builtins: {', '.join(sorted(BUILTINS))}"
    )
    raise DatasetError(msg)


def _generator_digest(name: str, params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a generator's name and its full arguments."""
    described: dict[str, Any] = {"generator": name, "params": params}
    if REVISIONS.get(name, 1) != 1:  # digests of unrevised generators stay as they were
        described["revision"] = REVISIONS[name]
    payload = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _generator(spec: DatasetSpec, name: str) -> tuple[Any, str]:
    """The generator of a ``synthetic:NAME`` dataset and the digest of its full arguments."""
    import inspect

    try:
        generator = GENERATORS[name]
    except KeyError:
        known = ", ".join(sorted(GENERATORS))
        msg = f"dataset {spec.name!r}: unknown synthetic generator {name!r}; known: {known}"
        raise DatasetError(msg) from None
    try:
        bound = inspect.signature(generator).bind(**spec.params)
    except TypeError as e:
        msg = f"dataset {spec.name!r}: bad params for synthetic:{name}: {e}"
        raise DatasetError(msg) from None
    # Hash the arguments with defaults filled in, so that spelling out a default
    # gives the same digest and changing a default gives a new one.
    bound.apply_defaults()
    try:
        check_params(name, dict(bound.arguments))  # types, ranges and size, before any work
    except ValueError as e:
        msg = f"dataset {spec.name!r}: bad params for synthetic:{name}: {e}"
        raise DatasetError(msg) from None
    return generator, _generator_digest(name, dict(bound.arguments))


def synthetic_digest(spec: DatasetSpec) -> str:
    """The sha256 a ``synthetic:`` dataset is identified by, without generating it."""
    return _generator(spec, spec.uri.removeprefix("synthetic:"))[1]


def builtin_path(spec: DatasetSpec) -> Path:
    """The file of a ``builtin:`` dataset."""
    return _builtin_path(spec.uri.removeprefix("builtin:"), spec.name)


def generate(spec: DatasetSpec, name: str) -> tuple[anndata.AnnData, str]:
    generator, digest = _generator(spec, name)
    try:
        adata = generator(**spec.params)
    except ValueError as e:
        msg = f"dataset {spec.name!r}: synthetic:{name} rejected its params: {e}"
        raise DatasetError(msg) from None
    return adata, digest
