"""Model specs of docker models and staging their weights (czb.specs.schema, czb.models.weights).

Weights come from local files in tmp folders (absolute paths), so nothing touches the
network; archives are built by the tests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from czb.core.errors import EmbeddingError, EmbeddingWarning, FetchError, SpecError
from czb.io import fetch as fetch_module
from czb.models.weights import directory_checksum, resolve_weights, stage_weights, staged_path
from czb.specs import schema as schema_module
from czb.specs.loading import load_spec_file
from czb.specs.schema import ModelSpec, WeightFile, WeightsVariant

TESTS = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def docker_spec(**fields) -> ModelSpec:
    base = {"name": "tiny", "kind": "docker", "image": "czb-test/tiny:1", "container": "tiny"}
    return ModelSpec(**{**base, **fields})


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def make_tar(path: Path, members: dict[str, bytes], *, dirs: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return path


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def published(tmp_path) -> dict[str, Path]:
    """A checkpoint, a tar.gz and a zip, as a model's publisher would offer them."""
    src = tmp_path / "published"
    src.mkdir()
    ckpt = src / "model.pt"
    ckpt.write_bytes(b"\x00\x01weights" * 100)
    ckpt.chmod(0o604)  # readable by others, with a mode staging must not change
    tar = make_tar(src / "vocab.tar.gz", {"vocab/genes.json": b'["CD4"]', "vocab/args.json": b"{}"},
                   dirs=("vocab",))
    zf = make_zip(src / "extra.zip", {"extra/readme.txt": b"hello", "top.txt": b"top"})
    return {"ckpt": ckpt, "tar": tar, "zip": zf}


@pytest.fixture
def spec(published) -> ModelSpec:
    return docker_spec(
        default_variant="v1",
        variants={
            "v1": WeightsVariant(
                license="MIT",
                weights=[
                    WeightFile(uri=str(published["ckpt"]), path="ckpt/best_model.pt",
                               sha256=sha256(published["ckpt"])),
                    WeightFile(uri=str(published["tar"]), path="tokenizer", extract=True),
                    WeightFile(uri=str(published["zip"]), path="more", extract=True),
                ],
            ),
            "random": WeightsVariant(description="no weights: trains on the data"),
        },
    )


# --------------------------------------------------------------------------- spec validation


def test_docker_model_needs_image_and_container():
    with pytest.raises(ValidationError, match="a docker model needs image and container"):
        ModelSpec(name="m", kind="docker")
    with pytest.raises(ValidationError, match="a docker model needs container"):
        ModelSpec(name="m", kind="docker", image="x:1")
    with pytest.raises(ValidationError, match=r"a docker model needs image \["):
        ModelSpec(name="m", kind="docker", container="x")
    spec = docker_spec()
    assert spec.read_only_rootfs is True and spec.variants == {} and spec.default_variant is None
    assert spec.variant() == ("default", WeightsVariant())


def test_default_variant_must_be_one_of_the_variants():
    with pytest.raises(ValidationError, match=r"default_variant 'large' is not one of the variants \(small\)"):
        docker_spec(default_variant="large", variants={"small": {}})
    with pytest.raises(ValidationError, match=r"default_variant is required when variants are given \(small\)"):
        docker_spec(variants={"small": {}})
    with pytest.raises(ValidationError, match=r"not one of the variants \(none\)"):
        docker_spec(default_variant="small")


def test_model_organisms_are_checked():
    with pytest.raises(ValidationError, match=r"unknown organism\(s\) martian"):
        docker_spec(organisms=["human", "martian"])


@pytest.mark.parametrize("path", ["/weights/model.pt", "../model.pt", "a/../../b.pt", "a/..", ""])
def test_weight_file_path_must_stay_inside_the_weights_folder(path):
    with pytest.raises(ValidationError, match="path must be relative and stay inside the weights folder"):
        WeightFile(uri="https://example.org/m.pt", path=path)


@pytest.mark.parametrize("digest", ["abc", "g" * 64, "a" * 63, "a" * 65])
def test_weight_file_sha256_must_be_64_hex_characters(digest):
    with pytest.raises(ValidationError, match="sha256 must be 64 hexadecimal characters"):
        WeightFile(uri="https://example.org/m.pt", path="m.pt", sha256=digest)


