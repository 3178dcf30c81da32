"""Downloading from S3 with ``boto3``, anonymously (imported when a client is made)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from czb.core.errors import FetchError
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


class S3Source(Source):
    def __init__(self, uri: str):
        parts = urlsplit(uri)
        self.uri, self.bucket, self.key = uri, parts.netloc, parts.path.lstrip("/")
        if not self.bucket or not self.key:
            msg = f"{uri}: an S3 URI must look like s3://bucket/key"
            raise FetchError(msg)
        self._client: Any = None
        import botocore.exceptions
        import urllib3.exceptions

        self.errors = botocore.exceptions
        self.interrupted = (
            botocore.exceptions.BotoCoreError,
            urllib3.exceptions.HTTPError,
            OSError,
        )

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            import botocore
            from botocore.config import Config

            from czb.core.settings import get_settings

            config = Config(
                signature_version=botocore.UNSIGNED,  # public buckets: no credentials used
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"max_attempts": 3, "mode": "standard"},
            )
            try:
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=get_settings().s3_endpoint_url, config=config
                )
            except self.errors.BotoCoreError as e:  # e.g. AWS_PROFILE names a missing profile
                msg = f"cannot fetch {self.uri}: {short_cause(e)}"
                raise FetchError(msg) from None
        return self._client

    def _explain(self, error: Exception) -> Unreachable:
        missing = False
        if isinstance(error, self.errors.ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("404", "NotFound"):
                code = self._not_found_code()
            cause = {
                "NoSuchKey": f"no such key {self.key!r} in bucket {self.bucket!r} (NoSuchKey)",
                "NoSuchBucket": f"no such bucket {self.bucket!r} (NoSuchBucket)",
                "404": "not found (HTTP 404)",
            }.get(code)
            if cause is None and (status == 403 or code in ("403", "AccessDenied", "Forbidden")):
                cause = "access denied (czb reads S3 anonymously, so the object must be public)"
            if cause is None:
                message = error.response.get("Error", {}).get("Message") or ""
                cause = f"{code}: {message}" if message else f"{code} (HTTP {status})"
            # 4xx: S3 answered that it has no such object for us; 5xx: it failed.
            missing = (isinstance(status, int) and 400 <= status < 500) or code in (
                "404", "403", "NoSuchKey", "NoSuchBucket", "AccessDenied", "Forbidden")
        else:
            cause = short_cause(error)
        return Unreachable(self.uri, cause, missing=missing)

    def _not_found_code(self) -> str:
        # HeadObject has no body, so a 404 does not say whether the bucket or the key is
        # missing; a one-byte GET does.
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key, Range="bytes=0-0")
        except self.errors.ClientError as e:
            return str(e.response.get("Error", {}).get("Code", "404"))
        except Exception:  # noqa: BLE001 - only refining an error message
            return "404"
        response["Body"].close()
        return "404"

    def head(self) -> Remote:
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self.key)
        except (self.errors.ClientError, self.errors.BotoCoreError) as e:
            raise self._explain(e) from None
        modified = response.get("LastModified")
        return Remote(
            etag=response.get("ETag"),
            size=response.get("ContentLength"),
            last_modified=modified.isoformat() if modified is not None else None,
        )

    def get(self, offset: int, remote: Remote) -> Body:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if offset:
            kwargs["Range"] = f"bytes={offset}-"
        if remote.etag:
            kwargs["IfMatch"] = remote.etag  # fail rather than splice two versions together
        try:
            response = self.client.get_object(**kwargs)
        except self.errors.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise RemoteChanged from None
            raise self._explain(e) from None
        except self.errors.BotoCoreError as e:
            raise self._explain(e) from None
        partial = str(response.get("ContentRange", "")).startswith(f"bytes {offset}-")
        body = response["Body"]
        return Body(partial=partial, chunks=body.iter_chunks(CHUNK), close=body.close,
                     content_type=response.get("ContentType"))
