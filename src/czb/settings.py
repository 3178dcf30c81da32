"""User settings, read from ``CZB_*`` environment variables.

=======================  ==========================================================
``CZB_CACHE_DIR``        where downloaded datasets live (default: the platform's
                         user cache dir, e.g. ``~/.cache/czb``)
``CZB_CONFIG_PATH``      extra spec folders, separated by ``os.pathsep``; their
                         entries override the bundled ones
``CZB_OFFLINE``          ``1`` to never touch the network (use the cache only)
``CZB_OUTPUT_DIR``       default folder for result JSONs
``CZB_N_JOBS``           worker processes/threads for scoring (default: all cores)
``CZB_S3_ENDPOINT_URL``  S3 endpoint for ``s3://`` URIs (default: AWS); for a
                         mirror or a local S3-compatible server
=======================  ==========================================================
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
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

    @field_validator("config_path", mode="before")
    @classmethod
    def _split_path_list(cls, value: object) -> object:
        # An env var arrives as one os.pathsep-separated string, like PATH.
        if isinstance(value, str):
            return [Path(p) for p in value.split(os.pathsep) if p]
        return value


def get_settings() -> Settings:
    """Read the settings from the environment now (not cached, so tests can monkeypatch)."""
    return Settings()
