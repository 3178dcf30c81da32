"""User settings, read from ``CZB_*`` environment variables.

==========================  ==========================================================
``CZB_CACHE_DIR``           where downloaded datasets live (default: the platform's
                            user cache dir, e.g. ``~/.cache/czb``)
``CZB_CONFIG_PATH``         extra spec folders, separated by ``os.pathsep``; their
                            entries override the bundled ones
``CZB_OFFLINE``             ``1`` to never touch the network (use the cache only)
``CZB_OUTPUT_DIR``          default store of ``czb run`` (``./czb-results``)
``CZB_N_JOBS``              worker processes/threads for scoring (default: all cores)
``CZB_S3_ENDPOINT_URL``     S3 endpoint for ``s3://`` URIs (default: AWS); for a
                            mirror or a local S3-compatible server
``CZB_MAX_SPEC_MB``         largest YAML spec file czb reads (default: 1 MB)
``CZB_MAX_UNPACK_RATIO``    a weights archive may unpack to this many times its own
                            size (default: 20) ...
``CZB_MIN_UNPACK_MB``       ... and always to this many MB (default: 100)
``CZB_MAX_UNPACK_FILES``    most members a weights archive may hold (default: 100,000)
==========================  ==========================================================

A value that makes no sense (``CZB_N_JOBS=0``) is a :class:`~czb.core.errors.SettingsError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("czb", appauthor=False))


class Settings(BaseSettings):
    """czb's settings; every field can be set with a ``CZB_``-prefixed environment variable."""

    model_config = SettingsConfigDict(env_prefix="CZB_", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    config_path: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    offline: bool = False
    output_dir: Path = Path("czb-results")
    n_jobs: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    s3_endpoint_url: str | None = None
    max_spec_mb: float = Field(default=1.0, gt=0)
    max_unpack_ratio: float = Field(default=20.0, gt=0)
    min_unpack_mb: float = Field(default=100.0, ge=0)
    max_unpack_files: int = Field(default=100_000, ge=1)

    @field_validator("config_path", mode="before")
    @classmethod
    def _split_path_list(cls, value: object) -> object:
        # An env var arrives as one os.pathsep-separated string, like PATH.
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p]
        return value


def get_settings() -> Settings:
    """Read the settings from the environment now (not cached, so tests can monkeypatch).

    Raises
    ------
    SettingsError
        A ``CZB_*`` variable has a value that makes no sense (named in the message).
    """
    from czb.core.errors import SettingsError

    try:
        return Settings()
    except ValidationError as e:
        problems = [f"CZB_{str(err['loc'][0]).upper()}: {err['msg']}" if err["loc"] else err["msg"]
                    for err in e.errors()]
        msg = "invalid setting " + "; ".join(problems)
        raise SettingsError(msg) from None
