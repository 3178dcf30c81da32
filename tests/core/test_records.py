"""Tests of czb.core.records (result files) and czb.pipeline.baselines.baseline_differences."""

from __future__ import annotations

import json
import math

import pytest

from czb.core import records as R
from czb.core.errors import ResultsError
from czb.pipeline.baselines import BASELINE_MODEL, baseline_differences

# ----------------------------------------------------------------------------- helpers


def _strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as strict JSON parsers (jq, JS) do."""

    def refuse(constant: str):
        msg = f"non-standard JSON constant {constant}"
        raise ValueError(msg)

    return json.loads(text, parse_constant=refuse)


def make_record(
    *,
    model: str = "random",
    dataset: str = "synthetic_cells_tiny",
    task: str = "clustering",
    status: str = "ok",
    metrics: list[tuple] | None = None,
    created_at: str = "2025-01-02T03:04:05+00:00",
) -> R.ResultRecord:
    """A result record; ``metrics`` are ``(name, value)`` or ``(name, value, params)``."""
    if metrics is None:
        metrics = [("adjusted_rand_index", 0.5), ("normalized_mutual_info", 0.6)]
    return R.ResultRecord(
        czb_version="0.1.0",
        created_at=created_at,
        command="czb run --model random",
        host=R.host_record(),
        dataset=R.DatasetRecord(name=dataset, uri="synthetic:planted_cells", sha256="ab" * 32,
                                n_cells=300, n_genes=500),
        model=R.ModelRecord(name=model, kind="in-process", image_digest="in-process",
                            parameters={"dim": 50}),
        task=R.TaskRecord(name=task, implementation=task, parameters={"n_neighbors": 15}),
        seeds=[0, 1],
        status=status,
        error=None if status == "ok" else "boom",
        metrics=[
            R.MetricRecord(name=m[0], value=m[1], value_std_dev=None if m[1] is None else 0.01,
                           values_raw=[m[1], m[1]], params=m[2] if len(m) > 2 else {})
            for m in (metrics if status == "ok" else [])
        ],
        runtime_s=1.5,
        embedding_runtime_s=0.5,
        peak_memory_mb=12.0,
    )


# ----------------------------------------------------------------------------- write / read


def test_write_result_writes_strict_json_and_read_round_trips(tmp_path):
    record = make_record()
    path = R.write_result(record, tmp_path / "out")  # the folder is created

    assert path.parent == tmp_path / "out"
    assert path.name == "synthetic_cells_tiny__random__clustering__2025-01-02T030405Z.json"
    data = _strict_loads(path.read_text())
    assert data["schema_version"] == R.SCHEMA_VERSION
    assert data["model"]["name"] == "random"
    assert data["metrics"][0] == {
        "name": "adjusted_rand_index", "value": 0.5, "value_std_dev": 0.01,
        "values_raw": [0.5, 0.5], "params": {}, "ci95": None,
    }
    assert R.read_result(path) == record


def _nested(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def test_what_write_result_writes_read_result_reads(tmp_path):
    """A spec's deepest parameters (YAML is capped at 32 levels) still give a readable
    record; anything that would nest past the reader's limit is refused when writing."""
    from czb.specs.loading import MAX_YAML_DEPTH

    record = make_record()
    record.model.parameters = {"p": _nested(MAX_YAML_DEPTH)}
    assert R.read_result(R.write_result(record, tmp_path)).model.parameters == record.model.parameters
    record.model.parameters = {"p": _nested(R.MAX_RESULT_DEPTH)}
    with pytest.raises(ResultsError, match="nests more than 64 levels"):
        R.write_result(record, tmp_path / "deep")


