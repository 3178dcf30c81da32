"""``czb models build``, ``czb models fetch-weights`` and ``czb models pin``: model images,
staged weights, and specs that freeze the weights' sha256s."""

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
    repin: Annotated[
        bool, typer.Option("--repin", help="Stage again and accept each file without a sha256 in its spec as it is "
                           "published now (it was pinned on its first fetch; a file that changed is refused without "
                           "this).")
    ] = False,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Stage published weights into the cache (containers have no network).

    Each file's sha256 is checked against its spec; a file whose spec gives none is
    pinned in the cache on its first fetch, and must be the same file when staged again.
    """

    def body():
        from czb.models.weight_specs import checksum_states
        from czb.models.weights import stage_weights

        if variant is not None and all_variants:
            _fail("--variant and --all-variants: give one of them", 2)
        for spec in _catalog(config_dir).resolve("model", names):
            if spec.kind != "docker":
                continue
            chosen = list(spec.variants) if all_variants else [variant]
            for v in chosen:
                staged = stage_weights(spec, v, progress=True, repin=repin)
                where = staged.path or "no weights needed"
                notes = [f"licence: {staged.license}"] if staged.license else []
                state = checksum_states(spec).get(staged.variant) if staged.path else None
                if state in SHA256_NOTES:
                    notes.append(SHA256_NOTES[state])
                shown = f"{spec.name}/{staged.variant}: {where}" + (f" ({'; '.join(notes)})" if notes else "")
                _console().print(_safe(shown), soft_wrap=True)

    _guarded(body)


#: What ``fetch-weights`` says of the sha256s of a variant it staged.
SHA256_NOTES = {
    "published": "sha256 checked against the spec",
    "pinned": "sha256 pinned in the cache on first fetch",
}


def models_pin(
    name: Annotated[str, typer.Argument(help="A docker model, e.g. scgpt.")],
    variant: Annotated[Optional[str], typer.Option(help="Weights variant [default: the model's default].")] = None,
    all_variants: Annotated[bool, typer.Option("--all-variants", help="Pin every variant with weights.")] = False,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Spec file to write (.yaml or .yml) [default: stdout].")
    ] = None,
    output_dir: Annotated[
        Optional[Path], typer.Option("--output-dir", help="Spec folder to write MODEL.yaml into (made if need be); "
                                     "pass it as --config-dir afterwards.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Write the model's spec with the sha256 of every weight file filled in from what was staged.

    Stages the weights first where need be (as fetch-weights does; with CZB_OFFLINE=1 only
    from the download cache), so a file that differs from its pin is refused. The file loads with
    --config-dir (or CZB_CONFIG_PATH) and replaces the model's spec czb has; every variant
    is written, the pinned ones with their sha256s.
    """

    def body():
        from czb.core.errors import UsageError
        from czb.models.weight_specs import pinned_spec, spec_target, spec_yaml, write_spec_file

        if variant is not None and all_variants:
            _fail("--variant and --all-variants: give one of them", 2)
        if output is not None and output_dir is not None:
            _fail("--output and --output-dir: give one of them", 2)
        spec = _catalog(config_dir).model(name)
        if spec.kind != "docker":
            msg = f"{name} is a {spec.kind} model; only docker models have weights to pin"
            raise UsageError(msg)
        to_stdout = output is None and output_dir is None
        target = None if to_stdout else spec_target(name, output=output, output_dir=output_dir, force=force)
        variants = [v for v, chosen in spec.variants.items() if chosen.weights] if all_variants else [variant]
        if not variants:
            msg = f"model {name!r} has no weights to pin"
            raise UsageError(msg)
        pinned = pinned_spec(spec, variants, progress=True)
        names = list(dict.fromkeys(pinned.variant(v)[0] for v in variants))
        text = spec_yaml(pinned, names)
        if target is None:
            typer.echo(text, nl=False)
            return
        target = write_spec_file(text, pinned, target, force=force)
        _console(stderr=True).print(_safe(f"{name}: pinned {', '.join(names)} in {target}"), soft_wrap=True)

    _guarded(body)
