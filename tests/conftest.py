from collections.abc import Iterator
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
