"""The container side of the contract (containers/common/czb_container.py), on the host.

The module needs only the standard library, numpy and anndata; torch is not installed
here, so checkpoint loading is tested with a fake module over numpy arrays.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

COMMON = Path(__file__).resolve().parents[2] / "containers" / "common"
if str(COMMON) not in sys.path:
    sys.path.insert(0, str(COMMON))
import czb_container as cc  # noqa: E402
from czb_container import ContractError, PartialLoadError, Request  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_hash_seed(monkeypatch):
    # run() seeds everything and sets PYTHONHASHSEED; monkeypatch puts it back afterwards.
    monkeypatch.setenv("PYTHONHASHSEED", "0")


def write_request(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "request.json"
    path.write_text(json.dumps({"model": "m", **fields}))
    return path


# --------------------------------------------------------------------------- request


def test_request_defaults_and_round_trip(tmp_path):
    request = Request.from_file(write_request(tmp_path, batch_keys=["a", "b"], parameters={"k": 1}))
    assert request.model == "m" and request.seed == 0 and request.device == "cpu"
    assert request.batch_size == 32 and request.batch_keys == ("a", "b")
    assert request.parameters == {"k": 1} and request.contract_version == 1
    (tmp_path / "again.json").write_text(request.to_json())
    assert Request.from_file(tmp_path / "again.json") == request


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "request file missing"),
        ("{not json", "cannot read request"),
        ("[1, 2]", "request must be a JSON object"),
        ({"model": "m", "colour": "red", "size": 1}, "unknown request field(s) colour, size"),
        ({"model": "m", "contract_version": 2}, "contract version 2; this image speaks 1"),
        ({"seed": 1}, "request has no 'model'"),
        ({"model": "m", "device": "tpu"}, "device must be 'cpu' or 'cuda', got 'tpu'"),
        ({"model": "m", "batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"model": "m", "batch_size": -4}, "batch_size must be a positive integer"),
        ({"model": "m", "batch_size": "32"}, "batch_size must be a positive integer, got '32'"),
        ({"model": "m", "batch_size": 2.5}, "batch_size must be a positive integer"),
    ],
)
def test_request_errors(tmp_path, content, message):
    path = tmp_path / "request.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ContractError) as excinfo:
        Request.from_file(path)
    assert message in str(excinfo.value)
    assert str(path) in str(excinfo.value)


# --------------------------------------------------------------------------- strict loading


class FakeModule:
    """Just enough of torch.nn.Module: state_dict() and load_state_dict() over numpy arrays."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.tensors = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
        self.loaded: dict | None = None

    def state_dict(self):
        return dict(self.tensors)

    def load_state_dict(self, state_dict, strict=True):
        assert strict is False
        self.loaded = dict(state_dict)
        self.tensors.update(state_dict)


SHAPES = {"encoder.weight": (4, 3), "encoder.bias": (4,), "norm.running_mean": (4,)}


def checkpoint(shapes=SHAPES, value=1.0):
    return {k: np.full(s, value, dtype=np.float32) for k, s in shapes.items()}


def test_strict_load_fills_every_tensor():
    module = FakeModule(SHAPES)
    assert cc.load_state_dict_strictly(module, checkpoint()) == 3
    assert all((t == 1).all() for t in module.tensors.values())
    assert "torch" not in sys.modules  # no torch needed for any of this


def test_strict_load_missing_tensor():
    module = FakeModule(SHAPES)
    ckpt = checkpoint()
    del ckpt["encoder.bias"]
    with pytest.raises(PartialLoadError, match=r"scgpt.pt: partial load of 3 model tensors: 1 missing \(encoder.bias\)"):
        cc.load_state_dict_strictly(module, ckpt, name="scgpt.pt")
    assert module.loaded is None  # nothing half-loaded


def test_strict_load_unexpected_tensor():
    module = FakeModule(SHAPES)
    ckpt = {**checkpoint(), "decoder.weight": np.ones((2, 2))}
    with pytest.raises(PartialLoadError, match=r"1 unexpected \(decoder.weight\)"):
        cc.load_state_dict_strictly(module, ckpt)
    assert module.loaded is None


def test_strict_load_wrong_shape():
    module = FakeModule(SHAPES)
    ckpt = {**checkpoint(), "encoder.weight": np.ones((3, 4))}
    with pytest.raises(PartialLoadError, match=r"1 wrong shape \(encoder.weight \(3, 4\) vs \(4, 3\)\)"):
        cc.load_state_dict_strictly(module, ckpt)


def test_strict_load_reports_all_problems_and_shortens_long_lists():
    shapes = {f"layer{i}.w": (2,) for i in range(7)}
    ckpt = {"extra": np.ones(1), "layer0.w": np.ones(3)}
    with pytest.raises(PartialLoadError) as excinfo:
        cc.load_state_dict_strictly(FakeModule(shapes), ckpt)
    message = str(excinfo.value)
    assert "6 missing (layer1.w, layer2.w, layer3.w, layer4.w, layer5.w, ...)" in message
    assert "1 unexpected (extra)" in message and "1 wrong shape (layer0.w (3,) vs (2,))" in message


