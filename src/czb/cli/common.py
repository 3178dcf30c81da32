"""What the ``czb`` commands share: console output, error mapping and option parsing.

:func:`_guarded` is the only place that turns exceptions into exit codes: 2 for unknown
names and bad usage, 1 for any other czb error (one line; the traceback with ``--debug``).
Also here: the options and enums of several commands, the parsers of ``--seeds``,
``--gpus`` and positive sizes, and the routing of czb's warnings to stderr.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class _State:
    """Set by the ``--debug`` option of :mod:`czb.cli`; read where errors are mapped."""

    debug = False


class Format(str, Enum):
    table = "table"
    json = "json"


ConfigDirs = Annotated[
    Optional[list[Path]],
    typer.Option("--config-dir", help="Extra spec folder (repeatable); its entries override ours."),
]
OutputFormat = Annotated[Format, typer.Option("--format", help="table for people, json for programs.")]


def _debug_option(value: bool) -> bool:
    """Callback of ``--debug`` after a command's name (``czb run ... --debug``), as before it."""
    if value:
        _State.debug = True
    return value


DebugOption = Annotated[
    bool, typer.Option("--debug", callback=_debug_option, is_eager=True, help="Show tracebacks of errors.")
]


def _console(stderr: bool = False, *, piped_width: int | None = None):
    """A rich console on stdout (or stderr); not a terminal (piped, redirected), it prints
    plain text. ``piped_width``: its width then (``COLUMNS`` wins), rather than the size
    of the terminal around the pipe (:mod:`czb.cli.tables`)."""
    import os

    from rich.console import Console

    console = Console(stderr=stderr, highlight=False)
    if piped_width and not console.is_terminal:
        columns = os.environ.get("COLUMNS", "")
        console.width = int(columns) if columns.isdigit() and 0 < int(columns) < 10_000 else piped_width
    return console


def _one_line(text: object) -> str:
    """``text`` as one line safe on a terminal (:func:`czb.core.terminal.printable`): names,
    errors and paths come from records, specs and containers, and may hold escape
    sequences."""
    from czb.core.terminal import printable

    return printable(text).strip()


def _safe(text: object) -> str:
    """:func:`_one_line` for a rich markup string: its brackets are not read as markup."""
    from rich.markup import escape

    return escape(_one_line(text))


def _fail(message: str, code: int, hint: str | None = None) -> None:
    """Print ``error: message`` (and ``hint: hint``) on stderr, each one whole line; exit."""
    _console(stderr=True).print(f"[bold red]error:[/] {_safe(message)}", markup=True, soft_wrap=True)
    if hint:
        _console(stderr=True).print(f"[bold]hint:[/] {_safe(hint)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _split_hint(e: BaseException) -> tuple[str, str | None]:
    """The message of ``e``, and apart the next step it ends with where czb set one (a
    ``hint`` on ``e`` or on an error it was raised from, e.g. a failed fetch)."""
    text, seen = str(e), set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        hint = getattr(cause, "hint", None)
        if isinstance(hint, str) and hint and text.endswith(f"; {hint}"):
            return text[: -len(hint) - 2], hint
        cause = cause.__cause__
    return text, None


def _internal_error(e: BaseException) -> str:
    """One line for an exception czb did not expect: its type and a short message with
    quoted parts elided (they may be someone's data)."""
    import re

    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", _one_line(str(e)))
    text = text if len(text) <= 120 else text[:117] + "..."
    what = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return f"internal error ({what}) — rerun with --debug for the traceback"


def _guarded(fn):
    """Run a command body, mapping exceptions to exit codes: 2 for unknown names, bad
    settings and bad usage (:class:`~czb.core.errors.UsageError`), 1 for other czb
    errors and, as a last resort, for anything unexpected (one line, and a ``hint:``
    line where the error names the next step; ``--debug`` shows the traceback)."""
    from czb.core.errors import CzbError, SettingsError, UnknownNameError, UsageError

    try:
        return fn()
    except typer.Exit:
        raise
    except (UnknownNameError, SettingsError, UsageError) as e:
        if _State.debug:
            raise
        _fail(str(e), 2)
    except CzbError as e:
        if _State.debug:
            raise
        message, hint = _split_hint(e)
        _fail(message, 1, hint)
    except Exception as e:  # RecursionError, MemoryError, bugs: still no traceback for users
        if _State.debug:
            raise
        _fail(_internal_error(e), 1)


def _positive(value: float | None) -> float | None:
    """Callback of options that make no sense at or below 0 (sizes, durations)."""
    if value is not None and not value > 0:
        msg = f"must be greater than 0, got {value:g}"
        raise typer.BadParameter(msg)
    return value


def _catalog(config_dirs: list[Path] | None):
    from czb.specs.catalog import Catalog

    return Catalog.load(config_dirs or ())


def _route_warnings() -> None:
    """Show czb's own warnings as one ``warning:`` line on stderr; leave others alone."""
    import warnings

    from czb.core.errors import CzbWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CzbWarning):
            _console(stderr=True).print(f"[yellow]warning:[/] {_safe(message)}", soft_wrap=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


#: Largest seed: numpy's random generators take seeds below 2**32.
MAX_SEED = 2**32 - 1


def _parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds 0,1,2``: distinct integers from 0 to :data:`MAX_SEED`
    (a repeated seed would pass the same run off as a spread over seeds).

    Raises
    ------
    typer.BadParameter
        Naming what is wrong (bad usage: exit 2).
    """
    parts = text.replace(",", " ").split()
    if not parts:
        msg = "needs one or more seeds, e.g. 0,1,2"
        raise typer.BadParameter(msg)
    bad = [p for p in parts if not (p.isascii() and p.isdigit() and len(p) <= 10) or int(p) > MAX_SEED]
    if bad:
        shown = ", ".join(_one_line(p)[:40] for p in bad[:3])
        msg = f"seeds are integers from 0 to {MAX_SEED} separated by commas; not: {shown}"
        raise typer.BadParameter(msg)
    seeds = [int(p) for p in parts]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        msg = f"each seed once; repeated: {', '.join(map(str, repeated))}"
        raise typer.BadParameter(msg)
    return seeds


def _seeds_option(text: str) -> str:
    """Callback of ``--seeds``: refuse bad seeds before any work."""
    _parse_seeds(text)
    return text


def _gpus_option(text: str | None) -> str | None:
    """Callback of ``--gpus``: ``all``, ``none`` or a number (``0`` is ``none``)."""
    if text is None or text in ("all", "none") or (text.isascii() and text.isdigit() and len(text) <= 4):
        return "none" if text is not None and text.isdigit() and not text.strip("0") else text
    msg = f"GPUs are all, none or a number, got {_one_line(text)[:40]!r}"
    raise typer.BadParameter(msg)