def test_write_result_never_overwrites_and_leaves_no_temp_files(tmp_path):
    record = make_record()
    first = R.write_result(record, tmp_path)
    first_text = first.read_text()
    second = R.write_result(record, tmp_path)
    third = R.write_result(make_record(metrics=[("adjusted_rand_index", 0.9)]), tmp_path)

    assert len({first, second, third}) == 3
    assert second.name.endswith("-1.json") and third.name.endswith("-2.json")
    assert first.read_text() == first_text  # untouched by the later writes
    assert R.read_result(third).metrics[0].value == 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (first, second, third))
    assert not list(tmp_path.glob(".tmp-*"))


def test_write_result_slugs_unsafe_names(tmp_path):
    path = R.write_result(make_record(model="file:my emb/../x.npy"), tmp_path)
    assert path.parent == tmp_path
    assert "/" not in path.name and " " not in path.name
    assert R.read_result(path).model.name == "file:my emb/../x.npy"


def test_write_result_parent_is_a_regular_file(tmp_path):
    # We run as root, where chmod-based read-only folders do not stop writes; a path
    # below a regular file cannot be created by anyone.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(ResultsError, match="cannot create output folder"):
        R.write_result(make_record(), blocker / "results")
    with pytest.raises(ResultsError):
        R.write_result(make_record(), blocker)  # the output "folder" itself is a file
    assert blocker.read_text() == "x"


def test_write_result_unwritable_folder_raises_results_error(tmp_path, monkeypatch):
    # Simulates a read-only folder (chmod has no effect for root): creating the temp file fails.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(R.tempfile, "mkstemp", refuse)
    with pytest.raises(ResultsError, match="Permission denied"):
        R.write_result(make_record(), tmp_path)


