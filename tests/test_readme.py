"""Every ``czb`` command in README.md's command blocks runs as written, offline, and so
does every Python block.

A command whose comment holds a marker (:data:`NEEDS`) needs more than this repository
offline (the network, a Docker engine, a GPU, a cluster, a file of the reader's) and is
only checked to parse; every other one runs in document order in one fresh folder (so
``czb report`` finds what an earlier ``czb run`` wrote) and must exit 0.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import invoke

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS = ("[network]", "[docker]", "[gpu]", "[cluster]", "[your file]")


def readme_commands(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, command, runnable offline)`` of every ``czb`` command in the
    ``bash`` blocks of ``text`` (continuation lines joined)."""
    out = []
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        first = text[: block.start()].count("\n") + 2
        joined = block.group(1).replace("\\\n", " ")
        for offset, line in enumerate(joined.splitlines()):
            command, _, comment = line.partition("#")
            if command.strip().startswith("czb "):
                out.append((first + offset, command.strip(), not any(m in comment for m in NEEDS)))
    return out


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_runnable_commands():
    runnable = [c for _, c, ok in COMMANDS if ok]
    assert len(runnable) >= 10, runnable
    assert any(c.startswith("czb run --model pca --task clustering --dataset pbmc68k_reduced") for c in runnable)


def test_every_offline_readme_command_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CZB_OUTPUT_DIR")  # the README names the default folder
    for line, command, runnable in COMMANDS:
        args = shlex.split(command)[1:]
        if not runnable:
            assert args and args[0] in ("run", "bench", "report", "list", "datasets", "models"), (line, command)
            continue
        result = invoke(*args)
        assert result.exit_code == 0, f"README.md:{line}: {command}\n{result.output[-3000:]}"
        assert "Traceback" not in result.output, f"README.md:{line}: {command}"


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks
    for block in blocks:  # top-level blocks (the contract's indented snippet has its own test)
        exec(compile(block, str(README), "exec"), {})  # noqa: S102 - the README's own example


def test_readme_links_to_files_that_exist():
    targets = re.findall(r"\]\(([^)#:]+)\)", README.read_text())
    assert "docs/python_api.md" in targets
    missing = [t for t in targets if not (README.parent / t).exists()]
    assert not missing, missing


@pytest.mark.parametrize("text", ["```bash\nczb list tasks   # fine\nczb run -d x   # [network]\n```\n"])
def test_markers_are_read_from_comments(text):
    assert readme_commands(text) == [(2, "czb list tasks", True), (3, "czb run -d x", False)]
