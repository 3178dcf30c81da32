"""``czb datasets fetch``: download catalog datasets into the cache."""

from __future__ import annotations

from typing import Annotated

import typer

from czb.cli.common import ConfigDirs, DebugOption, _catalog, _console, _guarded, _safe


def datasets_fetch(
    names: Annotated[list[str], typer.Argument(help="Dataset names, or 'all'.")],
    config_dir: ConfigDirs = None,
    debug: DebugOption = False,
) -> None:
    """Download datasets into the cache (CZB_CACHE_DIR) so later runs work offline."""

    def body():
        from czb.io.fetch import fetch, is_remote

        catalog = _catalog(config_dir)
        for spec in catalog.resolve("dataset", names):
            if not is_remote(spec.uri):
                _console(stderr=True).print(_safe(f"{spec.name}: nothing to fetch ({spec.uri})"), soft_wrap=True)
                continue
            path = fetch(spec.uri, sha256=spec.sha256, progress=True)
            _console().print(_safe(f"{spec.name}: {path}"), soft_wrap=True)

    _guarded(body)
