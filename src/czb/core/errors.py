"""Exceptions and warnings raised by czb.

Library code raises these; only :mod:`czb.cli` turns them into exit codes.
"""

from __future__ import annotations

from collections.abc import Iterable


class CzbError(Exception):
    """Base class of every error czb raises on purpose."""


class SpecError(CzbError):
    """A YAML spec is malformed, or a spec refers to something that does not exist."""


class UnknownNameError(SpecError):
    """A model, dataset or task name is not in the catalog.

    Attributes
    ----------
    kind
        ``"model"``, ``"dataset"``, ``"task"``, ``"suite"`` or ``"weights variant"``.
    name
        The name that was asked for.
    suggestions
        The closest known names, best first.
    """

    def __init__(self, kind: str, name: str, known: Iterable[str], *, owner: str | None = None):
        import difflib

        known = sorted(known)
        self.kind, self.name = kind, name
        self.suggestions = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        if self.suggestions:
            hint = f"did you mean {', '.join(repr(s) for s in self.suggestions)}?"
        elif owner is not None:  # names that belong to one entry (a model's variants) are listed whole
            hint = f"{kind}s: {', '.join(known)}" if known else f"it has no {kind}s"
        else:
            hint = f"run `czb list {kind}s` to see the {len(known)} known {kind}s"
        what = f"{owner} has no {kind} {name!r}" if owner is not None else f"unknown {kind} {name!r}"
        super().__init__(f"{what}; {hint}")


class UsageError(CzbError):
    """What was asked cannot be done as asked (a task over several datasets given one,
    nothing to score): bad usage, exit 2 on the command line."""


class DatasetError(CzbError):
    """A dataset is missing, corrupt, or does not fit its spec."""


class FetchError(DatasetError):
    """A file could not be downloaded, or is not in the cache while offline."""


class EmbeddingError(CzbError):
    """An embedding is malformed or does not line up with its dataset."""


class TaskError(CzbError):
    """A task cannot be run on the data it was given."""


class NotApplicableError(CzbError):
    """A task or model does not apply to this dataset (e.g. batch integration without a
    batch key, or a model that does not support the dataset's organism).

    Recorded as ``status: not_applicable`` rather than as a failure.
    """


class ModelRunError(EmbeddingError):
    """A model container could not be built, started, or finished its run.

    Attributes
    ----------
    log_tail
        The container's last log lines (empty when it never started).
    """

    def __init__(self, message: str, *, log_tail: list[str] | None = None):
        super().__init__(message)
        self.log_tail = list(log_tail or [])


class ResultsError(CzbError):
    """A result file cannot be written or read."""


class CzbWarning(UserWarning):
    """Base class of czb's warnings."""


class DatasetWarning(CzbWarning):
    """Something about a dataset is unusual but can be worked around."""


class EmbeddingWarning(CzbWarning):
    """Something about an embedding is unusual but can be worked around."""


class SettingsError(CzbError):
    """A ``CZB_*`` environment variable has a value that makes no sense (e.g. ``CZB_N_JOBS=0``)."""
