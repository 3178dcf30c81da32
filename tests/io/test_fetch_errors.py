"""A failed fetch names the whole URI and the next step (issue 19).

Against real servers on loopback: a closed port, the loopback HTTP server (404) and a
moto S3 server; then through the CLI, where the next step gets a ``hint:`` line of its
own under the one ``error:`` line.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from conftest import S3_TEST_BUCKET, FileServer, invoke

from czb.core.errors import DatasetError, FetchError
from czb.io.fetch import fetch
from czb.io.source import short_cause

#: Long enough that any cut at 120 or 200 characters would land inside it.
LONG_PATH = "/datasets/" + "/".join(f"part{i:02d}-of-a-long-path" for i in range(12)) + "/cells.h5ad"


def closed_port() -> int:
    with socket.socket() as s:  # a port that nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused_uri() -> str:
    return f"http://127.0.0.1:{closed_port()}{LONG_PATH}"


def fails(uri: str, tmp_path: Path, *, offline: bool = False) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(uri, cache_dir=tmp_path, offline=offline)
    return info.value


def assert_network_hint(hint: str) -> None:
    assert "czb datasets fetch NAME" in hint and "connected machine" in hint, hint
    assert "CZB_CACHE_DIR" in hint, hint


# --------------------------------------------------------------------------- the library


@pytest.mark.network
def test_unreachable_url_names_the_whole_uri_and_the_next_step(tmp_path):
    uri = refused_uri()
    error = fails(uri, tmp_path)
    text = str(error)
    assert text.startswith(f"cannot fetch {uri}: Connection refused; ")
    assert text.count(LONG_PATH) == 1 and "..." not in text and "…" not in text
    assert text.endswith(f"; {error.hint}")
    assert_network_hint(error.hint)
    assert error.hint.endswith("then use --offline")


@pytest.mark.network
def test_host_that_does_not_resolve_gives_the_cause_not_a_cut_copy_of_the_url(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    uri = f"https://data.example.invalid{LONG_PATH}"
    text = str(fails(uri, tmp_path))
    assert text.startswith(f"cannot fetch {uri}: cannot resolve the host name (Name or service not known); ")
    # requests repeats the URL's path in its message; the cause must not carry a copy of it.
    assert text.count(LONG_PATH) == 1 and "Max retries" not in text and "..." not in text


def test_a_wrapped_cause_drops_the_pool_and_the_url_and_stays_bounded():
    import requests

    wrapped = requests.exceptions.ConnectionError(
        f"HTTPSConnectionPool(host='h.example', port=443): Max retries exceeded with url: {LONG_PATH} "
        "(Caused by ProxyError('Unable to connect to proxy'))"
    )
    cause = short_cause(wrapped)
    assert cause == "gave up after retries (Caused by ProxyError('Unable to connect to proxy'))"
    long = short_cause(RuntimeError("x" * 500))
    assert len(long) == 200 and long.endswith("…")


@pytest.mark.network
def test_404_names_the_whole_uri_and_says_to_check_it(file_server: FileServer, tmp_path):
    uri = file_server.url(LONG_PATH)
    error = fails(uri, tmp_path)
    assert str(error).startswith(f"cannot fetch {uri}: HTTP 404")
    assert error.hint == "check the uri in its spec: the server has no such file, or refuses it"


@pytest.mark.network
def test_a_copy_cached_earlier_is_named_when_the_remote_fails(file_server: FileServer, tmp_path):
    where = LONG_PATH.replace(".h5ad", ".bin")  # any bytes make a .bin file
    uri = file_server.url(where)
    file_server.files[where] = b"cells" * 100
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    del file_server.files[where]  # gone from the server: 404, but the cache has it
    error = fails(uri, tmp_path)
    assert error.hint.startswith("check the uri in its spec; a copy fetched 20")
    assert f"is in the cache ({tmp_path}): use --offline" in error.hint
    assert fetch(uri, cache_dir=tmp_path, offline=True) == path  # what the hint promises


@pytest.mark.network
def test_a_copy_cached_earlier_is_named_when_the_network_fails(s3, tmp_path, monkeypatch):
    uri = f"s3://{S3_TEST_BUCKET}/cached/cells.bin"
    s3.put_object(Bucket=S3_TEST_BUCKET, Key="cached/cells.bin", Body=b"cells" * 100, ACL="public-read")
    path = fetch(uri, cache_dir=tmp_path, offline=False)
    monkeypatch.setenv("CZB_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")  # the network is gone
    error = fails(uri, tmp_path)
    assert str(error).startswith(f"cannot fetch {uri}: Connection refused; a copy fetched 20")
    assert error.hint.endswith(f"is in the cache ({tmp_path}): use --offline (or CZB_OFFLINE=1) to run on it")
    assert fetch(uri, cache_dir=tmp_path, offline=True) == path


@pytest.mark.network
def test_offline_with_nothing_cached_names_the_whole_uri_and_the_next_step(tmp_path):
    uri = f"https://data.example.org{LONG_PATH}"
    error = fails(uri, tmp_path, offline=True)
    assert str(error).startswith(f"{uri} is not in the cache ({tmp_path / 'downloads'}) and czb is offline")
    assert str(error).endswith(f"; {error.hint}")
    assert_network_hint(error.hint)


@pytest.mark.network
def test_s3_missing_key_says_to_check_the_uri(s3, tmp_path):
    uri = f"s3://{S3_TEST_BUCKET}{LONG_PATH}"
    error = fails(uri, tmp_path)
    assert str(error).startswith(f"cannot fetch {uri}: no such key") and "NoSuchKey" in str(error)
    assert error.hint.startswith("check the uri in its spec")


# --------------------------------------------------------------------------- the CLI


def dataset_specs(tmp_path: Path, uri: str) -> Path:
    spec = {"uri": uri, "organism": "human", "label_key": "cell_type", "gene_id_type": "ensembl"}
    folder = tmp_path / "specs"
    folder.mkdir(exist_ok=True)
    (folder / "datasets.yaml").write_text(yaml.safe_dump({"datasets": {"remote": spec}}))
    return folder


def error_and_hint(result) -> tuple[str, str]:
    """The ``error:`` line and the ``hint:`` line right under it (nothing else on stderr)."""
    assert result.exit_code == 1, result.output[-3000:]
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip() and "━" not in ln]  # progress bars
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.stderr
    return lines[0], lines[1]


@pytest.mark.network
def test_datasets_fetch_of_an_unreachable_url(tmp_path):
    uri = refused_uri()
    error, hint = error_and_hint(invoke("datasets", "fetch", "remote", "--config-dir", dataset_specs(tmp_path, uri)))
    assert error == f"error: cannot fetch {uri}: Connection refused"
    assert_network_hint(hint)


@pytest.mark.network
def test_run_of_a_dataset_whose_url_is_404(file_server: FileServer, tmp_path):
    uri = file_server.url(LONG_PATH)
    result = invoke("run", "--dataset", "remote", "--task", "clustering", "--model", "pca", "--no-baseline",
                    "--seeds", "0", "--config-dir", dataset_specs(tmp_path, uri), "--output-dir", tmp_path / "out")
    error, hint = error_and_hint(result)
    assert error == f"error: cannot fetch {uri}: HTTP 404 Not Found"
    assert hint == "hint: check the uri in its spec: the server has no such file, or refuses it"


def test_run_offline_with_nothing_cached(tmp_path):
    uri = f"https://data.example.org{LONG_PATH}"
    result = invoke("run", "--dataset", "remote", "--task", "clustering", "--model", "pca", "--no-baseline",
                    "--seeds", "0", "--offline", "--config-dir", dataset_specs(tmp_path, uri),
                    "--output-dir", tmp_path / "out")
    error, hint = error_and_hint(result)
    assert error.startswith(f"error: {uri} is not in the cache (") and error.endswith("czb is offline (--offline or CZB_OFFLINE)")
    assert_network_hint(hint.removeprefix("hint: "))


def test_the_hint_line_survives_an_error_raised_from_the_fetch_error():
    from czb.cli.common import _split_hint

    error = FetchError("cannot fetch u: why; do this")
    error.hint = "do this"
    try:
        try:
            raise error
        except FetchError as e:
            raise DatasetError(str(e)) from e  # as czb.pipeline.work wraps a dataset's error
    except DatasetError as wrapped:
        assert _split_hint(wrapped) == ("cannot fetch u: why", "do this")
    # A hint the message does not end with is not split off: the message prints whole.
    other = DatasetError("dataset 'x': cannot fetch u: why")
    other.__cause__ = error
    assert _split_hint(other) == ("dataset 'x': cannot fetch u: why", None)
    assert _split_hint(DatasetError("plain")) == ("plain", None)
