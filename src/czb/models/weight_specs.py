"""What ``czb list models`` and ``czb models pin`` say of the sha256s of model weights.

:func:`checksum_states` tells per variant whether the sha256s of its weight files are
published in the spec, pinned in this cache on first fetch (:mod:`czb.models.weight_pins`)
or neither. :func:`pinned_spec` fills every sha256 of a spec from what was staged
(:func:`czb.models.weights.stage_weights`), :func:`spec_yaml` writes it as a spec file
that loads back as the same spec, and :func:`write_spec_file` puts that file in place
atomically, never over an existing file unless asked (:func:`spec_target` checks where
before anything is staged).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from czb.core.errors import FetchError, SpecError, UsageError
from czb.models.weight_pins import read_pins
from czb.models.weights import names_other_files, pins_file, read_manifest, stage_weights
from czb.specs.names import NAME_RULE, is_valid_name, shown
from czb.specs.schema import BUNDLED_CONTAINERS_DIR, ModelSpec, WeightFile, WeightsVariant


def checksum_states(spec: ModelSpec, *, cache_dir: Path | None = None) -> dict[str, str]:
    """How the weights of each variant of ``spec`` are checked: ``published`` (the spec
    gives every file's sha256), ``pinned`` (each file without one was pinned in this
    cache on its first fetch), ``unverified`` (neither, for some file) or ``no weights``."""
    states = {}
    for name, chosen in spec.variants.items():
        if not chosen.weights:
            states[name] = "no weights"
        elif all(item.sha256 for item in chosen.weights):
            states[name] = "published"
        else:
            try:
                pins = read_pins(pins_file(spec, name, cache_dir=cache_dir), strict=False)
            except SpecError:
                pins = {}
            covered = all(item.sha256 or item.uri in pins for item in chosen.weights)
            states[name] = "pinned" if covered else "unverified"
    return states


def pinned_spec(spec: ModelSpec, variants: list[str] | None = None, *, cache_dir: Path | None = None,
                offline: bool | None = None, progress: bool = False) -> ModelSpec:
    """``spec`` with the sha256 of every weight file of ``variants`` (default: the default
    variant) filled in from what was staged: staged first where need be
    (:func:`stage_weights`, so a file that differs from its pin is refused), each file's
    sha256 taken from the manifest (an archive's own sha256 for ``extract: true``).

    Raises
    ------
    UsageError
        ``spec`` has no variant with weights among ``variants``.
    FetchError
        A file cannot be fetched (offline and not cached: the message says what to do).
    """
    names = list(dict.fromkeys(spec.variant(v)[0] for v in (variants or [None])))
    if not any(name in spec.variants and spec.variants[name].weights for name in names):
        msg = f"model {spec.name!r} has no weights to pin (variant {', '.join(names)})"
        raise UsageError(msg)
    updated = dict(spec.variants)
    for name in names:
        chosen = spec.variants[name]
        if not chosen.weights:
            continue
        staged = stage_weights(spec, name, cache_dir=cache_dir, offline=offline, progress=progress)
        manifest = read_manifest(staged.path)
        # Only when another process staged them again meanwhile, or the cache cannot be written.
        if (manifest is None or names_other_files(manifest, chosen.weights)
                or not all(isinstance(entry.get("sha256"), str) for entry in manifest["files"])):
            msg = (f"the manifest of the weights of {spec.name} (variant {name}) in {staged.path} does not "
                   "record each file's sha256 (staged again meanwhile, or the cache is read-only); try again")
            raise FetchError(msg)
        weights = [WeightFile(**{**item.model_dump(), "sha256": entry["sha256"]})
                   for item, entry in zip(chosen.weights, manifest["files"])]
        updated[name] = WeightsVariant(**{**chosen.model_dump(), "weights": weights})
    return ModelSpec(**{**spec.model_dump(), "variants": updated, "source": spec.source})


def spec_document(spec: ModelSpec) -> dict[str, Any]:
    """``spec`` as a spec file's content (``{"models": {name: fields}}``), fields left at
    their defaults left out. A container folder found beside the spec's own file (not one
    bundled with czb) is written as an absolute path, so the document loads from anywhere."""
    fields = spec.model_dump(mode="json", exclude={"name"}, exclude_defaults=True)
    if spec.container is not None and spec.source is not None:
        with contextlib.suppress(SpecError, OSError):
            found = spec.container_dir()
            bundled = BUNDLED_CONTAINERS_DIR / spec.container
            if not (bundled.is_dir() and bundled.resolve() == found):
                fields["container"] = str(found)
    return {"models": {spec.name: fields}}


def spec_yaml(spec: ModelSpec, pinned: list[str]) -> str:
    """The spec file of ``spec`` (:func:`spec_document`), headed by a comment naming the
    ``pinned`` variants; checked to load back as ``spec``.

    Raises
    ------
    SpecError
        It would not load back as ``spec`` (a bug, never a file written).
    """
    import yaml

    header = (f"# czb models pin {spec.name}: the sha256 of each weight file of variant {', '.join(pinned)}, "
              f"as staged by czb.\n# Load it with --config-dir (or CZB_CONFIG_PATH): it replaces the spec "
              f"of {spec.name} czb has.\n")
    text = header + yaml.safe_dump(spec_document(spec), sort_keys=False, allow_unicode=True, width=100)
    with tempfile.TemporaryDirectory(prefix="czb-pin-") as folder:
        path = Path(folder) / f"{spec.name}.yaml"
        path.write_text(text)
        _check_loads_as(path, spec)
    return text


def _check_loads_as(path: Path, spec: ModelSpec) -> None:
    """Load the spec file ``path`` as czb would and check it holds ``spec`` (its
    container folder compared once resolved)."""
    from czb.specs.loading import load_spec_file

    loaded = load_spec_file(path).get("models", {}).get(spec.name)
    same = loaded is not None and loaded.model_dump(exclude={"container"}) == spec.model_dump(exclude={"container"})
    if same and spec.container is not None:
        try:
            same = loaded.container_dir() == spec.container_dir()
        except SpecError:
            same = loaded.container == spec.container
    if not same:
        msg = f"{path}: the spec of {spec.name} written there does not load back as the same spec"
        raise SpecError(msg)


def spec_target(name: str, *, output: Path | None = None, output_dir: Path | None = None,
                force: bool = False) -> Path:
    """The spec file ``czb models pin`` writes: ``output``, or ``output_dir/<name>.yaml``;
    checked before anything is staged or written (nothing is made here).

    Raises
    ------
    UsageError
        Neither or both given, the file exists (without ``force``), is a folder, is not
        named ``.yaml`` or ``.yml`` (czb reads no other spec files), or another spec file
        beside it defines model ``name`` too (which of the two czb used would depend on
        their names).
    SpecError
        ``name`` cannot name a file.
    """
    from czb.specs.loading import load_yaml

    if (output is None) == (output_dir is None):
        msg = "--output and --output-dir: give one of them"
        raise UsageError(msg)
    if output_dir is not None:
        if not is_valid_name(name):
            msg = f"model name {shown(name)} cannot name a file ({NAME_RULE})"
            raise SpecError(msg)
        output_dir = Path(output_dir).expanduser()
        output = output_dir / f"{name}.yaml"
        if output.resolve().parent != output_dir.resolve():
            msg = f"{output} is not inside {output_dir} once resolved"
            raise UsageError(msg)
    output = Path(output).expanduser()
    if output.is_dir():
        msg = f"--output {output} is a folder; --output-dir writes {name}.yaml into a folder"
        raise UsageError(msg)
    if output.suffix not in (".yaml", ".yml"):
        msg = f"--output {output}: a spec file is named .yaml or .yml (czb reads no other files of a spec folder)"
        raise UsageError(msg)
    if (output.exists() or output.is_symlink()) and not force:
        msg = f"{output} exists; refusing to overwrite it (--force replaces it)"
        raise UsageError(msg)
    # The spec files beside it (not below: the folder may be a large one, a home folder).
    beside = output.parent.iterdir() if output.parent.is_dir() else []
    for other in sorted(p for p in beside if p.suffix in (".yaml", ".yml") and p.is_file()):
        if other.resolve() == output.resolve():
            continue
        with contextlib.suppress(SpecError):
            data, _ = load_yaml(other)
            if isinstance(data, dict) and isinstance(data.get("models"), dict) and name in data["models"]:
                msg = (f"{other} defines model {name} too; with both in one spec folder, which one czb uses "
                       f"depends on their names: write the pinned spec to another folder, or remove that entry")
                raise UsageError(msg)
    return output


def write_spec_file(text: str, spec: ModelSpec, output: Path, *, force: bool = False) -> Path:
    """Write the spec file ``text`` (of ``spec``, :func:`spec_yaml`) to ``output``
    (:func:`spec_target`, checked again here), its folder made if need be, atomically:
    a temporary file beside it, loaded back and checked, then renamed into place. An
    existing file is only replaced with ``force``.

    Returns
    -------
    The file written.

    Raises
    ------
    UsageError
        As :func:`spec_target`; also when the name was taken meanwhile.
    """
    output = spec_target(spec.name, output=output, force=force)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        _check_loads_as(Path(tmp), spec)
        if force:
            os.replace(tmp, output)
        else:
            try:
                os.link(tmp, output)  # fails if the name was taken meanwhile: nothing is overwritten
            except FileExistsError:
                msg = f"{output} exists; refusing to overwrite it (--force replaces it)"
                raise UsageError(msg) from None
            except OSError:  # a file system without hard links: checked, then renamed
                if output.exists() or output.is_symlink():
                    msg = f"{output} exists; refusing to overwrite it (--force replaces it)"
                    raise UsageError(msg) from None
                os.replace(tmp, output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return output