def test_strict_load_ignore_prefixes():
    module = FakeModule(SHAPES)
    ckpt = checkpoint()
    del ckpt["norm.running_mean"]
    ckpt["head.cls.weight"] = np.ones((5, 4))
    n = cc.load_state_dict_strictly(module, ckpt, ignore_unexpected=["head."], ignore_missing=("norm.",))
    assert n == 2
    assert set(module.loaded) == {"encoder.weight", "encoder.bias"}  # the head is not passed on
    # Prefixes match the start of a name only.
    ckpt["xhead.weight"] = np.ones(1)
    with pytest.raises(PartialLoadError, match=r"1 unexpected \(xhead.weight\)"):
        cc.load_state_dict_strictly(FakeModule(SHAPES), ckpt, ignore_unexpected=["head."],
                                    ignore_missing=["norm."])


# --------------------------------------------------------------------------- run()


@pytest.fixture
def folders(tmp_path):
    """A request, a small dataset and a weights folder, as the host would mount them."""
    input_dir, weights_dir, output_dir = tmp_path / "input", tmp_path / "weights", tmp_path / "output"
    for folder in (weights_dir, output_dir):
        folder.mkdir()
    write_request(input_dir, seed=5, organism="human", variant="v1", batch_keys=["batch"])
    rng = np.random.default_rng(0)
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2, size=(6, 5)).astype(np.float32)),
        obs=pd.DataFrame({"batch": ["a", "b"] * 3}, index=[f"c{i}" for i in range(6)]),
        var=pd.DataFrame(index=[f"ENSG{i:011d}" for i in range(5)]),
    )
    adata.write_h5ad(input_dir / "dataset.h5ad")
    (weights_dir / "model.npy").write_bytes(b"weights")
    return input_dir, weights_dir, output_dir


def run(embed, folders, *, output_dir=None):
    input_dir, weights_dir, default_output = folders
    return cc.run(embed, model="m", package="numpy", input_dir=input_dir, weights_dir=weights_dir,
                  output_dir=output_dir or default_output)


def random_embed(job):
    adata = job.read_dataset()
    values = np.random.rand(adata.n_obs, 3)  # seeded by run() from the request
    return cc.ModelOutput(values, adata.obs_names, n_weight_tensors=4, info={"genes_matched": adata.n_vars})


def test_run_success_writes_three_files_and_meta(folders):
    input_dir, weights_dir, output_dir = folders
    assert run(random_embed, folders) == cc.EXIT_OK
    assert sorted(p.name for p in output_dir.iterdir()) == ["cell_ids.json", "embeddings.npy", "meta.json"]
    values = np.load(output_dir / "embeddings.npy")
    assert values.shape == (6, 3) and values.dtype == np.float32
    assert json.loads((output_dir / "cell_ids.json").read_text()) == [f"c{i}" for i in range(6)]
    meta = json.loads((output_dir / "meta.json").read_text())
    assert meta["n_weight_tensors_loaded"] == 4
    assert meta["weights_checksum"] == cc.weights_checksum(weights_dir) is not None
    assert set(meta["timings"]) == {"checksum_s", "embed_s", "total_s"}
    assert all(isinstance(v, float) and v >= 0 for v in meta["timings"].values())
    assert meta["model"] == "m" and meta["variant"] == "v1" and meta["seed"] == 5
    assert meta["n_cells_out"] == 6 and meta["dim"] == 3 and meta["contract_version"] == 1
    assert meta["package"] == "numpy" and np.__version__ in meta.values()
    assert meta["genes_matched"] == 5 and meta["torch_version"] is None


def test_run_is_seeded_from_the_request(folders, tmp_path):
    input_dir, _, _ = folders
    outputs = []
    for i, seed in enumerate([5, 5, 6]):
        write_request(input_dir, seed=seed)
        out = tmp_path / f"out{i}"
        out.mkdir()
        assert run(random_embed, folders, output_dir=out) == 0
        outputs.append(np.load(out / "embeddings.npy"))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.allclose(outputs[0], outputs[2])


def test_run_not_applicable_exits_99_with_a_reason(folders):
    _, _, output_dir = folders

    def embed(job):
        job.require_organism(["mouse", "rat"])

    assert run(embed, folders) == cc.EXIT_NOT_APPLICABLE == 99
    reason = json.loads((output_dir / "reason.json").read_text())
    assert reason == {"status": "not_applicable", "reason": "m supports mouse, rat; dataset organism is human"}
    assert not (output_dir / "meta.json").exists()


def test_run_failure_exits_1_without_meta(folders):
    _, _, output_dir = folders

    def embed(job):
        raise RuntimeError("out of cheese")

    assert run(embed, folders) == cc.EXIT_FAILED == 1
    assert json.loads((output_dir / "reason.json").read_text()) == {
        "status": "failed", "reason": "RuntimeError: out of cheese"}
    assert not (output_dir / "meta.json").exists()
    assert not (output_dir / "embeddings.npy").exists()