def test_weight_file_accepts_nested_paths_and_lowercases_sha256():
    item = WeightFile(uri="s3://b/k", path="ckpt/./model.pt", sha256="AB" * 32)
    assert item.sha256 == "ab" * 32 and item.extract is False


def test_spec_file_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n  m:\n    kind: docker\n    image: m:1\n    container: m\n    default_variant: v\n"
        "    variants:\n      v:\n        weights:\n          - {uri: /x.pt, path: ../x.pt}\n"
    )
    with pytest.raises(SpecError, match=r"models.yaml: models\.m\.variants\.v\.weights\.0\.path: .*stay inside"):
        load_spec_file(path)


def test_container_dir_next_to_the_spec_then_bundled(tmp_path, monkeypatch):
    bundled = tmp_path / "bundled"
    (bundled / "tiny").mkdir(parents=True)
    (bundled / "tiny" / "Dockerfile").write_text("FROM scratch\n")
    monkeypatch.setattr(schema_module, "BUNDLED_CONTAINERS_DIR", bundled)
    assert docker_spec().container_dir() == (bundled / "tiny").resolve()

    mine = tmp_path / "mine"
    (mine / "tiny").mkdir(parents=True)
    (mine / "tiny" / "Dockerfile").write_text("FROM scratch\n")
    spec = docker_spec(source=mine / "models.yaml")
    assert spec.container_dir() == (mine / "tiny").resolve()  # the spec's own folder wins

    (bundled / "template").mkdir()
    (bundled / "template" / "entrypoint.py").write_text("")  # built with common/Dockerfile
    assert docker_spec(container="template").container_dir() == (bundled / "template").resolve()
    (bundled / "other").mkdir()
    (bundled / "other" / "requirements.txt").write_text("")
    with pytest.raises(
        SpecError, match=r"model 'tiny': no Dockerfile or entrypoint.py in container folder 'other'"
    ):
        docker_spec(container="other").container_dir()
    with pytest.raises(SpecError, match="has no container folder"):
        ModelSpec(name="b", kind="baseline", implementation="pca").container_dir()


def test_tiny_model_fixture_spec_points_at_its_own_folder():
    spec = load_spec_file(TESTS / "fixtures" / "tiny_model" / "models.yaml")["models"]["tiny"]
    assert spec.container_dir() == (TESTS / "fixtures" / "tiny_model").resolve()


# --------------------------------------------------------------------------- staging


def test_stage_weights_lays_files_out_and_writes_a_manifest(spec, published, tmp_path):
    staged = stage_weights(spec)
    folder = staged_path(spec, "v1")
    assert staged.path == folder and staged.variant == "v1" and staged.license == "MIT"
    assert folder == Path(os.environ["CZB_CACHE_DIR"]) / "weights" / "tiny" / "v1"
    assert (folder / "ckpt" / "best_model.pt").read_bytes() == published["ckpt"].read_bytes()
    assert (folder / "tokenizer" / "vocab" / "genes.json").read_bytes() == b'["CD4"]'
    assert (folder / "more" / "extra" / "readme.txt").read_text() == "hello"
    assert (folder / "more" / "top.txt").read_text() == "top"
    assert staged.checksum == directory_checksum(folder)
    manifest = json.loads(folder.with_name("v1.json").read_text())
    assert manifest["model"] == "tiny" and manifest["variant"] == "v1" and manifest["license"] == "MIT"
    assert manifest["checksum"] == staged.checksum
    assert [f["path"] for f in manifest["files"]] == ["ckpt/best_model.pt", "tokenizer", "more"]
    assert [f["extract"] for f in manifest["files"]] == [False, True, True]
    # Nothing but the folder and its manifest is left beside it.
    assert sorted(p.name for p in folder.parent.iterdir()) == ["v1", "v1.json"]


def test_stage_weights_goes_under_the_cache_dir(spec, tmp_path, monkeypatch):
    cache = tmp_path / "elsewhere"
    staged = stage_weights(spec, cache_dir=cache)
    assert staged.path == cache / "weights" / "tiny" / "v1"
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path / "env-cache"))
    assert staged_path(spec, "v1") == tmp_path / "env-cache" / "weights" / "tiny" / "v1"


def test_staged_weights_are_readable_by_others(spec, published):
    folder = stage_weights(spec).path
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            assert mode(path) == 0o755, path
        else:
            assert mode(path) & 0o444 == 0o444, path
    assert mode(folder / "tokenizer" / "vocab") == 0o755  # was 0o700 in the archive
    # The user's own file is copied: its mode is not changed and it gains no second name.
    assert mode(published["ckpt"]) == 0o604
    assert published["ckpt"].stat().st_nlink == 1


