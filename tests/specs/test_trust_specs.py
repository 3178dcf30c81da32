"""The trust boundary of specs and weights (issue 17): names that become paths, YAML that
explodes, weights archives that unpack without end, staging folders left by killed runs.

Every test goes through the command line on crafted inputs and checks the effect: a
folder outside the cache is untouched, the exit code is 1 or 2 with one ``error:`` line
and no traceback, the process fails fast instead of filling memory or disk.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from conftest import assert_clean_failure, invoke
from conftest import write_text as write

from czb.specs.catalog import Catalog
from czb.specs.names import is_valid_name
from czb.specs.schema import ModelSpec, WeightFile, WeightsVariant

NAME_ERROR = "is not a valid name"


def victim_folder(tmp_path: Path) -> Path:
    """A folder outside the cache that must survive everything."""
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.txt").write_text("precious")
    (victim / "sub" / "more.txt").write_text("also precious")
    return victim


def assert_victim_intact(victim: Path) -> None:
    assert (victim / "keep.txt").read_text() == "precious"
    assert (victim / "sub" / "more.txt").read_text() == "also precious"


def cache_dir() -> Path:
    return Path(os.environ["CZB_CACHE_DIR"])


def docker_model_yaml(name: str = "tiny", variant: str = "v", weights: str = "") -> str:
    weights = weights or "[{uri: /nonexistent/w.pt, path: w.pt}]"
    return f"""\
    models:
      {name}:
        kind: docker
        image: czb-test/tiny:1
        container: tiny
        default_variant: {variant}
        variants:
          {variant}:
            weights: {weights}
    """


# ----------------------------------------------------------------------------- names that become paths


@pytest.mark.parametrize("name", ["../../victim", "../victim", "a/b", "/abs", ".hidden", "..", "x" * 200,
                                  "sp ace", "tab\tname", "new\nline", "ünïcode", "-dash", "a..b"])
def test_model_name_that_is_not_a_plain_name_is_refused_at_load(tmp_path, name):
    victim = victim_folder(tmp_path)
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(name=f'"{name}"'.replace("\n", "\\n")
                                                                       .replace("\t", "\\t")))
    # The cache's weights folder is two levels below tmp_path: ../../victim would reach it.
    result = invoke("models", "fetch-weights", "--config-dir", spec.parent, "--", name)
    line = assert_clean_failure(result)
    assert "models.yaml" in line and "models" in line and NAME_ERROR in line
    assert_victim_intact(victim)
    assert not (cache_dir() / "weights").exists()


@pytest.mark.parametrize("section, entry", [
    ("datasets", "uri: a.h5ad\n    organism: human\n    label_key: c"),
    ("tasks", "implementation: clustering"),
    ("suites", "includes: [smoke]"),
    ("models", "kind: baseline\n    implementation: pca"),
])
@pytest.mark.parametrize("name", ["../../x", "a/b", ".x", "a..b"])
def test_every_section_checks_its_names(tmp_path, section, entry, name):
    spec = write(tmp_path / "cfg", "bad.yaml", f'{section}:\n  "{name}":\n    {entry}\n')
    result = invoke("list", "tasks", "--config-dir", spec.parent)
    line = assert_clean_failure(result)
    assert "bad.yaml" in line and section in line and NAME_ERROR in line and "line 2" in line


@pytest.mark.parametrize("variant", ["../../../x", "a/b", ".v", ".."])
def test_variant_name_that_is_not_a_plain_name_is_refused(tmp_path, variant):
    victim = victim_folder(tmp_path)
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(variant=f'"{variant}"'))
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", spec.parent)
    line = assert_clean_failure(result)
    assert "models.yaml" in line and "variant" in line and NAME_ERROR in line
    assert_victim_intact(victim)


@pytest.mark.parametrize("path", ["../x.pt", "/etc/x.pt", "a/../../b.pt", "a/.hidden", "a/..b/c", "a\\..\\b"])
def test_weights_path_with_anything_but_plain_parts_is_refused(tmp_path, path):
    spec = write(tmp_path / "cfg", "models.yaml",
                 docker_model_yaml(weights=f"[{{uri: /nonexistent/w.pt, path: '{path}'}}]"))
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", spec.parent)
    line = assert_clean_failure(result)
    assert "models.yaml" in line and "path" in line and "stay inside the weights folder" in line


def test_bundled_specs_still_load():
    for kind in ("datasets", "models", "tasks"):
        result = invoke("list", kind, "--format", "json")
        assert result.exit_code == 0, result.output


def _bypassing_spec(name: str, variant: str, weights_uri: str) -> ModelSpec:
    """A spec built without validation, as code other than the loader could."""
    item = WeightFile.model_construct(uri=weights_uri, path="w.pt", sha256=None, extract=False)
    chosen = WeightsVariant.model_construct(description="", license="", organisms=[], weights=[item])
    return ModelSpec.model_construct(name=name, kind="docker", image="x:1", container="tiny",
                                     default_variant=variant, variants={variant: chosen}, source=None)


@pytest.mark.parametrize("name, variant", [("../../victim", "v"), ("tiny", "../../../victim"),
                                           ("..", ".."), ("tiny", "/abs")])
def test_weights_never_touch_a_folder_outside_the_cache_even_without_validation(tmp_path, monkeypatch,
                                                                                name, variant):
    victim = victim_folder(tmp_path)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    spec = _bypassing_spec(name, variant, str(weights))
    monkeypatch.setattr(Catalog, "load", classmethod(lambda cls, *a, **k: Catalog({}, {"tiny": spec}, {})))
    result = invoke("models", "fetch-weights", "tiny")
    line = assert_clean_failure(result)
    assert "name" in line or "not inside" in line
    assert_victim_intact(victim)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt", "sub"]


def test_weights_folder_symlinked_outside_the_cache_is_not_removed(tmp_path):
    victim = victim_folder(tmp_path)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights")
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(weights=f"[{{uri: {weights}, path: w.pt}}]"))
    model_folder = cache_dir() / "weights" / "tiny"
    model_folder.mkdir(parents=True)
    (model_folder / "v").symlink_to(victim)  # an unfinished staging "without manifest", planted
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", spec.parent)
    assert_clean_failure(result)
    assert_victim_intact(victim)


# ----------------------------------------------------------------------------- --variant on the command line


def test_fetch_weights_unknown_variant_is_exit_2_with_suggestions(tmp_path):
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(variant="whole_human"))
    result = invoke("models", "fetch-weights", "tiny", "--variant", "whole_humann", "--config-dir", spec.parent)
    line = assert_clean_failure(result, 2)
    assert "'whole_humann'" in line and "did you mean 'whole_human'" in line
    traversal = invoke("models", "fetch-weights", "tiny", "--variant", "../../../x", "--config-dir", spec.parent)
    assert "variants: whole_human" in assert_clean_failure(traversal, 2)
    assert not (cache_dir() / "weights").exists()


def test_run_unknown_variant_is_exit_2_before_anything_runs(tmp_path):
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(variant="whole_human"))
    result = invoke("run", "--model", "tiny", "--variant", "../../x", "--task", "embedding", "--dataset",
                    "synthetic_cells_tiny", "--seeds", "0", "--n-jobs", "1", "--output-dir", tmp_path / "out",
                    "--config-dir", spec.parent)
    line = assert_clean_failure(result, 2)
    assert "weights variant '../../x'" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.json"))


# ----------------------------------------------------------------------------- YAML


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


@pytest.mark.parametrize("text", [BOMB, "tasks:\n  x:\n    implementation: clustering\n    parameters:\n"
                                  + textwrap.indent(BOMB, "      ")], ids=["top-level", "in-params"])
def test_alias_bomb_fails_fast(tmp_path, text):
    spec = write(tmp_path / "cfg", "bomb.yaml", text)
    start = time.perf_counter()
    result = invoke("list", "tasks", "--config-dir", spec.parent)
    elapsed = time.perf_counter() - start
    line = assert_clean_failure(result)
    assert "bomb.yaml:" in line and "alias" in line
    assert elapsed < 5  # it used to run for minutes into a MemoryError


def test_alias_bomb_in_a_subprocess_stays_small(tmp_path):
    spec = write(tmp_path / "cfg", "bomb.yaml", BOMB)
    # VmHWM is this process's own peak (ru_maxrss would carry the forking pytest's over exec).
    code = ("import sys\n"
            "from czb.cli import app\n"
            "try:\n    app(['list', 'tasks', '--config-dir', sys.argv[1]])\n"
            "except SystemExit as e:\n    code = e.code\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
            "print('rss_kb', hwm.split()[1])\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code, str(spec.parent)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    rss_kb = int(done.stdout.split("rss_kb")[1])
    assert rss_kb < 1_000_000, rss_kb  # well under a GB (the bomb reached 5.6 GB)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("text, what", [
    (("tasks:\n  x:\n    implementation: clustering\n    parameters:\n      a: &a [1, 2]\n"
      "      b: &b [*a, *a]\n      c: [*b, *b]\n"), "holds aliases itself"),
    ("tasks:\n  x:\n    implementation: clustering\n    parameters:\n      a: &a [" + ", ".join(["1"] * 2000)
     + "]\n      b: [*a, *a, *a, *a, *a, *a]\n", "more than 10,000 nodes"),
], ids=["nested", "quadratic"])
def test_aliases_that_multiply_are_refused(tmp_path, text, what):
    spec = write(tmp_path / "cfg", "alias.yaml", text)
    line = assert_clean_failure(invoke("list", "tasks", "--config-dir", spec.parent))
    assert "alias.yaml:" in line and what in line


def test_shared_aliases_of_the_bundled_style_still_work(tmp_path):
    spec = write(tmp_path / "cfg", "ok.yaml", """\
    datasets:
      one:
        uri: a.h5ad
        organism: human
        label_key: c
        citation: &paper Someone et al. (2024)
        params: &shared {n_cells: 10, n_genes: 20}
      two:
        uri: b.h5ad
        organism: human
        label_key: c
        citation: *paper
        params: *shared
    """)
    result = invoke("list", "datasets", "--format", "json", "--config-dir", spec.parent)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("text, what", [
    ("datasets: " + "[" * 100_000, "nested more than"),
    ("tasks:\n  x: &x\n    implementation: clustering\n    parameters: {a: *x}\n", "recursive"),
    ("tasks:\n  x:\n    parameters: &p [1, *p]\n    implementation: clustering\n", "recursive"),
], ids=["deep", "recursive-mapping", "recursive-list"])
def test_deep_and_recursive_yaml_fail_in_one_line_without_crashing(tmp_path, text, what):
    spec = write(tmp_path / "cfg", "evil.yaml", text)
    done = subprocess.run([sys.executable, "-m", "czb", "list", "tasks", "--config-dir", str(spec.parent)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])  # not -11 (libyaml recursing in C)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "evil.yaml" in lines[0] and what in lines[0]


@pytest.mark.parametrize("text, line", [
    ("tasks:\n  x:\n    implementation: clustering\ntasks:\n  y:\n    implementation: clustering\n", 4),
    ("tasks:\n  x:\n    implementation: clustering\n  x:\n    implementation: embedding\n", 4),
    ("tasks:\n  x:\n    implementation: clustering\n    implementation: embedding\n", 4),
    ("tasks:\n  x:\n    implementation: clustering\n    parameters:\n      k: 1\n      k: 2\n", 6),
    ("tasks:\n  x:\n    implementation: clustering\n    parameters: {k: 1, j: [{a: 1, a: 2}]}\n", 4),
], ids=["section", "entry", "field", "parameter", "flow"])
def test_duplicate_key_at_any_level_names_file_and_line(tmp_path, text, line):
    spec = write(tmp_path / "cfg", "dup.yaml", text)
    result = invoke("list", "tasks", "--config-dir", spec.parent)
    message = assert_clean_failure(result)
    assert f"dup.yaml:{line}: duplicate key" in message


def test_spec_file_size_is_capped_and_the_cap_is_a_setting(tmp_path, monkeypatch):
    big = "tasks:\n  x:\n    implementation: clustering\n    description: " + "a" * 1_500_000 + "\n"
    spec = write(tmp_path / "cfg", "big.yaml", big)
    start = time.perf_counter()
    result = invoke("list", "tasks", "--config-dir", spec.parent)
    line = assert_clean_failure(result)
    assert "big.yaml" in line and "CZB_MAX_SPEC_MB" in line and "aaaa" not in result.output
    assert time.perf_counter() - start < 5
    monkeypatch.setenv("CZB_MAX_SPEC_MB", "2")
    assert invoke("list", "tasks", "--format", "json", "--config-dir", spec.parent).exit_code == 0


def test_spec_that_is_a_fifo_does_not_hang(tmp_path):
    suite = write(tmp_path, "suite.yaml", "suites:\n  s:\n    includes: [fifo.yaml]\n")
    os.mkfifo(tmp_path / "fifo.yaml")
    done = subprocess.run([sys.executable, "-m", "czb", "bench", str(suite), "--dry-run"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "fifo.yaml" in done.stderr and "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_spec_that_is_not_utf8_or_not_a_spec_is_not_echoed(tmp_path):
    secret = "hunter2-secret-value"
    write(tmp_path / "cfg", "creds.yaml", f"{secret}: {secret}\n")
    result = invoke("list", "tasks", "--config-dir", tmp_path / "cfg")
    line = assert_clean_failure(result)
    assert "creds.yaml" in line and "unknown section" in line and secret not in result.output
    (tmp_path / "cfg" / "creds.yaml").write_bytes(b"tasks: \xff\xfe " + secret.encode())
    result = invoke("list", "tasks", "--config-dir", tmp_path / "cfg")
    assert "creds.yaml" in assert_clean_failure(result) and secret not in result.output


# ----------------------------------------------------------------------------- weights archives


def make_targz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def archive_spec(tmp_path: Path, archive: Path) -> Path:
    return write(tmp_path / "cfg", "models.yaml",
                 docker_model_yaml(weights=f"[{{uri: {archive}, path: data, extract: true}}]"))


def staged_bytes() -> int:
    root = cache_dir() / "weights"
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink()) if root.exists() else 0


def assert_nothing_staged() -> None:
    folder = cache_dir() / "weights" / "tiny"
    assert not folder.exists() or [p.name for p in folder.iterdir()] == [], list(folder.iterdir())


@pytest.fixture
def small_unpack_limits(monkeypatch):
    monkeypatch.setenv("CZB_MAX_UNPACK_RATIO", "5")
    monkeypatch.setenv("CZB_MIN_UNPACK_MB", "1")


def test_gzip_bomb_stops_at_the_limit(tmp_path, small_unpack_limits):
    archive = make_targz(tmp_path / "bomb.tar.gz", {"zeros.bin": bytes(30_000_000)})
    assert archive.stat().st_size < 100_000
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    line = assert_clean_failure(result)
    assert "bomb.tar.gz" in line and "CZB_MAX_UNPACK_RATIO" in line
    assert_nothing_staged()


def test_raising_the_limit_lets_a_big_archive_through(tmp_path, monkeypatch):
    monkeypatch.setenv("CZB_MIN_UNPACK_MB", "0")
    monkeypatch.setenv("CZB_MAX_UNPACK_RATIO", "2000")
    archive = make_targz(tmp_path / "big.tar.gz", {"zeros.bin": bytes(3_000_000)})
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    assert result.exit_code == 0, result.output
    assert (cache_dir() / "weights" / "tiny" / "v" / "data" / "zeros.bin").stat().st_size == 3_000_000


def test_zip_bomb_with_lying_sizes_stops(tmp_path, small_unpack_limits):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(30_000_000))
    raw = bytearray(archive.read_bytes())
    # Make the local and central headers claim 10 bytes uncompressed.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.index(signature)
        raw[at + offset:at + offset + 4] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(raw))
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    assert_clean_failure(result)
    assert_nothing_staged()
    assert staged_bytes() == 0


def test_too_many_members_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CZB_MAX_UNPACK_FILES", "100")
    archive = make_targz(tmp_path / "many.tar.gz", {f"f{i}": b"" for i in range(500)})
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    line = assert_clean_failure(result)
    assert "CZB_MAX_UNPACK_FILES" in line
    assert_nothing_staged()


def test_pax_header_bomb_stops(tmp_path, small_unpack_limits):
    archive = tmp_path / "pax.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("small.txt")
        info.pax_headers = {"comment": "x" * 40_000_000}
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    line = assert_clean_failure(result)
    assert "CZB_MAX_UNPACK_RATIO" in line
    assert_nothing_staged()


@pytest.mark.parametrize("kind", [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE])
def test_special_tar_members_are_refused(tmp_path, kind):
    archive = tmp_path / "special.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("dev")
        info.type, info.devmajor, info.devminor = kind, 1, 3
        tar.addfile(info)
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    line = assert_clean_failure(result)
    assert "special file" in line
    assert_nothing_staged()


def test_zip_symlink_member_is_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("passwd")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    assert "symbolic link" in assert_clean_failure(result)


def test_tar_hard_links_outside_or_repeated_beyond_the_limit(tmp_path, small_unpack_limits):
    outside = tmp_path / "escape.tar"
    with tarfile.open(outside, "w") as tar:
        info = tarfile.TarInfo("h")
        info.type, info.linkname = tarfile.LNKTYPE, "../../../../etc/passwd"
        tar.addfile(info)
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, outside).parent)
    assert "outside" in assert_clean_failure(result)
    # One 400 kB file and many hard links to it: a reader of the folder sees gigabytes.
    many = tmp_path / "links.tar.gz"
    with tarfile.open(many, "w:gz") as tar:
        data = os.urandom(400_000)
        info = tarfile.TarInfo("big")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for i in range(50):
            link = tarfile.TarInfo(f"link{i}")
            link.type, link.linkname = tarfile.LNKTYPE, "big"
            tar.addfile(link)
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, many).parent)
    assert "CZB_MAX_UNPACK_RATIO" in assert_clean_failure(result)
    assert_nothing_staged()


def test_a_good_archive_still_unpacks(tmp_path):
    archive = make_targz(tmp_path / "ok.tar.gz", {"vocab/genes.json": b'["CD4"]', "args.json": b"{}"})
    result = invoke("models", "fetch-weights", "tiny", "--config-dir", archive_spec(tmp_path, archive).parent)
    assert result.exit_code == 0, result.output
    assert (cache_dir() / "weights" / "tiny" / "v" / "data" / "vocab" / "genes.json").read_bytes() == b'["CD4"]'


# ----------------------------------------------------------------------------- killed extraction


SLOW_FETCH = """\
import sys, time
import czb.models.archives as w
original = w._copy_counted
def slow(*args):
    original(*args)
    print("unpacking", flush=True)
    time.sleep(120)
