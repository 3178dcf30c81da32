"""Reading bytes czb does not trust: bounded, regular files only, never echoed.

Specs, result files, container outputs and embedding samples can come from anyone. The
helpers here read them without blocking on a FIFO or device, without reading more than
a cap, and parse JSON without recursing without bound; their messages say what is
wrong in words of their own and never quote the content.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any


class UntrustedInputError(ValueError):
    """A file or document refused by these helpers; the message never quotes it."""


def read_bounded(path: str | Path, max_bytes: int | None, *, follow_symlinks: bool = True,
                 allow_hard_links: bool = True) -> bytes:
    """The bytes of the regular file ``path``, refusing anything else before reading.

    A FIFO, device or socket is refused without blocking (opened non-blocking, then
    checked with ``fstat``), a file larger than ``max_bytes`` (``None``: no limit) is
    refused from its size and again while reading (``/proc`` files report size 0); with
    ``follow_symlinks=False`` a symlink as the last component is refused (``O_NOFOLLOW``),
    with ``allow_hard_links=False`` a file with more than one name (``st_nlink > 1``).

    Raises
    ------
    OSError
        The file cannot be opened (missing, permission, a symlink when not followed).
    UntrustedInputError
        It is not a regular file, or is too large; the message says which.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    with os.fdopen(fd, "rb", buffering=0) as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            msg = "not a regular file"
            raise UntrustedInputError(msg)
        if not allow_hard_links and info.st_nlink > 1:
            msg = "a file with several names (hard links)"
            raise UntrustedInputError(msg)
        if max_bytes is None:
            return f.read()
        if info.st_size > max_bytes:
            msg = f"larger than the limit of {max_bytes:,} bytes"
            raise UntrustedInputError(msg)
        chunks, total = [], 0
        while chunk := f.read(min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                msg = f"larger than the limit of {max_bytes:,} bytes"
                raise UntrustedInputError(msg)
    return b"".join(chunks)


def json_depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


#: A lone UTF-16 surrogate: valid in JSON (``"\\ud800"``), but no UTF-8 text can hold it.
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Where a JSON text may produce one: a ``\\uD800``-``\\uDFFF`` escape, or a raw surrogate.
_MAY_HOLD_SURROGATE = re.compile("\\\\u[dD][89a-fA-F]|[\ud800-\udfff]")


def without_surrogates(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD, so it can be written as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def _replace_surrogates(value: Any) -> Any:
    """``value`` with every string in it (keys too) passed through :func:`without_surrogates`;
    lists and dicts are changed in place, walked without recursion."""
    if isinstance(value, str):
        return without_surrogates(value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            for i, child in enumerate(item):
                if isinstance(child, str):
                    item[i] = without_surrogates(child)
                elif isinstance(child, (list, dict)):
                    stack.append(child)
        elif isinstance(item, dict):
            pairs = list(item.items())
            item.clear()
            for key, child in pairs:
                if isinstance(child, str):
                    child = without_surrogates(child)
                elif isinstance(child, (list, dict)):
                    stack.append(child)
                item[without_surrogates(key) if isinstance(key, str) else key] = child
    return value


def parse_json(data: bytes | str, *, max_depth: int) -> Any:
    """Parse an untrusted JSON document; NaN and infinities become ``None``, and lone
    surrogates (``"\\ud800"``, which nothing can write as UTF-8) become U+FFFD.

    Raises
    ------
    UntrustedInputError
        Not UTF-8, not JSON (with the line and column), an integer of too many digits,
        or lists and objects nested deeper than ``max_depth`` (also where Python's own
        parser would run out of stack).
    """
    try:
        if isinstance(data, (bytes, bytearray)):
            # As json.loads decodes bytes (it lets encoded surrogates through: replaced below).
            data = bytes(data).decode(json.detect_encoding(data), "surrogatepass")
        value = json.loads(data, parse_constant=lambda _c: None, parse_float=_finite_float)
    except RecursionError:
        value = None
        deep = True
    except UnicodeDecodeError:
        msg = "not UTF-8 text"
        raise UntrustedInputError(msg) from None
    except json.JSONDecodeError as e:
        msg = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        raise UntrustedInputError(msg) from None
    except (ValueError, TypeError):  # e.g. an integer beyond Python's digit limit
        msg = "not valid JSON (an unreadable number or text)"
        raise UntrustedInputError(msg) from None
    else:
        deep = json_depth(value) > max_depth
    if deep:
        msg = f"nested more than {max_depth} levels deep"
        raise UntrustedInputError(msg)
    return _replace_surrogates(value) if _MAY_HOLD_SURROGATE.search(data) else value
