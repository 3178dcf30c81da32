"""Tests of czb.io (fetch, cache) against real servers on loopback (no patched clients)."""

from __future__ import annotations

import hashlib
import random
import re
import socket
from pathlib import Path

import pytest
from conftest import S3_TEST_BUCKET, FileServer

from czb.core.errors import DatasetWarning, FetchError
from czb.io import cache as cache_module
from czb.io.cache import cache_entries, cached_sha256, file_sha256
from czb.io.fetch import fetch, is_remote

DATA = random.Random(0).randbytes(300_000)
DATA_SHA = hashlib.sha256(DATA).hexdigest()
OTHER = random.Random(1).randbytes(200_000)


def _files_named(root: Path, name: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(name)]


@pytest.fixture
def http(file_server: FileServer) -> FileServer:
    file_server.files["/d/data.bin"] = DATA
    return file_server


# --------------------------------------------------------------------------- HTTP


@pytest.mark.network
def test_http_download_then_cache_hit(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    assert path.read_bytes() == DATA
    assert path.name == "data.bin"
    assert path.is_relative_to(tmp_path / "downloads")
    assert cached_sha256(path) == DATA_SHA
    assert not _files_named(tmp_path, "data.bin.part")

    again = fetch(uri, sha256=DATA_SHA, cache_dir=tmp_path, offline=False)
    assert again == path
    assert len(http.gets()) == 1  # the second call only sent a HEAD
    [entry] = cache_entries(tmp_path)
    assert entry["uri"] == uri
    assert entry["path"] == path
    assert entry["sha256"] == DATA_SHA
    assert entry["size"] == len(DATA)


@pytest.mark.network
def test_http_resumes_within_one_call(http: FileServer, tmp_path: Path) -> None:
    http.cut_after, http.cuts_left = 100_000, 1
    path = fetch(http.url("/d/data.bin"), sha256=DATA_SHA, cache_dir=tmp_path, offline=False)
    assert path.read_bytes() == DATA
    first, second = http.gets()
    assert "Range" not in first
    assert second["Range"] == "bytes=100000-"


@pytest.mark.network
def test_http_resumes_a_part_left_behind(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    http.cut_after, http.cuts_left = 40_000, 100
    with pytest.raises(
        FetchError, match="interrupted after 120000 of 300000 bytes.*run again to resume"
    ):
        fetch(uri, cache_dir=tmp_path, offline=False)
    [part] = _files_named(tmp_path, "data.bin")  # only the .part: nothing at the final name
    assert part.name == "data.bin.part"
    assert part.stat().st_size == 120_000

    http.cuts_left = 0
    gets_before = len(http.gets())
    path = fetch(uri, sha256=DATA_SHA, cache_dir=tmp_path, offline=False)
    assert path.read_bytes() == DATA
    [resumed] = http.gets()[gets_before:]
    assert resumed["Range"] == "bytes=120000-"
    assert not part.exists()


@pytest.mark.network
def test_http_restarts_when_the_server_ignores_ranges(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    http.cut_after, http.cuts_left = 50_000, 100
    with pytest.raises(FetchError, match="interrupted"):
        fetch(uri, cache_dir=tmp_path, offline=False)
    [part] = _files_named(tmp_path, "data.bin.part")
    part.write_bytes(b"\0" * part.stat().st_size)  # had it been resumed, these zeros would show

    http.cuts_left, http.ignore_range = 0, True
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    assert http.gets()[-1]["Range"] == "bytes=150000-"  # asked for a range, got the whole file
    assert path.read_bytes() == DATA
    assert cached_sha256(path) == DATA_SHA


@pytest.mark.network
def test_http_changed_etag_gives_a_new_entry(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    old = fetch(uri, cache_dir=tmp_path, offline=False)
    http.files["/d/data.bin"] = OTHER
    new = fetch(uri, cache_dir=tmp_path, offline=False)
    assert new != old
    assert new.name == old.name == "data.bin"
    assert new.read_bytes() == OTHER
    assert old.read_bytes() == DATA  # the old version stays readable
    assert [e["path"] for e in cache_entries(tmp_path)] == [new, old]  # newest first
    assert fetch(uri, cache_dir=tmp_path, offline=True) == new


@pytest.mark.network
def test_http_changed_etag_discards_an_old_part(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    http.cut_after, http.cuts_left = 50_000, 100
    with pytest.raises(FetchError, match="interrupted"):
        fetch(uri, cache_dir=tmp_path, offline=False)
    http.cuts_left = 0
    http.files["/d/data.bin"] = OTHER
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    assert path.read_bytes() == OTHER
    assert "Range" not in http.gets()[-1]
    assert not _files_named(tmp_path, "data.bin.part")


@pytest.mark.network
def test_http_sha256_mismatch(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    wrong = "0" * 64
    with pytest.raises(FetchError) as info:
        fetch(uri, sha256=wrong, cache_dir=tmp_path, offline=False)
    message = str(info.value)
    assert uri in message and wrong in message and DATA_SHA in message
    assert not _files_named(tmp_path, "data.bin")
    assert cache_entries(tmp_path) == []


@pytest.mark.network
def test_http_sha256_mismatch_on_a_cache_hit(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    fetch(uri, cache_dir=tmp_path, offline=False)
    with pytest.raises(FetchError, match=f"expected {'f' * 64}, got {DATA_SHA}"):
        fetch(uri, sha256="F" * 64, cache_dir=tmp_path, offline=False)
    assert len(http.gets()) == 1


@pytest.mark.network
def test_http_cache_hit_without_etag(http: FileServer, tmp_path: Path) -> None:
    http.send_etag = False
    uri = http.url("/d/data.bin")
    assert fetch(uri, cache_dir=tmp_path, offline=False) == fetch(
        uri, cache_dir=tmp_path, offline=False
    )
    assert len(http.gets()) == 1


@pytest.mark.network
def test_http_redownloads_a_damaged_cache_entry(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    path.write_bytes(b"\1" * len(DATA))  # same size, other bytes, newer mtime
    assert cached_sha256(path) is None
    with pytest.warns(DatasetWarning, match="damaged or edited in the cache"):
        assert fetch(uri, cache_dir=tmp_path, offline=False).read_bytes() == DATA
    assert len(http.gets()) == 2


@pytest.mark.network
def test_http_offline(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/data.bin")
    with pytest.raises(FetchError, match=re.escape(uri) + r" is not in the cache .* offline"):
        fetch(uri, cache_dir=tmp_path, offline=True)
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    requests_before = len(http.log)
    assert fetch(uri, sha256=DATA_SHA, cache_dir=tmp_path, offline=True) == path
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(uri, sha256="a" * 64, cache_dir=tmp_path, offline=True)
    assert len(http.log) == requests_before  # offline: no request at all


@pytest.mark.network
def test_offline_comes_from_settings(
    http: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CZB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CZB_OFFLINE", "1")
    with pytest.raises(FetchError, match="offline"):
        fetch(http.url("/d/data.bin"))
    assert http.log == []


@pytest.mark.network
def test_http_404(http: FileServer, tmp_path: Path) -> None:
    uri = http.url("/d/missing.bin")
    with pytest.raises(FetchError, match=re.escape(uri) + ".*HTTP 404"):
        fetch(uri, cache_dir=tmp_path, offline=False)
    assert not (tmp_path / "downloads").exists() or not _files_named(tmp_path, "missing.bin")


@pytest.mark.network
def test_http_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}/data.bin"
    with pytest.raises(FetchError) as info:
        fetch(uri, cache_dir=tmp_path, offline=False)
    assert str(info.value).startswith(f"cannot fetch {uri}: Connection refused; check the network")


@pytest.mark.network
def test_http_progress_bar(http: FileServer, tmp_path: Path) -> None:
    path = fetch(http.url("/d/data.bin"), cache_dir=tmp_path, offline=False, progress=True)
    assert path.read_bytes() == DATA


# --------------------------------------------------------------------------- S3 (moto server)

BUCKET = S3_TEST_BUCKET


def _put(admin: object, key: str, body: bytes, acl: str = "public-read") -> str:
    # moto refuses anonymous reads unless the object is public, like S3 does.
    admin.put_object(Bucket=BUCKET, Key=key, Body=body, ACL=acl)  # type: ignore[attr-defined]
    return f"s3://{BUCKET}/{key}"


@pytest.mark.network
def test_s3_download_then_cache_hit(s3: object, tmp_path: Path) -> None:
    uri = _put(s3, "hit/data.bin", DATA)
    path = fetch(uri, sha256=DATA_SHA, cache_dir=tmp_path, offline=False)
    assert path.read_bytes() == DATA
    assert path.name == "data.bin"
    assert cached_sha256(path) == DATA_SHA
    before = path.stat()
    assert fetch(uri, sha256=DATA_SHA, cache_dir=tmp_path, offline=False) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten


@pytest.mark.network
def test_s3_resumes_with_a_range(s3: object, tmp_path: Path) -> None:
    uri = _put(s3, "resume/data.bin", DATA)
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    # Turn the finished download back into an unfinished one whose first bytes are marked:
    # if they survive, the rest must have come from a Range request.
    (path.parent / ".czb-entry.json").unlink()
    path.rename(path.with_name("data.bin.part"))
    path.with_name("data.bin.part").write_bytes(b"\0" * 1000 + DATA[1000:100_000])
    resumed = fetch(uri, cache_dir=tmp_path, offline=False)
    assert resumed == path
    assert resumed.read_bytes() == b"\0" * 1000 + DATA[1000:]


@pytest.mark.network
def test_s3_changed_object_gives_a_new_entry(s3: object, tmp_path: Path) -> None:
    uri = _put(s3, "change/data.bin", DATA)
    old = fetch(uri, cache_dir=tmp_path, offline=False)
    _put(s3, "change/data.bin", OTHER)
    new = fetch(uri, cache_dir=tmp_path, offline=False)
    assert new != old and new.read_bytes() == OTHER and old.read_bytes() == DATA


@pytest.mark.network
def test_s3_missing_key_and_bucket(s3: object, tmp_path: Path) -> None:
    uri = f"s3://{BUCKET}/no/such.bin"
    with pytest.raises(FetchError, match=re.escape(uri) + ".*NoSuchKey") as info:
        fetch(uri, cache_dir=tmp_path, offline=False)
    assert "\n" not in str(info.value) and "botocore" not in str(info.value)
    with pytest.raises(FetchError, match="NoSuchBucket"):
        fetch("s3://no-such-czb-bucket/x.bin", cache_dir=tmp_path, offline=False)


@pytest.mark.network
def test_s3_private_object(s3: object, tmp_path: Path) -> None:
    uri = _put(s3, "private/data.bin", DATA, acl="private")
    with pytest.raises(FetchError, match=re.escape(uri) + ".*access denied"):
        fetch(uri, cache_dir=tmp_path, offline=False)


@pytest.mark.network
def test_s3_offline(s3: object, tmp_path: Path) -> None:
    uri = _put(s3, "offline/data.bin", DATA)
    with pytest.raises(FetchError, match=re.escape(uri) + " is not in the cache"):
        fetch(uri, cache_dir=tmp_path, offline=True)
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    s3.delete_object(Bucket=BUCKET, Key="offline/data.bin")  # type: ignore[attr-defined]
    assert fetch(uri, sha256=DATA_SHA, cache_dir=tmp_path, offline=True) == path


def test_s3_uri_without_key(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="s3://bucket/key"):
        fetch("s3://just-a-bucket", cache_dir=tmp_path, offline=False)


# --------------------------------------------------------------------------- local files


def test_local_path_is_returned_as_is(tmp_path: Path) -> None:
    local = tmp_path / "data.bin"
    local.write_bytes(DATA)
    assert fetch(str(local), cache_dir=tmp_path / "cache", offline=True) == local
    assert fetch(local.as_uri(), cache_dir=tmp_path / "cache", offline=True) == local
    assert not (tmp_path / "cache").exists()  # nothing copied, nothing recorded


def test_local_file_uri_with_escapes(tmp_path: Path) -> None:
    local = tmp_path / "my data.bin"
    local.write_bytes(b"x")
    assert local.as_uri().endswith("my%20data.bin")
    assert fetch(local.as_uri(), cache_dir=tmp_path) == local


def test_missing_local_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.h5ad"
    with pytest.raises(FetchError, match=f"no such file: {re.escape(str(missing))}"):
        fetch(str(missing), cache_dir=tmp_path)
    with pytest.raises(FetchError, match=f"no such file: {re.escape(str(missing))}"):
        fetch(missing.as_uri(), cache_dir=tmp_path)


def test_local_sha256_is_checked_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "data.bin"
    local.write_bytes(DATA)
    cache = tmp_path / "cache"
    calls = []
    real = cache_module.file_sha256
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: calls.append(p) or real(p))

    assert fetch(str(local), sha256=DATA_SHA, cache_dir=cache) == local
    assert fetch(str(local), sha256=DATA_SHA, cache_dir=cache) == local
    assert len(calls) == 1  # the second call trusted the (path, size, mtime) record
    assert cached_sha256(local, cache_dir=cache) == DATA_SHA
    with pytest.raises(FetchError, match=f"expected {'0' * 64}, got {DATA_SHA}"):
        fetch(str(local), sha256="0" * 64, cache_dir=cache)
    assert len(calls) == 1

    local.write_bytes(OTHER)  # a changed file is hashed again
    assert cached_sha256(local, cache_dir=cache) is None
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(str(local), sha256=DATA_SHA, cache_dir=cache)
    assert len(calls) == 2


def test_unsupported_schemes(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="unsupported URI scheme 'gs'"):
        fetch("gs://bucket/x.h5ad", cache_dir=tmp_path)
    with pytest.raises(FetchError, match="unsupported URI scheme 'builtin'"):
        fetch("builtin:pbmc3k", cache_dir=tmp_path)


def test_is_remote() -> None:
    assert is_remote("s3://b/k") and is_remote("https://x/y") and is_remote("HTTP://x/y")
    assert (
        not is_remote("/data/x.h5ad") and not is_remote("file:///x") and not is_remote("C:\\x.h5ad")
    )
    assert not is_remote("synthetic:blobs")


def test_file_sha256(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(DATA * 5)  # more than one chunk
    assert file_sha256(big) == hashlib.sha256(DATA * 5).hexdigest()
    assert cache_entries(tmp_path / "empty") == []


def test_known_sha256_hashes_a_local_file_once(tmp_path, monkeypatch):
    import hashlib

    from czb.io import cache as cache_module
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc" * 1000)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    assert cache_module.known_sha256(path, cache_dir=cache) == expected
    calls = []
    monkeypatch.setattr(cache_module, "file_sha256", lambda p: calls.append(p) or "x")
    assert cache_module.known_sha256(path, cache_dir=cache) == expected
    assert calls == []
