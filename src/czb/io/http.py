"""Downloading over HTTP(S) with ``requests`` (imported when a source is made)."""

from __future__ import annotations

from typing import Any

from czb.io.source import (
    CHUNK,
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    Body,
    Remote,
    RemoteChanged,
    Source,
    Unreachable,
    short_cause,
)


class HttpSource(Source):
    def __init__(self, uri: str):
        import requests
        import urllib3.exceptions

        from czb import __version__

        self.uri = uri
        self.requests = requests
        self.session = requests.Session()
        # identity: Content-Length and Range must refer to the bytes as stored, not gzipped.
        self.session.headers.update(
            {"User-Agent": f"czb/{__version__}", "Accept-Encoding": "identity"}
        )
        self.interrupted = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)

    def _request(self, method: str, headers: dict[str, str] | None = None) -> Any:
        try:
            return self.session.request(
                method,
                self.uri,
                headers=headers,
                stream=True,
                allow_redirects=True,
                timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            )
        except self.requests.RequestException as e:
            raise Unreachable(self.uri, short_cause(e)) from None

    def _raise_for_status(self, response: Any) -> None:
        if response.status_code >= 400:
            response.close()
            reason = f" {response.reason}" if response.reason else ""
            # 4xx: the server answered that it has no such file for us; 5xx: it failed.
            raise Unreachable(self.uri, f"HTTP {response.status_code}{reason}",
                              missing=response.status_code < 500)

    def head(self) -> Remote:
        response = self._request("HEAD")
        response.close()
        if response.status_code in (403, 405, 501):
            # Some servers (and presigned URLs) refuse HEAD but allow GET: read a GET's headers.
            response = self._request("GET")
            response.close()
        self._raise_for_status(response)
        length = response.headers.get("Content-Length")
        return Remote(
            etag=response.headers.get("ETag"),
            size=int(length) if length and length.isdigit() else None,
            last_modified=response.headers.get("Last-Modified"),
        )

    def get(self, offset: int, remote: Remote) -> Body:
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            # If-Range: the server sends the whole (new) object instead of a range of it
            # if it changed. Weak ETags are not allowed there.
            validator = (
                remote.etag
                if remote.etag and not remote.etag.startswith("W/")
                else remote.last_modified
            )
            if validator:
                headers["If-Range"] = validator
        response = self._request("GET", headers)
        if response.status_code == 416:  # the range is past the end: the .part is bogus
            response.close()
            response = self._request("GET")
        self._raise_for_status(response)
        etag = response.headers.get("ETag")
        if remote.etag and etag and etag != remote.etag:
            response.close()
            raise RemoteChanged
        content_range = response.headers.get("Content-Range", "")
        partial = response.status_code == 206 and content_range.startswith(f"bytes {offset}-")
        if response.headers.get("Content-Encoding", "identity").lower() in ("identity", ""):
            # Raw reads: a decoding read that hits a dropped connection throws away the
            # bytes it had buffered (up to a chunk), which a resume would then fetch again.
            chunks = response.raw.stream(CHUNK, decode_content=False)
        else:  # the server compressed it anyway: store what it decodes to, as requests would
            chunks = response.iter_content(CHUNK)
        return Body(partial=partial, chunks=chunks, close=response.close,
                     content_type=response.headers.get("Content-Type"))

    def close(self) -> None:
        self.session.close()
