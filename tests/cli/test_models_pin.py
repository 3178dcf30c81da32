"""``czb models pin``, ``czb models fetch-weights --repin`` and the sha256 states of
``czb list models``.

Weights are local files in tmp folders or files of the loopback HTTP server of
``tests/conftest.py``; nothing touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import assert_clean_exit, assert_clean_failure, invoke, sha256
from conftest import published_file as published
from conftest import write_text as write

from czb.models.weight_specs import spec_yaml
from czb.specs.catalog import Catalog


@pytest.fixture
def config(tmp_path) -> tuple[Path, dict[str, Path]]:
    """A spec folder with model ``tiny``: variant ``v`` without sha256s (the default),
    ``checked`` with its sha256 published, ``other`` without, and ``random`` without
    weights."""
    src = tmp_path / "published"
    files = {"model": published(src, "model.pt", b"model weights"), "vocab": published(src, "vocab.json", b"[]"),
             "other": published(src, "other.pt", b"other weights")}
    folder = write(tmp_path / "cfg", "models.yaml", f"""\
        models:
          tiny:
            kind: docker
            image: czb-test/tiny:1
            container: tiny
            description: a test model
            default_variant: v
            variants:
              v:
                license: MIT
                weights:
                  - {{uri: {files["model"]}, path: ckpt/model.pt}}
                  - {{uri: {files["vocab"].as_uri()}, path: vocab.json}}
              checked:
                weights:
                  - {{uri: {files["model"]}, path: model.pt, sha256: {sha256(b"model weights")}}}
              other:
                weights:
                  - {{uri: {files["other"]}, path: other.pt}}
              random:
                description: no weights
        """).parent
    return folder, files


def listed(*config_dirs: Path) -> dict:
    args = [a for d in config_dirs for a in ("--config-dir", d)]
    result = invoke("list", "models", "--format", "json", *args)
    assert_clean_exit(result, 0)
    return {row["name"]: row for row in json.loads(result.stdout)}


# --------------------------------------------------------------------------- czb list models


def test_list_models_shows_published_pinned_and_unverified(config):
    folder, _ = config
    assert listed(folder)["tiny"]["checksums"] == {
        "v": "unverified", "checked": "published", "other": "unverified", "random": "no weights"}
    assert_clean_exit(invoke("models", "fetch-weights", "tiny", "--config-dir", folder), 0)
    assert listed(folder)["tiny"]["checksums"] == {
        "v": "pinned", "checked": "published", "other": "unverified", "random": "no weights"}
    assert listed(folder)["pca"]["checksums"] == {}
    table = invoke("list", "models", "--config-dir", folder, env={"COLUMNS": "80"})
    assert_clean_exit(table, 0)
    assert "(1 pinned, 1 published, 1 unverified)" in " ".join(table.stdout.split())
    assert "(unverified)" in table.stdout  # the bundled models publish no sha256 for every file
    assert "czb models pin MODEL" in " ".join(table.stdout.split())


def test_fetch_weights_says_how_the_sha256s_were_checked(config):
    folder, _ = config
    result = invoke("models", "fetch-weights", "tiny", "--all-variants", "--config-dir", folder)
    assert_clean_exit(result, 0)
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines()}
    assert "licence: MIT; sha256 pinned in the cache on first fetch" in lines["tiny/v"]
    assert "sha256 checked against the spec" in lines["tiny/checked"]
    assert "no weights needed" in lines["tiny/random"]


# --------------------------------------------------------------------------- fetch-weights --repin


def test_a_changed_file_is_refused_with_the_repin_command_and_repin_accepts_it(config):
    folder, files = config
    assert_clean_exit(invoke("models", "fetch-weights", "tiny", "--config-dir", folder), 0)
    files["model"].write_bytes(b"model weights, edited")
    staged = Path(os.environ["CZB_CACHE_DIR"]) / "weights" / "tiny" / "v"
    (staged / "ckpt" / "model.pt").unlink()  # the staged copy is gone: staging reads the source again
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", folder)
    line = assert_clean_failure(result, 1)
    assert "model.pt" in line and "is not the file pinned when it was first fetched" in line
    assert "edited" not in result.output
    hint = [ln for ln in result.stderr.splitlines() if ln.startswith("hint:")]
    assert hint == ["hint: if the new file is the one you want, accept it with `czb models fetch-weights tiny "
                    "--variant v --repin`; `czb models pin tiny --variant v` then writes it into a spec"]
    assert_clean_exit(invoke("models", "fetch-weights", "tiny", "--variant", "v", "--repin", "--config-dir", folder), 0)
    assert (staged / "ckpt" / "model.pt").read_bytes() == b"model weights, edited"


@pytest.mark.network
def test_repin_of_a_replaced_download_through_the_command_line(tmp_path, file_server):
    file_server.files["/m/w.bin"] = b"first"
    folder = write(tmp_path / "cfg", "models.yaml", f"""\
        models:
          tiny: {{kind: docker, image: "czb-test/tiny:1", container: tiny, default_variant: v,
                  variants: {{v: {{weights: [{{uri: "{file_server.url('/m/w.bin')}", path: w.bin}}]}}}}}}
        """).parent
    assert_clean_exit(invoke("models", "fetch-weights", "tiny", "--config-dir", folder), 0)
    file_server.files["/m/w.bin"] = b"second"
    out = tmp_path / "pinned"
    (Path(os.environ["CZB_CACHE_DIR"]) / "weights" / "tiny" / "v.json").unlink()  # the manifest is gone
    line = assert_clean_failure(invoke("models", "pin", "tiny", "--output-dir", out, "--config-dir", folder), 1)
    assert "is not the file pinned" in line and not out.exists()
    assert_clean_exit(invoke("models", "fetch-weights", "tiny", "--repin", "--config-dir", folder), 0)
    assert_clean_exit(invoke("models", "pin", "tiny", "--output-dir", out, "--config-dir", folder), 0)
    spec = Catalog.load([folder, out]).model("tiny")
    assert spec.variants["v"].weights[0].sha256 == sha256(b"second")


# --------------------------------------------------------------------------- czb models pin


def test_pin_writes_a_spec_that_loads_back_with_the_staged_sha256s(config, tmp_path):
    folder, files = config
    out = tmp_path / "lab-specs"
    result = invoke("models", "pin", "tiny", "--output-dir", out, "--config-dir", folder)  # stages first
    assert_clean_exit(result, 0)
    written = out / "tiny.yaml"
    assert f"tiny: pinned v in {written}" in " ".join(result.stderr.split())
    assert written.read_text().startswith("# czb models pin tiny: the sha256 of each weight file of variant v")
    original = Catalog.load([folder]).model("tiny")
    pinned = Catalog.load([folder, out]).model("tiny")  # the pinned file replaces the spec
    assert pinned.source == written
    assert [w.sha256 for w in pinned.variants["v"].weights] == [sha256(b"model weights"), sha256(b"[]")]
    assert pinned.variants["other"].weights[0].sha256 is None  # not asked for
    strip = {"variants": {"v": {"weights": {"__all__": {"sha256"}}}}}
    assert pinned.model_dump(exclude=strip) == original.model_dump(exclude=strip)
    assert listed(folder, out)["tiny"]["checksums"]["v"] == "published"
    # The staged weights are still the pinned spec's: nothing is staged again.
    manifest = Path(os.environ["CZB_CACHE_DIR"]) / "weights" / "tiny" / "v.json"
    before = manifest.stat().st_mtime_ns
    assert_clean_exit(invoke("models", "fetch-weights", "tiny", "--config-dir", folder, "--config-dir", out), 0)
    assert manifest.stat().st_mtime_ns == before


def test_pin_all_variants_to_stdout(config):
    folder, files = config
    result = invoke("models", "pin", "tiny", "--all-variants", "--config-dir", folder)
    assert_clean_exit(result, 0)
    document = yaml.safe_load(result.stdout)
    variants = document["models"]["tiny"]["variants"]
    assert [w["sha256"] for w in variants["v"]["weights"]] == [sha256(b"model weights"), sha256(b"[]")]
    assert variants["checked"]["weights"][0]["sha256"] == sha256(b"model weights")
    assert variants["other"]["weights"][0]["sha256"] == sha256(b"other weights")
    assert document["models"]["tiny"]["default_variant"] == "v" and "random" in variants


def test_pin_never_overwrites_without_force(config, tmp_path):
    folder, _ = config
    target = tmp_path / "out" / "frozen.yaml"
    target.parent.mkdir()
    target.write_text("# my own notes\n")
    result = invoke("models", "pin", "tiny", "--output", target, "--config-dir", folder)
    line = assert_clean_failure(result, 2)
    assert str(target) in line and "refusing to overwrite" in line and "--force" in line
    assert target.read_text() == "# my own notes\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["frozen.yaml"]  # no temporary file left
    assert not (Path(os.environ["CZB_CACHE_DIR"]) / "weights").exists()  # refused before staging anything
    assert_clean_exit(invoke("models", "pin", "tiny", "--output", target, "--force", "--config-dir", folder), 0)
    assert Catalog.load([target.parent]).model("tiny").variants["v"].weights[0].sha256 == sha256(b"model weights")
    assert sorted(p.name for p in target.parent.iterdir()) == ["frozen.yaml"]


@pytest.mark.parametrize("args, message", [
    (["--output", "{tmp}/pinned.txt"], "a spec file is named .yaml or .yml"),
    (["--output", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/a.yaml", "--output-dir", "{tmp}"], "--output and --output-dir: give one of them"),
    (["--variant", "v", "--all-variants"], "--variant and --all-variants: give one of them"),
    (["--variant", "whole_humann"], "has no weights variant 'whole_humann'"),
    (["--variant", "random"], "has no weights to pin"),
])
def test_pin_refuses_bad_usage(config, tmp_path, args, message):
    folder, _ = config
    args = [a.format(tmp=tmp_path) for a in args]
    line = assert_clean_failure(invoke("models", "pin", "tiny", *args, "--config-dir", folder), 2)
    assert message in line
    assert not (tmp_path / "a.yaml").exists() and not (tmp_path / "pinned.txt").exists()


def test_pin_refuses_a_baseline_and_an_unknown_model():
    assert "only docker models have weights" in assert_clean_failure(invoke("models", "pin", "pca"), 2)
    assert "did you mean 'scgpt'" in assert_clean_failure(invoke("models", "pin", "scgptt"), 2)


def test_pin_refuses_a_folder_where_another_file_defines_the_model(config):
    folder, _ = config
    line = assert_clean_failure(invoke("models", "pin", "tiny", "--output-dir", folder, "--config-dir", folder), 2)
    assert "models.yaml defines model tiny too" in line
    assert sorted(p.name for p in folder.iterdir()) == ["models.yaml"]


def test_pin_offline_without_a_cached_download_names_what_to_do(tmp_path, monkeypatch):
    folder = write(tmp_path / "cfg", "models.yaml", """\
        models:
          tiny: {kind: docker, image: "czb-test/tiny:1", container: tiny, default_variant: v,
                 variants: {v: {weights: [{uri: "https://weights.invalid/w.bin", path: w.bin}]}}}
        """).parent
    monkeypatch.setenv("CZB_OFFLINE", "1")
    result = invoke("models", "pin", "tiny", "--output-dir", tmp_path / "out", "--config-dir", folder)
    line = assert_clean_failure(result, 1)
    assert "https://weights.invalid/w.bin is not in the cache" in line and "offline" in line
    assert any(ln.startswith("hint:") for ln in result.stderr.splitlines())
    assert not (tmp_path / "out" / "tiny.yaml").exists()


def test_pin_writes_a_container_beside_the_users_spec_as_an_absolute_path(tmp_path):
    weights = published(tmp_path / "w", "w.bin", b"w")
    folder = write(tmp_path / "mine", "models.yaml", f"""\
        models:
          mymodel: {{kind: docker, image: "czb-test/mine:1", container: build, default_variant: v,
                     variants: {{v: {{weights: [{{uri: "{weights}", path: w.bin}}]}}}}}}
        """).parent
    write(folder / "build", "entrypoint.py", "")
    out = tmp_path / "elsewhere"
    assert_clean_exit(invoke("models", "pin", "mymodel", "--output-dir", out, "--config-dir", folder), 0)
    spec = Catalog.load([out]).model("mymodel")
    assert spec.container == str((folder / "build").resolve())
    assert spec.container_dir() == (folder / "build").resolve()


def test_every_bundled_docker_spec_round_trips_through_a_spec_file():
    for spec in Catalog.load().models.values():
        if spec.kind == "docker":
            document = yaml.safe_load(spec_yaml(spec, list(spec.variants)))  # checks the round trip itself
            assert document["models"][spec.name]["container"] == spec.container  # bundled: kept as a name