w._copy_counted = slow
from czb.cli import app
app(sys.argv[1:])
"""


def test_staging_left_by_a_killed_extraction_is_removed_by_the_next_run(tmp_path):
    archive = make_targz(tmp_path / "ok.tar.gz", {"a.bin": b"a" * 1000})
    spec = archive_spec(tmp_path, archive)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FETCH, "models", "fetch-weights", "tiny",
                             "--config-dir", str(spec.parent)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "unpacking"
        folder = cache_dir() / "weights" / "tiny"
        (staging,) = [p for p in folder.iterdir() if p.name.startswith(".v-staging-")]
        assert str(proc.pid) in staging.name
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert staging.exists()  # what SIGKILL leaves behind
    # A staging folder of a process that is alive is left alone.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = folder / staging.name.replace(str(proc.pid), str(sleeper.pid), 1)
        live.mkdir()
        result = invoke("models", "fetch-weights", "tiny", "--config-dir", spec.parent)
        assert result.exit_code == 0, result.output
        assert not staging.exists() and live.exists()
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    assert (folder / "v" / "data" / "a.bin").read_bytes() == b"a" * 1000


def test_old_style_staging_folder_is_removed_once_stale(tmp_path):
    archive = make_targz(tmp_path / "ok.tar.gz", {"a.bin": b"a"})
    spec = archive_spec(tmp_path, archive)
    folder = cache_dir() / "weights" / "tiny"
    old, fresh = folder / ".v-staging-abc123xy", folder / ".v-staging-def456zz"
    for path in (old, fresh):
        (path / "part").mkdir(parents=True)
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    assert invoke("models", "fetch-weights", "tiny", "--config-dir", spec.parent).exit_code == 0
    assert not old.exists() and fresh.exists()


def test_name_pattern_is_one_rule_for_everything():
    assert is_valid_name("scgpt_whole-human.v2")
    for bad in ("", ".", "..", "a..b", "a/b", "-a", "_a", "a" * 129, None, 3):
        assert not is_valid_name(bad), bad


# ----------------------------------------------------------------------------- values checked at load


@pytest.mark.parametrize("paths, shown", [
    (["w.pt", "w.pt"], "'w.pt' and 'w.pt'"),
    (["vocab", "vocab/genes.json"], "'vocab' and 'vocab/genes.json'"),
    (["a/b/c.bin", "a/b"], "'a/b/c.bin' and 'a/b'"),
    (["./w.pt", "w.pt"], "'./w.pt' and 'w.pt'"),
    (["Model.pt", "model.pt"], "'Model.pt' and 'model.pt'"),  # one file on a case-insensitive disk
])
def test_colliding_weights_paths_are_refused_at_load(tmp_path, paths, shown):
    weights = "[" + ", ".join(f"{{uri: /nonexistent/{i}.pt, path: {p}}}" for i, p in enumerate(paths)) + "]"
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(weights=weights))
    for args in (("list", "models"), ("models", "fetch-weights", "tiny")):
        line = assert_clean_failure(invoke(*args, "--config-dir", spec.parent))
        assert f"weights paths {shown} collide" in line and "internal error" not in line


def test_weights_paths_that_only_share_a_folder_are_fine(tmp_path):
    weights = "[{uri: /nonexistent/a, path: vocab/a.json}, {uri: /nonexistent/b, path: vocab/b.json}, " \
              "{uri: /nonexistent/c, path: vocab2}]"
    spec = write(tmp_path / "cfg", "models.yaml", docker_model_yaml(weights=weights))
    assert invoke("list", "models", "--config-dir", spec.parent).exit_code == 0


@pytest.mark.parametrize("field, value", [
    ("resources", "{memory_gb: -1}"), ("resources", "{memory_gb: 0}"), ("resources", "{memory_gb: .inf}"),
    ("resources", "{memory_gb: .nan}"), ("resources", "{shm_gb: 0}"), ("resources", "{shm_gb: -0.5}"),
    ("resources", "{timeout_s: 0}"), ("resources", "{timeout_s: -5}"), ("resources", "{timeout_s: 1.0e+30}"),
    ("output_dim", "-1"), ("output_dim", "0"),
])
def test_resources_and_output_dim_must_be_positive_at_load(tmp_path, field, value):
    text = docker_model_yaml().replace("        kind: docker\n", f"        kind: docker\n        {field}: {value}\n")
    spec = write(tmp_path / "cfg", "models.yaml", text)
    line = assert_clean_failure(invoke("list", "models", "--config-dir", spec.parent))
    key = value.strip("{}").split(":")[0] if field == "resources" else field
    assert key in line and "internal error" not in line