def test_write_result_link_failure_raises_results_error_and_cleans_up(tmp_path, monkeypatch):
    # e.g. a file system without hard links, or a disk that filled up.
    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R.os, "link", refuse)
    with pytest.raises(ResultsError, match="No space left on device"):
        R.write_result(make_record(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_result_non_finite_value_is_null_or_results_error(tmp_path):
    record = make_record(metrics=[("adjusted_rand_index", float("nan"))])
    path = R.write_result(record, tmp_path)
    assert _strict_loads(path.read_text())["metrics"][0]["value"] is None


def test_read_result_rejects_non_json(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_text("this is { not json")
    with pytest.raises(ResultsError, match="not a readable result JSON"):
        R.read_result(path)
    with pytest.raises(ResultsError, match="not a readable result JSON"):
        R.read_result(tmp_path / "missing.json")


def test_read_result_rejects_binary_garbage(tmp_path):
    path = tmp_path / "garbage.json"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe garbage")
    with pytest.raises(ResultsError):
        R.read_result(path)


@pytest.mark.parametrize(
    "payload",
    [
        [1, 2, 3],
        "a string",
        {"name": "something else entirely"},
        {"results": [{"metric": "ari", "value": 0.5}]},  # e.g. a cz-benchmarks file
    ],
    ids=["list", "string", "other-dict", "foreign-results"],
)
def test_read_result_rejects_json_of_another_shape(tmp_path, payload):
    path = tmp_path / "other.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ResultsError, match="not a czb result"):
        R.read_result(path)


def test_read_result_rejects_unknown_and_mistyped_fields(tmp_path):
    data = make_record().model_dump(mode="json")
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(ResultsError, match="not a czb result"):
        R.read_result(path)
    path.write_text(json.dumps({**data, "status": "great"}))
    with pytest.raises(ResultsError, match="not a czb result"):
        R.read_result(path)


# ----------------------------------------------------------------------------- NaN through run_benchmark


def test_nan_metric_values_are_written_as_null(tmp_path, monkeypatch):
    """A task whose metric is NaN for some/all seeds: the written JSON is strict, NaN → null."""
    from czb.evaluation import registry
    from czb.evaluation.task import MetricValue, Task
    from czb.pipeline.run import run_benchmark
    from czb.specs.catalog import Catalog
    from czb.specs.schema import TaskSpec

    class NanTask(Task):
        info = registry.TaskInfo(
            name="nan_task", description="NaN on seed 0", metrics=("always_nan", "sometimes_nan"),
            requires=("labels",), stochastic=True,
        )

        def run(self, context, *, seed):
            return [MetricValue("always_nan", float("nan")),
                    MetricValue("sometimes_nan", float("nan") if seed == 0 else 0.25 * seed)]

    registry.load_all()
    monkeypatch.setitem(registry.TASKS, "nan_task", NanTask)
    catalog = Catalog.load()
    catalog.tasks["nan_task"] = TaskSpec(name="nan_task", implementation="nan_task")

    out = tmp_path / "out"
    records = run_benchmark(
        catalog, datasets=["synthetic_cells_tiny"], tasks=["nan_task"], models=["random"],
        baseline=False, seeds=[0, 1, 2], output_dir=out, n_jobs=1,
    )
    assert [r.status for r in records] == ["ok"]
    (path,) = (out / "results").glob("*.json")
    data = _strict_loads(path.read_text())  # would raise on NaN
    metrics = {m["name"]: m for m in data["metrics"]}
    assert metrics["always_nan"]["value"] is None
    assert metrics["always_nan"]["value_std_dev"] is None
    assert metrics["always_nan"]["values_raw"] == [None, None, None]
    assert metrics["sometimes_nan"]["values_raw"] == [None, 0.25, 0.5]
    assert metrics["sometimes_nan"]["value"] == pytest.approx(0.375)  # mean of the finite values
    assert metrics["sometimes_nan"]["value_std_dev"] == pytest.approx(math.sqrt(0.03125))
    assert R.read_result(path).metric("always_nan").value is None


# ----------------------------------------------------------------------------- baseline_differences


def test_baseline_differences_is_model_minus_pca_per_metric():
    model = make_record(model="random", metrics=[
        ("adjusted_rand_index", 0.25), ("normalized_mutual_info", 0.5),
        ("accuracy", 0.4, {"classifier": "lr"}), ("accuracy", 0.9, {"classifier": "knn"}),
        ("only_in_model", 0.1),
    ])
    pca = make_record(model=BASELINE_MODEL, metrics=[
        ("adjusted_rand_index", 0.75), ("normalized_mutual_info", 0.375),
        ("accuracy", 0.5, {"classifier": "lr"}), ("accuracy", 0.8, {"classifier": "knn"}),
    ])
    diffs = baseline_differences([model, pca])

    def key(metric, model_name="random", **params):
        return ("synthetic_cells_tiny", "clustering", metric,
                tuple(sorted((k, str(v)) for k, v in params.items())), model_name)

    assert diffs == {
        key("adjusted_rand_index"): pytest.approx(0.25 - 0.75),
        key("normalized_mutual_info"): pytest.approx(0.5 - 0.375),
        key("accuracy", classifier="lr"): pytest.approx(0.4 - 0.5),
        key("accuracy", classifier="knn"): pytest.approx(0.9 - 0.8),
    }
    # Order of the records does not matter; the baseline never gets a difference to itself.
    assert baseline_differences([pca, model]) == diffs


def test_baseline_differences_skips_what_cannot_be_compared():
    pca = make_record(model=BASELINE_MODEL, metrics=[("adjusted_rand_index", 0.5), ("normalized_mutual_info", None)])
    ok = make_record(model="random", metrics=[("adjusted_rand_index", None), ("normalized_mutual_info", 0.2)])
    failed = make_record(model="broken", status="failed")
    other_dataset = make_record(model="random", dataset="pbmc68k_reduced", metrics=[("adjusted_rand_index", 0.1)])
    other_task = make_record(model="random", task="embedding", metrics=[("adjusted_rand_index", 0.1)])
    assert baseline_differences([pca, ok, failed, other_dataset, other_task]) == {}
    assert baseline_differences([ok]) == {}  # no baseline at all
    failed_pca = make_record(model=BASELINE_MODEL, status="failed")
    assert baseline_differences([failed_pca, make_record(model="random")]) == {}
