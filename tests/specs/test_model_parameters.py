"""Model parameters declared in the spec: the declared form and the shorthand, checks of a
declaration at load (``file:line``), values resolved on the host before anything runs,
and the bundled specs declaring every parameter their code reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import assert_clean_failure, invoke
from conftest import write_text as write

from czb.core.errors import SpecError, UnknownNameError
from czb.models.baselines import BASELINES
from czb.models.docker import engine as docker_engine
from czb.specs.catalog import Catalog
from czb.specs.loading import load_spec_file
from czb.specs.parameters import ModelParameter, resolve_parameters
from czb.specs.schema import DEFAULT_BATCH_SIZE, ModelSpec

CONTAINERS = Path(__file__).resolve().parents[2] / "containers"
#: How an entrypoint reads a declared parameter.
READ = re.compile(r"""job\.parameter\(\s*["']([A-Za-z_][A-Za-z0-9_]*)["']\s*\)""")
TINY = ("--dataset", "synthetic_cells_tiny", "--seeds", "0", "--n-jobs", "1")


def docker_spec(parameters: str) -> str:
    return f"""\
    models:
      tiny:
        kind: docker
        image: czb-test/tiny:1
        container: tiny
        parameters:
{parameters}
    """


DECLARED = """\
          min_genes: {type: int, default: 0, minimum: 0, description: cells with fewer genes are dropped}
          mode:
            type: str
            default: fast
            choices: [fast, exact]
            description: how to embed
          scale: {type: float, default: 1, minimum: 0, maximum: 2}
"""


# ----------------------------------------------------------------------------- declarations


def test_declared_form_and_shorthand_load_to_the_same_declarations(tmp_path):
    path = write(tmp_path, "models.yaml", docker_spec(DECLARED + "          legacy: 3\n          flag: true\n"))
    spec = load_spec_file(path)["models"]["tiny"]
    assert spec.parameters["mode"] == ModelParameter(type="str", default="fast", choices=["fast", "exact"],
                                                     description="how to embed")
    assert spec.parameters["scale"].default == 1.0 and isinstance(spec.parameters["scale"].default, float)
    # Shorthand: the type is the value's, no description, no bounds.
    assert spec.parameters["legacy"] == ModelParameter(type="int", default=3)
    assert spec.parameters["flag"] == ModelParameter(type="bool", default=True)
    # Every docker model has a batch size: the contract's field, at least 1.
    assert spec.parameters["batch_size"] == ModelParameter(type="int", default=DEFAULT_BATCH_SIZE, minimum=1,
                                                           description="cells per forward pass")


def test_old_shorthand_specs_still_load_and_run_with_their_values(tmp_path):
    path = write(tmp_path, "models.yaml", """\
    models:
      old:
        kind: docker
        image: x:1
        container: x
        parameters: {batch_size: 64, emb_layer: -1, precision: auto, fraction: 0.5, compile: false}
    """)
    spec = load_spec_file(path)["models"]["old"]
    assert resolve_parameters(spec) == {"batch_size": 64, "emb_layer": -1, "precision": "auto",
                                        "fraction": 0.5, "compile": False}
    assert spec.parameters["batch_size"].minimum == 1  # a shorthand batch size is still at least 1


@pytest.mark.parametrize("declaration, problem", [
    ("{type: int, default: 1.5}", "parameters.k.default: Value error, must be an int, got 1.5"),
    ("{type: int, default: '3'}", "parameters.k.default: Value error, must be an int, got a str"),
    ("{type: bool, default: 1}", "parameters.k.default: Value error, must be a bool, got 1"),
    ("{type: float, default: .nan}", "must be a finite float"),
    ("{type: int, default: 5, minimum: 6}", "parameters.k.default: Value error, must be at least 6, got 5"),
    ("{type: int, default: 5, maximum: 4}", "must be at most 4, got 5"),
    ("{type: int, default: 2, minimum: 3, maximum: 1}", "parameters.k.maximum: Value error, 1 is below minimum 3"),
    ("{type: str, default: a, minimum: 1}", "parameters.k.minimum: Value error, applies to int and float"),
    ("{type: str, default: c, choices: [a, b]}", "must be one of 'a', 'b', got 'c'"),
    ("{type: int, default: 1, choices: [1, x]}", "parameters.k.choices: Value error, each choice must be an int"),
    ("{type: int, default: 1, choices: [1, 9], maximum: 5}", "choice must be at most 5, got 9"),
    ("{type: int, default: 1, choices: []}", "choices must list at least one value"),
    ("{type: list, default: [1]}", "parameters.k.type: Input should be 'int', 'float', 'str' or 'bool'"),
    ("{type: int}", "parameters.k.default: Field required"),
    ("{type: int, default: 1, help: x}", "parameters.k.help: Extra inputs are not permitted"),
    ("[1, 2]", "the shorthand `k: value` takes an int, float, str or bool"),
])
def test_a_bad_declaration_is_a_spec_error_with_file_and_line(tmp_path, declaration, problem):
    text = docker_spec(f"          ok: 1\n          k: {declaration}\n")
    path = write(tmp_path / "cfg", "bad.yaml", text)
    with pytest.raises(SpecError) as excinfo:
        load_spec_file(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: models.tiny.") and problem in message
    # The line of the parameter's own key (the shorthand's error is the mapping's: its field).
    line = 6 if declaration.startswith("[") else 8
    assert message.endswith(f"(line {line})"), message
    # The same one line through the CLI.
    assert "bad.yaml" in assert_clean_failure(invoke("list", "models", "--config-dir", path.parent))


@pytest.mark.parametrize("name", ["1st", "has-dash", "sp ace", "x" * 65])
def test_parameter_names_are_identifiers(tmp_path, name):
    path = write(tmp_path, "bad.yaml", docker_spec(f"          '{name}': 1\n"))
    with pytest.raises(SpecError, match="must start with a letter or _"):
        load_spec_file(path)


def test_a_docker_batch_size_must_be_an_int(tmp_path):
    path = write(tmp_path, "bad.yaml", docker_spec("          batch_size: {type: str, default: big}\n"))
    with pytest.raises(SpecError, match="batch_size .cells per forward pass. must be an int"):
        load_spec_file(path)


# ----------------------------------------------------------------------------- resolution


def tiny_spec() -> ModelSpec:
    return ModelSpec(name="tiny", kind="docker", image="x:1", container="x",
                     parameters={"min_genes": {"type": "int", "default": 0, "minimum": 0},
                                 "mode": {"type": "str", "default": "fast", "choices": ["fast", "exact"]},
                                 "on": True, "scale": 0.5})


def test_resolution_fills_defaults_and_parses_overrides_by_declared_type():
    spec = tiny_spec()
    assert resolve_parameters(spec) == {"min_genes": 0, "mode": "fast", "on": True, "scale": 0.5,
                                        "batch_size": DEFAULT_BATCH_SIZE}
    given = {"min_genes": "7", "mode": "exact", "on": "no", "scale": "2", "batch_size": 3}
    assert resolve_parameters(spec, given) == {"min_genes": 7, "mode": "exact", "on": False, "scale": 2.0,
                                               "batch_size": 3}


@pytest.mark.parametrize("overrides, error, text", [
    ({"min_gene": 3}, UnknownNameError, "model 'tiny' has no parameter 'min_gene'; did you mean 'min_genes'?"),
    ({"min_genes": -1}, SpecError, "model 'tiny': parameter min_genes must be at least 0, got -1"),
    ({"min_genes": "many"}, SpecError, "parameter min_genes must be an int, got a str"),
    ({"mode": "slow"}, SpecError, "parameter mode must be one of 'fast', 'exact', got 'slow'"),
    ({"on": "perhaps"}, SpecError, "parameter on must be a bool"),
    ({"batch_size": 0}, SpecError, "parameter batch_size must be at least 1, got 0"),
])
def test_resolution_refuses_what_the_declarations_do_not_allow(overrides, error, text):
    with pytest.raises(error) as excinfo:
        resolve_parameters(tiny_spec(), overrides)
    assert text in str(excinfo.value)


# ----------------------------------------------------------------------------- through the CLI


@pytest.fixture
def no_docker(monkeypatch):
    """Any call to the container engine fails the test."""
    def refused(*args, **kwargs):
        raise AssertionError("the container engine was called")

    monkeypatch.setattr(docker_engine, "client", refused)


def _run_tiny(tmp_path, *params):
    cfg = write(tmp_path / "cfg", "models.yaml", docker_spec(DECLARED)).parent
    out = tmp_path / "out"
    result = invoke("run", "--model", "tiny", "--task", "embedding", *TINY, "--config-dir", cfg,
                    "--output-dir", out, *params)
    return result, out


def test_misspelled_parameter_is_refused_with_the_close_match_before_anything_runs(tmp_path, no_docker):
    result, out = _run_tiny(tmp_path, "--param", "min_gene=3")
    line = assert_clean_failure(result, 2)
    assert "model 'tiny' has no parameter 'min_gene'; did you mean 'min_genes'?" in line
    assert not out.exists() or not list(out.rglob("*.json"))


@pytest.mark.parametrize("param, code, text", [
    ("min_genes=-2", 1, "parameter min_genes must be at least 0, got -2"),
    ("mode=slow", 1, "parameter mode must be one of 'fast', 'exact', got 'slow'"),
    ("min_genes", 2, "takes NAME=VALUE"),
])
def test_bad_parameter_values_are_refused_before_anything_runs(tmp_path, no_docker, param, code, text):
    result, out = _run_tiny(tmp_path, "--param", param)
    assert text in assert_clean_failure(result, code, usage=code == 2)
    assert not out.exists() or not list(out.rglob("*.json"))


def test_batch_size_flag_is_checked_like_a_parameter(tmp_path, no_docker):
    result, _ = _run_tiny(tmp_path, "--param", "batch_size=0")
    assert "parameter batch_size must be at least 1, got 0" in assert_clean_failure(result)


# ----------------------------------------------------------------------------- the bundled specs


def bundled_docker_models() -> dict[str, list[ModelSpec]]:
    """Bundled docker model specs by their container folder (one image may serve several
    models: scvi and scvi_denovo)."""
    models: dict[str, list[ModelSpec]] = {}
    for m in Catalog.load().models.values():
        if m.kind == "docker":
            models.setdefault(m.container, []).append(m)
    return models


def test_every_bundled_entrypoint_reads_exactly_the_parameters_its_spec_declares():
    models = bundled_docker_models()
    entrypoints = sorted(CONTAINERS.glob("*/entrypoint.py"))
    assert {p.parent.name for p in entrypoints} == set(models) and len(models) == 7
    for path in entrypoints:
        # The entrypoint and the modules beside it (scvi's de novo mode is in denovo.py).
        code = "\n".join(p.read_text() for p in sorted(path.parent.glob("*.py"))
                         if not p.name.startswith("test_"))
        specs = models[path.parent.name]
        read = set(READ.findall(code))
        # Parameters reach an entrypoint through job.parameter only: no defaults of its own.
        assert not re.search(r"\.parameters\b", code), f"{path}: reads parameters other than by job.parameter"
        declared = set().union(*(spec.parameters for spec in specs))
        assert read <= declared, f"{path}: reads undeclared {sorted(read - declared)}"
        for spec in specs:
            unread = set(spec.parameters) - read - {"batch_size"}  # batch_size is the request's own field
            assert not unread, f"{spec.name}: declares {sorted(unread)}, which its entrypoint never reads"


def test_every_bundled_parameter_is_described_on_one_line():
    for spec in Catalog.load().models.values():
        for name, declared in spec.parameters.items():
            assert declared.description and "\n" not in declared.description, f"{spec.name}.{name}"


def test_in_process_baselines_default_as_their_specs_declare():
    specs = {m.implementation: m for m in Catalog.load().models.values() if m.implementation in BASELINES}
    assert set(specs) == set(BASELINES)
    for implementation, cls in BASELINES.items():
        assert resolve_parameters(specs[implementation]) == cls.defaults, implementation
