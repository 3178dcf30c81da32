"""Which Dockerfile ``czb models build`` builds a model folder with, without Docker."""

from __future__ import annotations

import pytest

from czb.models.docker import engine as docker_engine
from czb.models.docker.images import build_model_image
from czb.specs.schema import BUNDLED_CONTAINERS_DIR, ModelSpec

COMMON = BUNDLED_CONTAINERS_DIR / "common"
BUNDLED_MODELS = sorted(p.parent.name for p in BUNDLED_CONTAINERS_DIR.glob("*/entrypoint.py"))


@pytest.fixture
def builds(monkeypatch):
    """The arguments of each ``build_image`` call, which builds nothing."""
    calls = []
    monkeypatch.setattr(docker_engine, "client", lambda: object())
    monkeypatch.setattr(docker_engine, "build_image", lambda _engine, **kwargs: calls.append(kwargs))
    return calls


def spec_in(folder, monkeypatch) -> ModelSpec:
    monkeypatch.setattr(ModelSpec, "container_dir", lambda _self: folder)
    return ModelSpec(name="m", kind="docker", image="czb-test/m:1", container="m")


def test_folder_with_its_own_dockerfile_is_built_with_it(tmp_path, monkeypatch, builds):
    (tmp_path / "Dockerfile").write_text("FROM scratch\n")
    (tmp_path / "entrypoint.py").write_text("")
    build_model_image(spec_in(tmp_path, monkeypatch))
    assert builds[0]["dockerfile"] == "model/Dockerfile"
    assert builds[0]["context_parts"] == {"model": tmp_path, "common": COMMON}
    assert builds[0]["tag"] == "czb-test/m:1"


def test_folder_without_a_dockerfile_is_built_with_the_template(tmp_path, monkeypatch, builds):
    (tmp_path / "entrypoint.py").write_text("")
    build_model_image(spec_in(tmp_path, monkeypatch), base_image="b:1", torch_spec="torch==2")
    assert builds[0]["dockerfile"] == "common/Dockerfile"
    assert builds[0]["context_parts"] == {"model": tmp_path, "common": COMMON}
    assert builds[0]["build_args"] == {"BASE_IMAGE": "b:1", "TORCH_SPEC": "torch==2"}
    assert (COMMON / "Dockerfile").is_file()


def ci_built() -> dict[str, bool]:
    """Each bundled container folder: whether CI builds its image (every spec using it says)."""
    from czb.specs.catalog import Catalog

    built: dict[str, bool] = {}
    for spec in Catalog.load().models.values():
        if spec.kind == "docker":
            built[spec.container] = built.get(spec.container, True) and spec.ci_built
    return built


def test_bundled_models_are_built_with_the_template():
    built = ci_built()
    assert set(built) == set(BUNDLED_MODELS)
    in_ci = [model for model in BUNDLED_MODELS if built[model]]
    assert in_ci == ["aido_cell", "geneformer", "scgpt", "scvi", "transcriptformer", "uce"]
    for model in BUNDLED_MODELS:
        folder = BUNDLED_CONTAINERS_DIR / model
        # An image CI cannot build (scGenePT's code comes from GitHub) has its own Dockerfile.
        assert (folder / "Dockerfile").exists() == (not built[model]), model
        assert (folder / "requirements.txt").is_file(), model
        assert (folder / "README.md").is_file(), model  # what is installed --no-deps, and why
