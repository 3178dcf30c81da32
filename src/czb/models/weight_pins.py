"""Pins of model weights (trust on first use), and the atomic JSON writer that the
weights' manifests and pins share.

The first fetch of a weight file whose spec gives no sha256 records ("pins") its sha256
in ``<cache>/weights/.pins/<model>/<variant>.json``: ``{"model", "variant", "files": {uri:
{"sha256", "path", "pinned_at"}}}``. ``.pins`` is a dot name, which no model can take, so
removing a staged folder, or a model's whole folder, keeps the pins. Staging the file
again must give the same bytes (:func:`check_pin`), unless ``--repin`` accepts it as it is
published now. Used by :mod:`czb.models.weights`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from czb.core.errors import FetchError, SpecError
from czb.specs.names import shown
from czb.specs.schema import WeightFile

#: Largest manifest or pins file read (a stamp is about 100 bytes a staged file).
MAX_RECORD_BYTES = 1 << 28


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves to somewhere strictly under ``root`` (resolved too)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    return resolved != base and base in resolved.parents


def require_inside(path: Path, root: Path, what: str) -> None:
    """Refuse (:class:`~czb.core.errors.SpecError`) to touch ``what`` at ``path`` unless
    it is :func:`inside` ``root``."""
    if not inside(path, root):
        msg = f"refusing to touch {what} {path}: it is not inside {root} once resolved"
        raise SpecError(msg)


def write_json(path: Path, data: dict[str, Any], *, root: Path, what: str) -> None:
    """Write ``data`` to ``path`` (inside ``root``) atomically, through a fresh temporary
    file (never an existing name, which could be a planted symlink) renamed into place."""
    require_inside(path, root, what)
    payload = json.dumps(data, indent=2, sort_keys=True).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_pin(model: str, variant: str, item: WeightFile, digest: str, pinned: str | None) -> None:
    """Refuse a file without a sha256 in its spec whose bytes differ from its pin.

    Raises
    ------
    FetchError
        Naming the file, both digests and, as its hint, the command that accepts the
        file as it is published now.
    """
    if item.sha256 is not None or pinned is None or digest == pinned:
        return
    hint = (f"if the new file is the one you want, accept it with `czb models fetch-weights {model} "
            f"--variant {variant} --repin`; `czb models pin {model} --variant {variant}` then writes it into a spec")
    msg = (f"weights of {model} (variant {variant}): {shown(item.uri)} ({item.path}) is not the file pinned "
           f"when it was first fetched: sha256 {digest}, pinned {pinned} (it was replaced where it is "
           f"published, or altered on the way); nothing was staged; {hint}")
    error = FetchError(msg)
    error.hint = hint  # type: ignore[attr-defined]  # the CLI shows it on a line of its own
    raise error


# --------------------------------------------------------------------------- pins

#: Folder of the pins under ``<cache>/weights``: a dot name, which no model can take.
PINS_FOLDER = ".pins"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def pins_path(root: Path, model: str, variant: str) -> Path:
    """``root/.pins/<model>/<variant>.json``, ``root`` being ``<cache>/weights`` (the names
    are checked by the caller: :func:`czb.models.weights.pins_file`)."""
    return Path(root) / PINS_FOLDER / model / f"{variant}.json"


def read_pin_entries(path: Path, *, strict: bool) -> dict[str, dict[str, Any]]:
    """The pins of ``path``: ``{uri: {"sha256", "path", "pinned_at"}}``, ``{}`` when there
    is no such file.

    Raises
    ------
    FetchError
        With ``strict``, the file is there but cannot be read or is not a pins file
        (without ``strict`` its pins are ignored).
    """
    from czb.core import untrusted

    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        data = untrusted.parse_json(untrusted.read_bounded(path, MAX_RECORD_BYTES, follow_symlinks=False),
                                    max_depth=8)
        files = data["files"] if isinstance(data, dict) and isinstance(data.get("files"), dict) else None
        if files is None or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str)
                                    and _SHA256.fullmatch(e["sha256"]) for e in files.values()):
            raise ValueError("not a pins file")
    except (OSError, ValueError) as e:  # UntrustedInputError is a ValueError
        if not strict:
            return {}
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not a pins file czb wrote"
        msg = (f"the weights pins {path} cannot be read ({why}); they hold the sha256 of each file "
               "first fetched: restore the file, or remove it to pin the files again on their next fetch")
        raise FetchError(msg) from None
    return files


def read_pins(path: Path, *, strict: bool = True) -> dict[str, str]:
    """``{uri: pinned sha256}`` of a pins file (:func:`read_pin_entries`)."""
    return {uri: entry["sha256"] for uri, entry in read_pin_entries(path, strict=strict).items()}


def pin_files(path: Path, model: str, variant: str, files: list[dict[str, Any]], pins: dict[str, str],
              *, root: Path) -> None:
    """Pin each of ``files`` (manifest entries) with a sha256 and no pin in ``pins`` yet,
    or whose sha256 the spec checked; keep every other pin. Written only when something
    changes."""
    from datetime import datetime, timezone

    entries = dict(read_pin_entries(path, strict=False))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    changed = False
    for entry in files:
        uri, digest = entry.get("uri"), entry.get("sha256")
        if not isinstance(uri, str) or not isinstance(digest, str):
            continue  # staged by an older czb, which kept no sha256
        if uri in pins and (pins[uri] == digest or entry.get("verified_by") != "spec"):
            continue  # never replaced silently: a changed file is refused before this
        if entries.get(uri, {}).get("sha256") == digest:
            continue
        entries[uri] = {"sha256": digest, "path": entry.get("path"), "pinned_at": now}
        changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"model": model, "variant": variant, "files": entries}, root=root, what="weights pins")
