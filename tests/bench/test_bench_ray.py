"""czb bench on a real local Ray cluster: a head and two worker nodes on loopback.

One worker node is killed while it runs a job; the suite still completes with every
result, none twice; the same suite run again does no work.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from pathlib import Path

import pytest

if os.environ.get("CZB_REQUIRE_RAY"):  # CI installs Ray: there this test must not skip
    import ray
else:
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'czb[cluster]')")

import czb.pipeline.execute as bench_run  # noqa: E402
from czb.bench.executors.ray import RayExecutor  # noqa: E402
from czb.core.records import read_result  # noqa: E402
from czb.pipeline.execute import run_suite  # noqa: E402
from czb.pipeline.plan import plan_suite  # noqa: E402
from czb.pipeline.store import open_store  # noqa: E402
from czb.specs.catalog import Catalog  # noqa: E402

pytestmark = pytest.mark.ray

SUITES = Path(__file__).resolve().parents[1] / "fixtures" / "bench" / "suite.yaml"


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    # The head schedules nothing, so every job runs on one of the two worker nodes.
    small = {"object_store_memory": 100 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, **small})
    workers = [cluster.add_node(num_cpus=1, **small) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def score_slowly(node_dir, units, store_url, **kwargs):
    """A score job that first says which node runs it, then gives the test time to kill it."""
    from czb.pipeline.work import run_score_units

    (Path(node_dir) / ray.get_runtime_context().get_node_id()).touch()
    time.sleep(2)
    return run_score_units(units, store_url, **kwargs)


def test_suite_survives_a_killed_worker_and_reruns_for_free(cluster, tmp_path, monkeypatch):
    cluster, workers = cluster
    catalog = Catalog.load(extra_files=[SUITES])
    plan = plan_suite(catalog, "smoke_more_tasks", resolve_images=False)
    store = open_store(tmp_path / "store")
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this file
    monkeypatch.setattr(bench_run, "run_score_units", functools.partial(score_slowly, str(node_dir)))
    killed: list[str] = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            busy = {p.name for p in node_dir.iterdir()}
            victim = next((w for w in workers if w.node_id in busy), None)
            if victim is not None:
                cluster.remove_node(victim, allow_graceful=False)
                killed.append(victim.node_id)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    outcome = run_suite(plan, store, RayExecutor(address=cluster.address), retries=2, poll_s=0.2)
    killer.join(timeout=5)
    assert killed, "no worker was killed while running a job"
    assert outcome.complete, (outcome.failed, outcome.blocked)
    assert outcome.ran == plan.n_units and outcome.retried >= 1  # the killed job ran again elsewhere
    assert all(r.status == "ok" for r in outcome.records), [r.error for r in outcome.records]
    # nothing lost, nothing twice: one output per unit, one result file per record
    assert {p.stem for p in (tmp_path / "store" / "scores").glob("*.json")} == set(plan.scores)
    results = list((tmp_path / "store" / "results").glob("*.json"))
    assert len(results) == len(plan.records)
    assert len({(r.dataset.name, r.model.name, r.task.name) for r in map(read_result, results)}) == len(results)

    again = run_suite(plan, store, RayExecutor(address=cluster.address), poll_s=0.2)
    assert again.ran == 0 and again.cached == plan.n_units