def test_stage_weights_is_idempotent(spec, published, monkeypatch):
    first = stage_weights(spec)
    inode = (first.path / "ckpt" / "best_model.pt").stat().st_ino

    def refuse(*args, **kwargs):
        raise AssertionError("fetched again")

    monkeypatch.setattr(fetch_module, "fetch", refuse)
    published["ckpt"].unlink()  # the source is not needed again
    second = stage_weights(spec)
    assert second == first
    assert (second.path / "ckpt" / "best_model.pt").stat().st_ino == inode


def test_unfinished_staging_without_manifest_is_redone(spec):
    folder = staged_path(spec, "v1")
    folder.mkdir(parents=True)
    (folder / "half-written.pt").write_bytes(b"x")
    staged = stage_weights(spec)
    assert not (folder / "half-written.pt").exists()
    assert (folder / "ckpt" / "best_model.pt").is_file()
    assert staged.checksum == directory_checksum(folder)


def test_sha256_mismatch_is_a_fetch_error_and_stages_nothing(published):
    spec = docker_spec(default_variant="v", variants={"v": {"weights": [
        {"uri": str(published["ckpt"]), "path": "m.pt", "sha256": "0" * 64}]}})
    with pytest.raises(FetchError, match="sha256 mismatch"):
        stage_weights(spec)
    parent = staged_path(spec, "v").parent
    assert not parent.exists() or list(parent.iterdir()) == []
    with pytest.raises(EmbeddingError, match="not staged"):
        resolve_weights(spec)


def test_missing_source_file_is_a_fetch_error(tmp_path):
    spec = docker_spec(default_variant="v", variants={"v": {"weights": [
        {"uri": str(tmp_path / "absent.pt"), "path": "m.pt"}]}})
    with pytest.raises(FetchError, match="no such file"):
        stage_weights(spec)


@pytest.mark.parametrize("kind", ["tar", "zip", "tar-symlink"])
def test_archive_member_escaping_the_folder_is_refused(kind, tmp_path):
    if kind == "tar":
        archive = make_tar(tmp_path / "evil.tar.gz", {"ok.txt": b"ok", "../../evil.txt": b"evil"})
    elif kind == "zip":
        archive = make_zip(tmp_path / "evil.zip", {"ok.txt": b"ok", "../evil.txt": b"evil"})
    else:
        archive = tmp_path / "evil.tar"
        with tarfile.open(archive, "w") as tar:
            link = tarfile.TarInfo("link")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
            tar.addfile(link)
    spec = docker_spec(default_variant="v", variants={"v": {"weights": [
        {"uri": str(archive), "path": "data", "extract": True}]}})
    with pytest.raises(EmbeddingError, match=r"archive member .* would be written outside"):
        stage_weights(spec)
    parent = staged_path(spec, "v").parent
    assert list(parent.iterdir()) == []  # the staging folder is gone too
    assert not list(tmp_path.rglob("evil.txt"))


def test_extract_of_a_file_that_is_no_archive(published):
    spec = docker_spec(default_variant="v", variants={"v": {"weights": [
        {"uri": str(published["ckpt"]), "path": "data", "extract": True}]}})
    with pytest.raises(EmbeddingError, match="neither a tar nor a zip archive"):
        stage_weights(spec)


# --------------------------------------------------------------------------- resolving


def test_resolve_weights_not_staged_names_the_command(spec):
    with pytest.raises(EmbeddingError) as excinfo:
        resolve_weights(spec, "v1")
    assert "`czb models fetch-weights tiny --variant v1`" in str(excinfo.value)
    assert "--weights DIR" in str(excinfo.value)


def test_resolve_weights_finds_the_staged_copy(spec):
    staged = stage_weights(spec, "v1")
    assert resolve_weights(spec) == staged  # v1 is the default variant