def test_run_with_a_bad_request_fails_before_embedding(folders):
    input_dir, _, output_dir = folders
    (input_dir / "request.json").write_text(json.dumps({"model": "m", "device": "tpu"}))
    called = []
    assert run(lambda job: called.append(job), folders) == 1
    assert called == []
    assert "device must be 'cpu' or 'cuda'" in json.loads((output_dir / "reason.json").read_text())["reason"]


def test_run_with_nan_output_leaves_no_meta(folders):
    _, _, output_dir = folders

    def embed(job):
        return cc.ModelOutput(np.full((6, 2), np.nan), [f"c{i}" for i in range(6)], n_weight_tensors=0)

    assert run(embed, folders) == 1
    assert not (output_dir / "meta.json").exists()
    assert "6 of 6 embedding rows hold NaN" in (output_dir / "reason.json").read_text()


def test_missing_weights_file_names_the_fetch_command(folders):
    input_dir, weights_dir, output_dir = folders
    job = cc.Job(Request.from_file(input_dir / "request.json"), input_dir, weights_dir, output_dir)
    assert job.weights_path("model.npy") == weights_dir / "model.npy"
    with pytest.raises(ContractError, match=r"weights file .*best_model.pt missing \(weights folder holds: model.npy\)"
                       r".*`czb models fetch-weights m`"):
        job.weights_path("ckpt", "best_model.pt")
    assert cc.resolve_device(job.request) == "cpu"
    assert cc.weights_checksum(input_dir / "absent") is None


# --------------------------------------------------------------------------- write_outputs


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_write_outputs_refuses_non_finite_values_and_writes_nothing(tmp_path, bad):
    values = np.ones((3, 2))
    values[2, 1] = bad
    with pytest.raises(ContractError, match="1 of 3 embedding rows hold NaN or infinite values"):
        cc.write_outputs(tmp_path, cc.ModelOutput(values, ["a", "b", "c"], n_weight_tensors=0), {})
    assert list(tmp_path.iterdir()) == []


def test_write_outputs_refuses_mismatched_lengths_and_shapes(tmp_path):
    with pytest.raises(ContractError, match="2 cell IDs for 3 embedding rows"):
        cc.write_outputs(tmp_path, cc.ModelOutput(np.ones((3, 2)), ["a", "b"], n_weight_tensors=0), {})
    with pytest.raises(ContractError, match=r"embeddings must be 2-D \(cells × dims\), got shape \(3,\)"):
        cc.write_outputs(tmp_path, cc.ModelOutput(np.ones(3), ["a", "b", "c"], n_weight_tensors=0), {})
    assert not (tmp_path / "meta.json").exists()


def test_write_outputs_writes_float32_and_no_partial_files(tmp_path):
    cc.write_outputs(tmp_path, cc.ModelOutput(np.eye(2), np.array(["x", "y"]), n_weight_tensors=0),
                     {"note": Path("/weights")})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell_ids.json", "embeddings.npy", "meta.json"]
    assert np.load(tmp_path / "embeddings.npy").dtype == np.float32
    assert json.loads((tmp_path / "meta.json").read_text()) == {"note": "/weights"}


# ----------------------------------------------------------------------------- perturbation predictions


def test_prediction_output_round_trips_through_the_host_reader(folders):
    from czb.models.docker.contract import read_predictions

    def predict(job):
        adata = job.read_dataset()
        rows = ["B+ctrl", "A+B"]
        return cc.PredictionOutput(np.arange(2 * adata.n_vars, dtype=float).reshape(2, -1), rows,
                                   list(adata.var_names), n_weight_tensors=0)

    assert run(predict, folders) == cc.EXIT_OK
    output = folders[2]
    meta = json.loads((output / cc.META_FILE).read_text())
    assert meta["n_rows_out"] == 2 and meta["task"] == "embedding"
    genes = list(ad.read_h5ad(output / cc.PREDICTIONS_FILE).var_names)
    # The host asks for its own row and gene order.
    values = read_predictions(output, name="m", rows=["A+B", "B+ctrl"], genes=genes[::-1])
    np.testing.assert_array_equal(values[0], np.arange(5, 10)[::-1])
    with pytest.raises(Exception, match="has 2 rows where 3 were asked"):
        read_predictions(output, name="m", rows=["A+B", "B+ctrl", "C"], genes=genes)


def test_prediction_output_of_the_wrong_shape_leaves_no_meta(folders):
    def predict(job):
        return cc.PredictionOutput(np.zeros((2, 3)), ["a", "b"], ["g1", "g2"], n_weight_tensors=0)

    assert run(predict, folders) == cc.EXIT_FAILED
    assert not (folders[2] / cc.META_FILE).exists()


def test_perturbation_request_fields(tmp_path):
    path = write_request(tmp_path, task="perturbation_expression_shift", control_label="ctrl",
                         test_conditions=["A+B"])
    request = Request.from_file(path)
    assert request.test_conditions == ("A+B",) and request.condition_key == "condition"
    with pytest.raises(ContractError, match="unknown task 'cluster'"):
        Request.from_file(write_request(tmp_path / "b", task="cluster"))
