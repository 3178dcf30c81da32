"""The rule every name czb turns into a folder or file name follows: datasets, models,
tasks, suites, weights variants and each part of a weights ``path``."""

from __future__ import annotations

import re

#: What the name of a dataset, model, task, suite or weights variant, and each part of a
#: weights ``path``, may be: these become folder and file names (cache, store, results).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
NAME_RULE = "1-128 letters, digits, '_', '.' or '-', starting with a letter or digit, without '..'"


def is_valid_name(name: object) -> bool:
    """Whether ``name`` matches :data:`NAME_PATTERN` (and holds no ``..``)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None and ".." not in name


def shown(name: object) -> str:
    """``name`` for an error message: its repr, cut short (a name may be anything in a bad spec)."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def check_name(name: object, what: str = "name") -> str:
    """``name`` if it is valid (:func:`is_valid_name`).

    Raises
    ------
    ValueError
        It is not; the message names it (shortened) and gives the rule.
    """
    if not is_valid_name(name):
        msg = f"{what} {shown(name)} is not a valid name ({NAME_RULE})"
        raise ValueError(msg)
    return name
