"""The package's shape, checked: layers and cycles (import-linter contracts in
pyproject.toml), a light evaluation package, and files short enough to read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "czb"
MAX_LINES = 600

#: What ``czb.evaluation`` must never load: network, containers, terminal UI, clusters, torch.
HEAVY_IO = ("requests", "boto3", "botocore", "docker", "typer", "rich", "ray", "torch", "urllib3")


def test_import_contracts_are_kept():
    """Layers cli → bench|report → pipeline → models → evaluation → data → io → specs → core,
    the light evaluation package, and no cycles between sibling modules."""
    lint_imports = Path(sys.executable).parent / "lint-imports"  # import-linter, a test dependency
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=SRC.parents[1], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_evaluation_loads_no_heavy_io_packages():
    """Importing the evaluation package and every registered metric and task, in a fresh
    interpreter, loads none of the network, container or terminal packages."""
    code = (
        "import json, sys, czb.evaluation, czb.evaluation.registry as r; r.load_all(); "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY_IO)
    assert not heavy, heavy


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_source_files_are_short(path):
    n = len(path.read_text().splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(SRC)}: {n} lines (at most {MAX_LINES})"
