"""Building a model's image from its container folder (``czb models build``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from czb.specs.schema import ModelSpec

if TYPE_CHECKING:
    from czb.models.docker.engine import ImageInfo, LogSink


def build_model_image(
    spec: ModelSpec,
    *,
    base_image: str | None = None,
    torch_spec: str | None = None,
    find_links: Path | None = None,
    tag: str | None = None,
    log: LogSink | None = None,
) -> ImageInfo:
    """Build a model's image from its container folder (``czb models build``).

    The build context holds ``model/`` (the container folder), ``common/`` (the
    container side of the contract and the bundled models' Dockerfile template),
    ``wheels/`` (``*.whl`` from ``find_links``, e.g. a CPU build of torch) and the host's
    CA bundle. A folder with a ``Dockerfile`` of its own is built with it; any other with
    ``common/Dockerfile``, which installs the folder's requirement files and runs its
    ``entrypoint.py``.

    Parameters
    ----------
    base_image
        ``BASE_IMAGE`` build argument (default: the Dockerfile's, a Python image; a
        CUDA runtime image for GPU use, or a local base for offline tests).
    torch_spec
        ``TORCH_SPEC`` build argument, e.g. ``torch==2.13.0``.
    find_links
        Folder of local wheels (default: ``PIP_FIND_LINKS`` when it is a folder).
    tag
        Image tag (default: the spec's ``image``).
    """
    from czb.models.docker import engine as docker_engine
    from czb.specs.schema import BUNDLED_CONTAINERS_DIR

    folder = spec.container_dir()
    common = BUNDLED_CONTAINERS_DIR / "common"
    dockerfile = "model/Dockerfile" if (folder / "Dockerfile").is_file() else "common/Dockerfile"
    build_args = {}
    if base_image:
        build_args["BASE_IMAGE"] = base_image
    if torch_spec:
        build_args["TORCH_SPEC"] = torch_spec
    if find_links is None and os.environ.get("PIP_FIND_LINKS"):
        candidate = Path(os.environ["PIP_FIND_LINKS"])
        find_links = candidate if candidate.is_dir() else None
    wheels = sorted(Path(find_links).glob("*.whl")) if find_links else []
    ca_bundle = _ca_bundle()
    engine = docker_engine.client()
    return docker_engine.build_image(
        engine,
        context_parts={"model": folder, "common": common},
        dockerfile=dockerfile,
        tag=tag or spec.image,
        build_args=build_args,
        wheels=wheels,
        ca_bundle=ca_bundle,
        log=log,
    )


def _ca_bundle() -> Path | None:
    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None
