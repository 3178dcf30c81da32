"""``czb models build`` and ``czb models fetch-weights``: model images and staged weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from czb.cli.common import (
    ConfigDirs,
    DebugOption,
    _catalog,
    _console,
    _fail,
    _guarded,
    _one_line,
    _safe,
)


def models_build(
    name: Annotated[str, typer.Argument(help="A docker model, e.g. scvi.")],
    base_image: Annotated[
        Optional[str], typer.Option(help="BASE_IMAGE build argument (a CUDA runtime for GPUs; a local base offline).")
    ] = None,
    torch: Annotated[Optional[str], typer.Option(help="TORCH_SPEC build argument, e.g. torch==2.13.0.")] = None,
    find_links: Annotated[
        Optional[Path], typer.Option(help="Folder of local wheels copied into the build [default: PIP_FIND_LINKS].")
    ] = None,
    tag: Annotated[Optional[str], typer.Option(help="Image tag [default: the spec's image].")] = None,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Build a model's image from its container folder (its Dockerfile, else czb's template)."""

    def body():
        from rich.text import Text

        from czb.models.docker.images import build_model_image

        spec = _catalog(config_dir).model(name)
        if spec.kind != "docker":
            _fail(f"{name} is a {spec.kind} model; only docker models have images", 2)
        err = _console(stderr=True)
        image = build_model_image(
            spec, base_image=base_image, torch_spec=torch, find_links=find_links, tag=tag,
            log=lambda line: err.print(Text(f"  | {_one_line(line)}", style="dim"), soft_wrap=True),
        )
        _console().print(_safe(f"{name}: built {image.tag} ({image.id})"), soft_wrap=True)

    _guarded(body)



def models_fetch_weights(
    names: Annotated[list[str], typer.Argument(help="Docker models, or 'all'.")],
    variant: Annotated[Optional[str], typer.Option(help="Weights variant [default: the model's default].")] = None,
    all_variants: Annotated[bool, typer.Option("--all-variants", help="Stage every variant.")] = False,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Stage published weights into the cache (containers have no network)."""

    def body():
        from czb.models.weights import stage_weights

        for spec in _catalog(config_dir).resolve("model", names):
            if spec.kind != "docker":
                continue
            chosen = list(spec.variants) if all_variants else [variant]
            for v in chosen:
                staged = stage_weights(spec, v, progress=True)
                where = staged.path or "no weights needed"
                licence = f" (licence: {staged.license})" if staged.license else ""
                _console().print(_safe(f"{spec.name}/{staged.variant}: {where}{licence}"), soft_wrap=True)

    _guarded(body)
