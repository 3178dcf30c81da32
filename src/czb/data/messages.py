"""Wording shared by dataset errors: example names, the columns closest to a missing
key, and the error for a file that cannot be read."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from czb.core.errors import DatasetError
from czb.data.hdf5_checks import unreadable_file


def examples(names: Iterable[str], k: int = 2) -> str:
    return ", ".join(repr(n) for n in list(names)[:k])


def available(key: str, columns: Iterable[Any], *, limit: int = 12) -> str:
    """Columns as a string, the closest matches to ``key`` first."""
    columns = [str(c) for c in columns]
    if not columns:
        return "none"
    close = difflib.get_close_matches(key, columns, n=5, cutoff=0.4)
    lowered = [c for c in columns if c not in close and key.lower() in c.lower()]
    ordered = close + lowered + sorted(c for c in columns if c not in close and c not in lowered)
    shown = ", ".join(repr(c) for c in ordered[:limit])
    more = f" and {len(ordered) - limit} more" if len(ordered) > limit else ""
    return f"{shown}{more}"


def unreadable(dataset: str, path: Path, e: BaseException) -> DatasetError:
    return unreadable_file(f"dataset {dataset!r}", path, e)

