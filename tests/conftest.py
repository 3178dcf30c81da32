import hashlib
import os
import re
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch):
    """Every test gets its own cache and output folders and no user spec folders."""
    base = tmp_path_factory.mktemp("czb-home")
    monkeypatch.setenv("CZB_CACHE_DIR", str(base / "cache"))
    monkeypatch.setenv("CZB_OUTPUT_DIR", str(base / "results"))
    monkeypatch.delenv("CZB_CONFIG_PATH", raising=False)
    monkeypatch.setenv("CZB_N_JOBS", "2")


def planted_embedding(n_cells=900, n_types=5, n_batches=3, dim=20, *, separation=4.0, batch_shift=0.8, seed=0):
    """Gaussian clusters per cell type plus a batch offset: (X, labels, batches)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    centers = rng.normal(size=(n_types, dim)) * separation
    shifts = rng.normal(size=(n_batches, dim)) * batch_shift
    X = centers[labels] + shifts[batches] + rng.normal(size=(n_cells, dim))
    return X, np.array([f"type{i}" for i in labels]), np.array([f"batch{b}" for b in batches])


@pytest.fixture
def planted():
    return planted_embedding()


# --------------------------------------------------------------------------- S3 (moto server)

S3_TEST_BUCKET = "czb-test-bucket"


@pytest.fixture(scope="session")
def _moto() -> Iterator[tuple[str, object]]:
    """A moto S3 server on loopback with one bucket, and a signed admin client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # Signed with dummy credentials to set things up; fetch itself goes unsigned.
    admin = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    admin.create_bucket(Bucket=S3_TEST_BUCKET)
    yield endpoint, admin
    server.stop()


@pytest.fixture
def s3(_moto: tuple[str, object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> object:
    """The moto server as czb's S3 endpoint, with the developer's AWS setup kept out."""
    endpoint, admin = _moto
    monkeypatch.setenv("CZB_S3_ENDPOINT_URL", endpoint)
    # Keep the developer's AWS setup out of it.
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return admin


# --------------------------------------------------------------------------- an HTTP server


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` with ETag, Content-Length, HEAD and Range (and ``content_types``); can
    cut responses short."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reset()

    def reset(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}  # path -> Content-Type header, where one is sent
        self.log: list[tuple[str, str, dict[str, str]]] = []
        self.cut_after = 0  # bytes of the body sent before the connection is dropped...
        self.cuts_left = 0  # ...for this many GETs
        self.ignore_range = False
        self.send_etag = True

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def gets(self) -> list[dict[str, str]]:
        return [headers for method, _, headers in self.log if method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv = self.server
        srv.log.append((self.command, self.path, dict(self.headers)))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.sha1(data).hexdigest()[:16]}"'
        start, status = 0, 200
        range_ = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if range_ and not srv.ignore_range and if_range in (None, etag):
            start = int(re.fullmatch(r"bytes=(\d+)-", range_).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = data[start:]
        self.send_response(status)
        if srv.send_etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Accept-Ranges", "bytes")
        if self.path in srv.content_types:
            self.send_header("Content-Type", srv.content_types[self.path])
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if srv.cuts_left > 0:
            srv.cuts_left -= 1
            payload = payload[: srv.cut_after]  # then the connection closes: a truncated body
        self.wfile.write(payload)


@pytest.fixture(scope="session")
def _file_server() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def file_server(_file_server: FileServer) -> FileServer:
    """The loopback HTTP server, emptied."""
    _file_server.reset()
    return _file_server


# --------------------------------------------------------------------------- the command line


def invoke(*args, **kwargs):
    """``czb ARGS`` through Typer's runner (arguments turned into strings)."""
    from typer.testing import CliRunner

    from czb.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def error_line(result, *, usage: bool = False) -> str:
    """The one ``error:`` line on stderr (fails if there is none or more than one); with
    ``usage``, click's own ``Error:`` lines count too."""
    prefixes = ("error:", "Error:") if usage else ("error:",)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(prefixes)]
    assert len(lines) == 1, result.output
    return lines[0]


def assert_clean_exit(result, code: int | tuple[int, ...]) -> None:
    """Exit ``code`` (or one of them), with no traceback and no exception escaping."""
    codes = code if isinstance(code, tuple) else (code,)
    assert result.exit_code in codes, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def assert_clean_failure(result, code: int | tuple[int, ...] = 1, *, usage: bool = False) -> str:
    """:func:`assert_clean_exit`, and the failure's one error line."""
    assert_clean_exit(result, code)
    return error_line(result, usage=usage)


def write_text(folder: Path, name: str, text: str) -> Path:
    """``text`` (dedented) written to ``folder/name``, the folder made as needed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def published_file(folder: Path, name: str, data: bytes) -> Path:
    """``data`` written to ``folder/name`` as a file anyone may read (a local weights
    source czb agrees to stage), the folder made as needed."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- Docker


def docker_engine_or_skip():
    """A Docker client whose engine holds the test base image (``CZB_TEST_BASE_IMAGE``);
    skips without one, fails instead under ``CZB_REQUIRE_DOCKER=1`` (as CI sets)."""
    from czb.models.docker import engine as docker_engine
    base_image = os.environ.get("CZB_TEST_BASE_IMAGE", "czb-base:bookworm")
    try:
        engine = docker_engine.client()
        engine.images.get(base_image)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CZB_REQUIRE_DOCKER") == "1":
            pytest.fail(f"CZB_REQUIRE_DOCKER=1 but Docker is not usable: {e}")
        pytest.skip(f"no Docker engine with base image {base_image}: {e}")
    return engine