def test_resolve_weights_with_a_local_folder(spec, tmp_path):
    mine = tmp_path / "my-weights"
    (mine / "sub").mkdir(parents=True)
    (mine / "sub" / "w.bin").write_bytes(b"abc")
    resolved = resolve_weights(spec, weights_dir=mine)
    assert resolved.path == mine.resolve() and resolved.variant == "v1" and resolved.license == "MIT"
    assert resolved.checksum == directory_checksum(mine) is not None
    with pytest.raises(EmbeddingError, match=r"--weights .*w.bin: not a folder"):
        resolve_weights(spec, weights_dir=mine / "sub" / "w.bin")
    with pytest.raises(EmbeddingError, match="not a folder"):
        resolve_weights(spec, weights_dir=tmp_path / "absent")


def test_variant_without_weights_has_no_path(spec):
    for staged in (stage_weights(spec, "random"), resolve_weights(spec, "random")):
        assert staged.path is None and staged.checksum is None and staged.variant == "random"
    assert not staged_path(spec, "random").exists()
    plain = docker_spec()
    assert resolve_weights(plain).path is None and resolve_weights(plain).variant == "default"


def test_unknown_variant(spec):
    # SpecError or its subclass UnknownNameError, naming the variant asked for.
    with pytest.raises(SpecError, match=r"'v2'"):
        stage_weights(spec, "v2")
    with pytest.raises(SpecError, match=r"'v2'"):
        resolve_weights(spec, "v2")
    assert not (staged_path(spec, "v2")).parent.exists()


def test_directory_checksum_covers_names_and_contents(tmp_path):
    a = tmp_path / "a"
    (a / "d").mkdir(parents=True)
    (a / "d" / "x.bin").write_bytes(b"123")
    (a / "y.txt").write_text("y")
    before = directory_checksum(a)
    assert before == directory_checksum(a)
    (a / "d" / "x.bin").write_bytes(b"124")
    changed = directory_checksum(a)
    (a / "d" / "x.bin").rename(a / "d" / "z.bin")
    (a / "d" / "z.bin").write_bytes(b"123")
    renamed = directory_checksum(a)
    assert len({before, changed, renamed}) == 3
    assert directory_checksum(tmp_path / "empty-or-absent") is None


# --------------------------------------------------------------------------- local sources (spec-named files)

SECRET = "PRIVATE-9d1e7b-not-for-images"


def _cli(*args):
    from typer.testing import CliRunner

    from czb.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def _spec_folder(tmp_path: Path, weights: list[dict]) -> Path:
    folder = tmp_path / "cfg"
    folder.mkdir(exist_ok=True)
    (folder / "models.yaml").write_text(json.dumps({"models": {"tiny": {
        "kind": "docker", "image": "czb-test/tiny:1", "container": "tiny", "default_variant": "v",
        "variants": {"v": {"weights": weights}}}}}))
    return folder


