"""The sha256s of staged weights (czb.models.weights): recorded in the manifest, checked
file by file on reuse, and pinned on first fetch (trust on first use).

Weights come from local files in tmp folders and from the loopback HTTP server of
``tests/conftest.py``; nothing touches the network.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import published_file, sha256

from czb.core.errors import EmbeddingError, EmbeddingWarning, FetchError
from czb.models.weight_specs import checksum_states, pinned_spec
from czb.models.weights import directory_checksum, resolve_weights, stage_weights, staged_path
from czb.specs.schema import ModelSpec

SECRET = b"CONTENT-3f9a-never-in-messages"


def cache() -> Path:
    return Path(os.environ["CZB_CACHE_DIR"])


def pins_file(variant: str = "v", model: str = "tiny") -> Path:
    return cache() / "weights" / ".pins" / model / f"{variant}.json"


def manifest(variant: str = "v", model: str = "tiny") -> dict:
    return json.loads((cache() / "weights" / model / f"{variant}.json").read_text())


def docker_spec(variants: dict, default: str = "v") -> ModelSpec:
    return ModelSpec(name="tiny", kind="docker", image="czb-test/tiny:1", container="tiny",
                     default_variant=default, variants=variants)


def targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    path.chmod(0o644)
    return path


@pytest.fixture
def local(tmp_path) -> tuple[ModelSpec, dict[str, Path]]:
    """A variant of three local files: one with a sha256 in its spec, one without, and an
    archive without one."""
    src = tmp_path / "published"
    files = {
        "ckpt": published_file(src, "model.pt", b"checkpoint" * 50),
        "vocab": published_file(src, "vocab.json", b'["CD4", "CD8A"]'),
        "tar": targz(src / "extra.tar.gz", {"extra/a.txt": b"alpha", "extra/b/c.txt": b"gamma"}),
    }
    spec = docker_spec({"v": {"weights": [
        {"uri": str(files["ckpt"]), "path": "ckpt/model.pt", "sha256": sha256(files["ckpt"].read_bytes())},
        {"uri": files["vocab"].as_uri(), "path": "vocab.json"},
        {"uri": str(files["tar"]), "path": "extra", "extract": True},
    ]}})
    return spec, files


# --------------------------------------------------------------------------- the manifest's sha256s


def test_manifest_records_the_sha256_of_every_file_and_how_it_was_checked(local):
    spec, files = local
    staged = stage_weights(spec)
    recorded = manifest()
    assert [f["sha256"] for f in recorded["files"]] == [sha256(files[k].read_bytes()) for k in ("ckpt", "vocab", "tar")]
    assert [f["verified_by"] for f in recorded["files"]] == ["spec", "first fetch", "first fetch"]
    # Every staged file, the archive's members included, by its own sha256.
    assert recorded["hashes"] == {
        "ckpt/model.pt": sha256(b"checkpoint" * 50), "vocab.json": sha256(b'["CD4", "CD8A"]'),
        "extra/extra/a.txt": sha256(b"alpha"), "extra/extra/b/c.txt": sha256(b"gamma"),
    }
    assert recorded["checksum"] == staged.checksum == directory_checksum(staged.path)
    # The two files without a sha256 in the spec are pinned; the one with is recorded too.
    pins = json.loads(pins_file().read_text())["files"]
    assert {uri: p["sha256"] for uri, p in pins.items()} == {
        str(files["ckpt"]): sha256(files["ckpt"].read_bytes()),
        files["vocab"].as_uri(): sha256(files["vocab"].read_bytes()),
        str(files["tar"]): sha256(files["tar"].read_bytes()),
    }
    assert all(p["pinned_at"] for p in pins.values())


def test_pins_are_written_once_and_not_rewritten_by_reuse(local):
    spec, _ = local
    stage_weights(spec)
    before = pins_file().stat()
    stage_weights(spec)
    assert pins_file().stat().st_mtime_ns == before.st_mtime_ns and pins_file().stat().st_ino == before.st_ino


# --------------------------------------------------------------------------- reuse: file by file


def _edit_in_place(path: Path, data: bytes) -> None:
    """Same size, mtime put back: only the ctime (and the content) tell."""
    info = path.stat()
    assert len(data) == info.st_size
    path.chmod(0o644)
    path.write_bytes(data)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


@pytest.mark.parametrize("change, named", [
    (lambda d: _edit_in_place(d / "extra" / "extra" / "a.txt", SECRET[:5]), "'extra/extra/a.txt' no longer matches"),
    (lambda d: (d / "extra" / "planted.bin").write_bytes(SECRET), "'extra/planted.bin' was added"),
    (lambda d: (d / "vocab.json").unlink(), "'vocab.json' is missing"),
])
def test_a_changed_staged_file_is_named_refused_by_a_run_and_staged_again(local, change, named):
    spec, _ = local
    staged = stage_weights(spec)
    change(staged.path)
    with pytest.raises(EmbeddingError) as excinfo:
        resolve_weights(spec)
    message = str(excinfo.value)
    assert named in message and "changed since they were staged" in message
    assert "czb models fetch-weights tiny --variant v" in message and "\n" not in message
    assert SECRET.decode() not in message and "alpha" not in message
    with pytest.warns(EmbeddingWarning, match=re.escape(named)):
        again = stage_weights(spec)
    assert again.checksum == staged.checksum and resolve_weights(spec) == again
    assert (again.path / "extra" / "extra" / "a.txt").read_bytes() == b"alpha"


def test_a_touched_file_with_the_same_content_is_accepted_and_its_stamp_refreshed(local):
    spec, _ = local
    staged = stage_weights(spec)
    vocab = staged.path / "vocab.json"
    os.utime(vocab, ns=(0, 0))  # new mtime and ctime, same bytes
    assert resolve_weights(spec) == staged
    stamps = manifest()["stamps"]["vocab.json"]
    assert stamps[2] == 0  # the stamp recorded again: the next check reads nothing


def test_only_files_whose_stamps_changed_are_hashed_again(local, monkeypatch):
    from czb.models import weights as weights_module

    spec, _ = local
    staged = stage_weights(spec)
    os.utime(staged.path / "vocab.json", ns=(0, 0))
    hashed = []
    real = weights_module.file_sha256
    monkeypatch.setattr(weights_module, "file_sha256", lambda p: hashed.append(Path(p).name) or real(p))
    assert resolve_weights(spec) == staged
    assert hashed == ["vocab.json"]


def test_weights_staged_for_other_files_are_staged_again(local, tmp_path):
    spec, files = local
    stage_weights(spec)
    other = published_file(tmp_path / "other", "vocab.json", b'["CD3E"]')
    data = spec.model_dump()
    data["variants"]["v"]["weights"][1]["uri"] = str(other)
    changed = ModelSpec(**data)
    with pytest.raises(EmbeddingError, match="were staged from other files than its spec names now"):
        resolve_weights(changed)
    with pytest.warns(EmbeddingWarning, match="staged from other files than the spec names now"):
        staged = stage_weights(changed)
    assert (staged.path / "vocab.json").read_bytes() == b'["CD3E"]'


def test_a_manifest_without_file_sha256s_is_staged_again_and_pinned(local):
    spec, files = local
    stage_weights(spec)
    path = cache() / "weights" / "tiny" / "v.json"
    old = manifest()
    for entry, item in zip(old["files"], spec.variants["v"].weights):  # as an older czb wrote it:
        entry["sha256"] = item.sha256  # the spec's sha256, or none
        del entry["verified_by"]
    del old["hashes"]
    path.write_text(json.dumps(old))
    pins_file().unlink()
    assert resolve_weights(spec).checksum == old["checksum"]  # a run still accepts it (by checksum)
    with pytest.warns(EmbeddingWarning, match="older czb"):
        stage_weights(spec)
    assert all(isinstance(f["sha256"], str) for f in manifest()["files"]) and pins_file().is_file()


def test_files_staged_by_an_older_czb_are_pinned_from_their_staged_copies(local, monkeypatch):
    from czb.io import fetch as fetch_module

    spec, files = local
    data = spec.model_dump()
    data["variants"]["v"]["weights"] = data["variants"]["v"]["weights"][:2]  # no archive
    spec = ModelSpec(**data)
    staged = stage_weights(spec)
    path = cache() / "weights" / "tiny" / "v.json"
    old = manifest()
    for entry, item in zip(old["files"], spec.variants["v"].weights):
        entry["sha256"] = item.sha256
        del entry["verified_by"]
    del old["hashes"]
    path.write_text(json.dumps(old))
    pins_file().unlink()
    monkeypatch.setattr(fetch_module, "fetch", lambda *a, **k: pytest.fail("staged again"))
    assert stage_weights(spec) == staged  # no warning, nothing fetched
    assert [f["sha256"] for f in manifest()["files"]] == [sha256(files[k].read_bytes()) for k in ("ckpt", "vocab")]
    pinned = json.loads(pins_file().read_text())["files"]
    assert pinned[files["vocab"].as_uri()]["sha256"] == sha256(files["vocab"].read_bytes())


# --------------------------------------------------------------------------- trust on first use


@pytest.fixture
def served(file_server):
    """A variant of two files on the loopback server, neither with a sha256 in its spec."""
    file_server.files["/w/model.bin"] = b"weights, first edition"
    file_server.files["/w/vocab.txt"] = b"CD4\nCD8A\n"
    spec = docker_spec({"v": {"weights": [
        {"uri": file_server.url("/w/model.bin"), "path": "model.bin"},
        {"uri": file_server.url("/w/vocab.txt"), "path": "vocab.txt"},
    ]}})
    return spec, file_server


@pytest.mark.network
def test_a_changed_download_is_refused_until_repinned(served):
    spec, server = served
    first = stage_weights(spec)
    pinned = json.loads(pins_file().read_text())["files"]
    assert pinned[server.url("/w/model.bin")]["sha256"] == sha256(b"weights, first edition")
    # The publisher replaces the file; the staged folder is removed (evicted, or a new machine's cache).
    server.files["/w/model.bin"] = b"weights, SECOND edition"
    shutil.rmtree(cache() / "weights" / "tiny")
    with pytest.raises(FetchError) as excinfo:
        stage_weights(spec)
    message = str(excinfo.value)
    assert server.url("/w/model.bin") in message and "is not the file pinned when it was first fetched" in message
    assert sha256(b"weights, SECOND edition") in message and sha256(b"weights, first edition") in message
    assert excinfo.value.hint == ("if the new file is the one you want, accept it with `czb models fetch-weights "
                                  "tiny --variant v --repin`; `czb models pin tiny --variant v` then writes it "
                                  "into a spec")
    assert "SECOND" not in message and "\n" not in message
    assert not staged_path(spec, "v").exists()
    assert json.loads(pins_file().read_text())["files"] == pinned  # the pins are kept
    with pytest.raises(FetchError, match="is not the file pinned"):  # and again: the cached download is not trusted
        stage_weights(spec)
    accepted = stage_weights(spec, repin=True)
    assert (accepted.path / "model.bin").read_bytes() == b"weights, SECOND edition"
    assert accepted.checksum != first.checksum
    repinned = json.loads(pins_file().read_text())["files"]
    assert repinned[server.url("/w/model.bin")]["sha256"] == sha256(b"weights, SECOND edition")
    assert repinned[server.url("/w/vocab.txt")] == pinned[server.url("/w/vocab.txt")]
    assert [f["verified_by"] for f in manifest()["files"]] == ["repin", "repin"]
    assert stage_weights(spec) == accepted


@pytest.mark.network
def test_a_tampered_staged_folder_restaged_from_a_changed_remote_is_refused(served):
    spec, server = served
    staged = stage_weights(spec)
    (staged.path / "model.bin").chmod(0o644)
    (staged.path / "model.bin").write_bytes(b"tampered")
    server.files["/w/model.bin"] = b"replaced upstream"
    with pytest.warns(EmbeddingWarning, match="'model.bin'"), pytest.raises(FetchError, match="--repin"):
        stage_weights(spec)


@pytest.mark.network
def test_the_spec_sha256_wins_over_a_pin(served):
    spec, server = served
    stage_weights(spec)
    server.files["/w/model.bin"] = b"weights, SECOND edition"
    data = spec.model_dump()
    data["variants"]["v"]["weights"][0]["sha256"] = sha256(b"weights, SECOND edition")
    published = ModelSpec(**data)
    with pytest.warns(EmbeddingWarning, match=r"another uri, path or sha256"):
        staged = stage_weights(published)  # the spec names the new file: no --repin needed
    assert (staged.path / "model.bin").read_bytes() == b"weights, SECOND edition"
    assert manifest()["files"][0]["verified_by"] == "spec"
    assert json.loads(pins_file().read_text())["files"][server.url("/w/model.bin")]["sha256"] == \
        sha256(b"weights, SECOND edition")
    data["variants"]["v"]["weights"][0]["sha256"] = sha256(b"weights, first edition")  # a pin cannot override it
    with pytest.warns(EmbeddingWarning), pytest.raises(FetchError, match="sha256 mismatch"):
        stage_weights(ModelSpec(**data))


def test_pins_survive_removing_the_model_folder_and_catch_a_local_change(local):
    spec, files = local
    stage_weights(spec)
    shutil.rmtree(cache() / "weights" / "tiny")
    assert pins_file().is_file()
    files["vocab"].write_bytes(b'["CD4", "CD8B"]')
    with pytest.raises(FetchError, match=r"vocab.json.* is not the file pinned when it was first fetched"):
        stage_weights(spec)
    assert stage_weights(spec, repin=True).path.joinpath("vocab.json").read_bytes() == b'["CD4", "CD8B"]'


def test_a_damaged_pins_file_is_an_error_not_a_fresh_start(local):
    spec, _ = local
    stage_weights(spec)
    shutil.rmtree(cache() / "weights" / "tiny")
    pins_file().write_text("{not json")
    with pytest.raises(FetchError, match=r"weights pins .*v\.json cannot be read .*remove it to pin the files again"):
        stage_weights(spec)
    assert checksum_states(spec) == {"v": "unverified"}  # listing never fails on it
    assert stage_weights(spec, repin=True).path is not None


# --------------------------------------------------------------------------- states and pinned specs


def test_checksum_states(local, tmp_path):
    spec, files = local
    data = spec.model_dump()
    checked = dict(data["variants"]["v"], weights=[data["variants"]["v"]["weights"][0]])
    spec = ModelSpec(**{**data, "variants": {"v": data["variants"]["v"], "checked": checked, "random": {}}})
    assert checksum_states(spec) == {"v": "unverified", "checked": "published", "random": "no weights"}
    stage_weights(spec, "v")
    assert checksum_states(spec) == {"v": "pinned", "checked": "published", "random": "no weights"}


def test_pinned_spec_fills_every_sha256_from_what_was_staged(local):
    spec, files = local
    pinned = pinned_spec(spec)  # stages first
    assert [w.sha256 for w in pinned.variants["v"].weights] == [
        sha256(files[k].read_bytes()) for k in ("ckpt", "vocab", "tar")]
    assert checksum_states(pinned) == {"v": "published"}
    strip = {"variants": {"v": {"weights": {"__all__": {"sha256"}}}}}
    assert pinned.model_dump(exclude=strip) == spec.model_dump(exclude=strip)
    assert stage_weights(pinned) == resolve_weights(spec)  # the staged folder is the pinned spec's
