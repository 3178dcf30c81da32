"""What a remote object source is: the version a HEAD reports, an open GET body, and
the interface :mod:`czb.io.http` and :mod:`czb.io.s3` implement."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from czb.core.errors import FetchError

CHUNK = 1 << 20  # 1 MiB: large enough for throughput, small enough for a smooth progress bar
CONNECT_TIMEOUT_S = 15
READ_TIMEOUT_S = 60


@dataclass(frozen=True)
class Remote:
    """What the remote says about the current version of an object."""

    etag: str | None
    size: int | None
    last_modified: str | None

    @property
    def version_key(self) -> str:
        # Last-Modified stands in for a missing ETag; without either, the size is all we have.
        validator = self.etag or f"lm:{self.last_modified or ''}"
        return hashlib.sha1(f"{validator}|{self.size}".encode()).hexdigest()[:16]


class RemoteChanged(Exception):
    """The object changed between the HEAD and the GET; start over with a fresh HEAD."""


class Unreachable(FetchError):
    """The remote could not be asked for the object (no network, no server) or answered
    that it has none for us (``missing``: not found, access denied). The message names
    the whole URI and the cause; :func:`czb.io.fetch.fetch` adds the next step."""

    def __init__(self, uri: str, cause: str, *, missing: bool = False):
        self.uri, self.cause, self.missing = uri, cause, missing
        super().__init__(f"cannot fetch {uri}: {cause}")


@dataclass
class Body:
    """An open GET response: whether it starts at the requested offset, and its bytes."""

    partial: bool
    chunks: Iterator[bytes]
    close: Any
    content_type: str | None = None


class Source:
    """A remote object: :meth:`head` describes it, :meth:`get` streams it from an offset."""

    uri: str
    #: Exceptions that mean "the connection broke mid-stream" (resumable).
    interrupted: tuple[type[BaseException], ...] = ()

    def head(self) -> Remote:
        raise NotImplementedError

    def get(self, offset: int, remote: Remote) -> Body:
        raise NotImplementedError

    def close(self) -> None:
        pass


#: What requests/urllib3 wrap a cause in: the pool's host and port, and the URL's path
#: (which the message already names whole; a copy of it cut short only misleads).
_POOL = re.compile(r"^\w*Connection(?:Pool)?\(host=[^)]*\):\s*")
_WITH_URL = re.compile(r"Max retries exceeded with url: \S+")


def short_cause(exc: BaseException) -> str:
    """One line saying why a request failed, from deep inside urllib3/botocore wrappers
    (never a copy of the URL: the caller names it)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        # The innermost OS error ("Connection refused", "Name or service not known") says
        # it best; socket.gaierror is the one a host name that does not resolve gives.
        if type(e).__module__ in ("builtins", "socket", "ssl") and isinstance(e, OSError) and e.strerror:
            if type(e).__name__ == "gaierror":
                return f"cannot resolve the host name ({e.strerror})"
            return e.strerror
        if isinstance(e, TimeoutError) or type(e).__name__ in ("ConnectTimeoutError", "ReadTimeoutError"):
            return "timed out"
        if type(e).__name__ in ("IncompleteRead", "IncompleteReadError"):
            return "the connection closed early"
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__, *e.args]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _WITH_URL.sub("gave up after retries", _POOL.sub("", text)).strip()
    # Untrusted text (a server's, a library's): bounded, so one line stays readable.
    return text if len(text) <= 200 else text[:199] + "…"