def _nothing_holds_the_secret(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("uri_of", [str, lambda p: p.as_uri()], ids=["path", "file-uri"])
@pytest.mark.parametrize("private_mode", [0o640, 0o600, 0o400, 0o660], ids=lambda m: f"{m:04o}")
def test_private_local_weights_are_refused_without_being_read(tmp_path, uri_of, private_mode):
    """A spec naming a private file (say /etc/shadow) must not hand it to the image."""
    private = tmp_path / "home" / "shadow"
    private.parent.mkdir()
    private.write_text(SECRET)
    private.chmod(private_mode)
    link = tmp_path / "home" / "innocent.pt"
    link.symlink_to(private)  # a link of mode 777 to it is no way round
    for source in (private, link):
        config = _spec_folder(tmp_path, [{"uri": uri_of(source), "path": "model.pt"}])
        result = _cli("models", "fetch-weights", "tiny", "--config-dir", config)
        assert result.exit_code == 1, result.output
        (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert f"is private (mode {private_mode:04o})" in line and "anyone on the machine may read" in line
        assert SECRET not in result.output
    assert stat.S_IMODE(private.stat().st_mode) == private_mode and private.stat().st_nlink == 1
    _nothing_holds_the_secret(Path(os.environ["CZB_CACHE_DIR"]))
    assert not list((Path(os.environ["CZB_CACHE_DIR"]) / "weights").rglob("model.pt"))


def test_private_local_archive_is_refused_too(tmp_path):
    archive = make_tar(tmp_path / "w.tar.gz", {"w/secret.txt": SECRET.encode()})
    archive.chmod(0o600)
    config = _spec_folder(tmp_path, [{"uri": str(archive), "path": "w", "extract": True}])
    result = _cli("models", "fetch-weights", "tiny", "--config-dir", config)
    assert result.exit_code == 1 and "is private (mode 0600)" in result.stderr
    _nothing_holds_the_secret(Path(os.environ["CZB_CACHE_DIR"]))


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "pipe", 0o666)
    return str(tmp_path / "pipe")


def _folder(tmp_path: Path) -> str:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.bin").write_bytes(b"a")
    return str(tmp_path / "dir")


@pytest.mark.parametrize("source, message", [
    (_fifo, "not a regular file"),
    (lambda _t: "/dev/zero", "not a regular file"),
    (_folder, "is a folder"),
    (lambda _t: "/proc/self/cmdline", "changed size while it was copied"),  # reads 0 bytes by size, has more
    (lambda _t: "/proc/self/environ", "is private"),
])
def test_local_weights_must_be_plain_files(tmp_path, source, message):
    config = _spec_folder(tmp_path, [{"uri": source(tmp_path), "path": "model.pt"}])
    result = _cli("models", "fetch-weights", "tiny", "--config-dir", config)
    assert result.exit_code == 1, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert message in line
    assert not list((Path(os.environ["CZB_CACHE_DIR"]) / "weights").rglob("model.pt"))


def test_local_weights_are_copied_and_the_users_file_is_left_as_it_was(tmp_path):
    source = tmp_path / "mine.bin"
    source.write_bytes(b"original weights")
    source.chmod(0o604)
    before = source.stat()
    spec = docker_spec(default_variant="v", variants={"v": {"weights": [
        {"uri": str(source), "path": "m.bin", "sha256": sha256(source)}]}})
    staged = stage_weights(spec)
    after = source.stat()
    assert (stat.S_IMODE(after.st_mode), after.st_nlink, after.st_ctime_ns) == (0o604, 1, before.st_ctime_ns)
    copy = staged.path / "m.bin"
    assert copy.stat().st_ino != after.st_ino and mode(copy) == 0o644
    # Editing the user's file afterwards does not change what is mounted.
    source.write_bytes(b"EDITED!! weights")
    resolved = resolve_weights(spec)
    assert (resolved.path / "m.bin").read_bytes() == b"original weights"
    assert resolved.checksum == staged.checksum == directory_checksum(resolved.path)


def test_sha256_is_checked_on_the_staged_copy(tmp_path):
    source = tmp_path / "mine.bin"
    source.write_bytes(b"weights")
    spec = docker_spec(default_variant="v", variants={"v": {"weights": [
        {"uri": str(source), "path": "m.bin", "sha256": hashlib.sha256(b"other").hexdigest()}]}})
    with pytest.raises(FetchError, match="sha256 mismatch"):
        stage_weights(spec)
    assert not staged_path(spec, "v").exists()


def test_staged_weights_edited_in_place_are_noticed(spec, published):
    staged = stage_weights(spec)
    file = staged.path / "ckpt" / "best_model.pt"
    original = file.read_bytes()
    info = file.stat()
    with file.open("r+b") as f:  # same size, mtime put back: only the ctime tells
        f.write(b"X")
    os.utime(file, ns=(info.st_atime_ns, info.st_mtime_ns))
    with pytest.raises(EmbeddingError, match=r"changed since they were staged .*czb models fetch-weights tiny"):
        resolve_weights(spec)
    with pytest.warns(EmbeddingWarning, match="staging them again"):
        restaged = stage_weights(spec)  # staged again from the source
    assert restaged.checksum == staged.checksum and file.read_bytes() == original
    assert resolve_weights(spec) == restaged
    (staged.path / "extra.bin").write_bytes(b"planted")  # a file added is a change too
    with pytest.raises(EmbeddingError, match="changed since they were staged"):
        resolve_weights(spec)


def test_manifest_without_stamps_is_checked_by_content(spec):
    staged = stage_weights(spec)
    manifest_path = staged.path.with_name("v1.json")
    manifest = json.loads(manifest_path.read_text())
    del manifest["stamps"]  # as an older czb wrote it
    manifest_path.write_text(json.dumps(manifest))
    assert resolve_weights(spec) == staged
    assert "stamps" in json.loads(manifest_path.read_text())  # remembered for next time
    manifest_path.write_text(json.dumps(manifest))
    (staged.path / "ckpt" / "best_model.pt").write_bytes(b"other")
    with pytest.raises(EmbeddingError, match="changed since they were staged"):
        resolve_weights(spec)
