"""Text from records, specs, file names and containers made safe to print on a terminal.

Such text is untrusted: an escape sequence in a model name or an error message would
be run by the terminal (clear the screen, move the cursor over earlier lines, set the
window title), and bidirectional-text controls reorder what is shown. Everything czb
prints to a terminal goes through :func:`printable`.
"""

from __future__ import annotations

import re

#: Line breaks and tabs (and runs of them): one space, so a message stays one line.
_BREAKS = re.compile("[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
#: Other C0 and C1 control characters (ESC, CSI, OSC...), DEL, and the bidirectional
#: controls (embeddings, overrides, isolates, marks) that reorder text on screen.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _visible(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` as one line a terminal shows as it is: line breaks and tabs become one
    space, other control characters and bidirectional controls their escaped form
    (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_visible, _BREAKS.sub(" ", str(text)))


def human_bytes(n: float) -> str:
    """A size for messages: ``"812 bytes"``, ``"1.2 kB"``, ``"4.3 GB"`` (powers of 1000)."""
    if n < 1000:
        return f"{int(n)} bytes"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.3g} {unit}"
    return f"{n / 1000:.3g} TB"
