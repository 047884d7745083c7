"""A real two-node Ray cluster on loopback: actors on both nodes, results identical to a local run, files where
the driver runs, and a parallel study with a relative output_dir.

The cluster (``ray.cluster_utils.Cluster``: two raylets of 1 CPU each, no dashboard) runs in a fresh interpreter,
started from another working directory than the drivers, so that anything resolved against a raylet's working
directory instead of the driver's lands somewhere else and fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import TINY, assert_same_results

ROOT = Path(__file__).resolve().parents[1]
# Two devices per pass, mixed configs and several eval batches: units and shards to spread over the nodes.
SPREAD = [*TINY, "policy=random", "methods.lora_rank=[4,2]", "ray.tokens_per_pass=128", "eval.batch_size=8"]

CLUSTER_SCRIPT = """
import json, os, subprocess, sys
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
env = {**os.environ, "RAY_ADDRESS": cluster.address}
out = {"address": cluster.address}
for name, argv, cwd in json.loads(sys.argv[1]):
    done = subprocess.run([sys.executable, "-m", "raysim.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    out[name] = {"rc": done.returncode, "stdout": done.stdout[-2000:], "stderr": done.stderr[-4000:]}
cluster.shutdown()
print(json.dumps(out))
"""


def cluster_env(ray_tmp: str) -> dict[str, str]:
    """A fresh environment for the cluster and its drivers: loopback only, authentication set explicitly."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every daemon binds to 127.0.0.1
        RAY_AUTH_MODE="disabled",  # explicit: a ~/.ray/auth_token left by a local Ray must not turn tokens on
        RAY_TMPDIR=ray_tmp,  # socket paths must fit in 107 bytes
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture(scope="module")
def on_two_nodes(tmp_path_factory):
    """Run a tiny experiment and a parallel study as drivers on a two-node cluster; return their folders."""
    work = tmp_path_factory.mktemp("multinode")
    (work / "raylets").mkdir()  # the cluster's working directory, not the drivers'
    (work / "study").mkdir()
    (work / "tiny.yaml").write_text(_as_yaml(SPREAD))
    study = {"name": "two-nodes", "output_dir": "out/two-nodes", "parallel": 2, "experiment": "../tiny.yaml",
             "axes": {"seed": [0, 1]}}
    (work / "study" / "study.yaml").write_text(yaml.safe_dump(study))
    drivers = [
        ("run", ["run", "tiny.yaml", "output_dir=out/run", "ray.num_actors=2"], str(work)),
        ("compare", ["compare", "study.yaml"], str(work / "study")),
    ]
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as ray_tmp:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(CLUSTER_SCRIPT), json.dumps(drivers)],
                              cwd=work / "raylets", env=cluster_env(ray_tmp), capture_output=True, text=True,
                              timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, _, _ in drivers:
        assert result[name]["rc"] == 0, f"{name}: {result[name]['stderr']}"
    return work, result


def _as_yaml(overrides: list[str]) -> str:
    """``key=value`` overrides as one nested YAML mapping."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.from_dotlist(overrides))


def test_a_run_on_two_nodes_places_actors_on_both(on_two_nodes):
    work, result = on_two_nodes
    summary = json.loads((work / "out" / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["num_actors"] == 2 and summary["actor_nodes"] == 2
    assert "2 device actors on 2 nodes" in result["run"]["stderr"]


def test_a_run_on_two_nodes_writes_every_file_where_its_driver_runs(on_two_nodes):
    work, _ = on_two_nodes
    run_dir = work / "out" / "run"
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "rounds.parquet", "devices.parquet",
                                                   "summary.json", "final_state.pt"}
    assert not any((work / "raylets").rglob("*.parquet"))  # nothing landed in the raylets' directory


def test_a_run_on_two_nodes_gives_the_results_of_a_local_run(on_two_nodes, ray_session, tmp_path):
    from raysim.config import load_experiment
    from raysim.engine.run import run_experiment

    work, _ = on_two_nodes
    cfg = load_experiment(work / "tiny.yaml", [f"output_dir={tmp_path / 'local'}", "ray.num_actors=1"])
    local = run_experiment(cfg)
    assert_same_results(work / "out" / "run", local)


def test_a_parallel_study_with_a_relative_output_dir_runs_on_two_nodes(on_two_nodes):
    work, result = on_two_nodes
    study_dir = work / "study" / "out" / "two-nodes"
    assert (study_dir / "comparison.parquet").is_file() and (study_dir / "report.md").is_file()
    for seed in (0, 1):
        summary = json.loads((study_dir / "runs" / f"seed-{seed}" / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["num_actors"] == 1  # its share: half the cluster
    assert not any((work / "raylets").rglob("summary.json"))


NODE_LOSS_SCRIPT = """
import json, os, subprocess, sys, time
from pathlib import Path
from ray.cluster_utils import Cluster

run_dir = Path(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
driver = subprocess.Popen([sys.executable, "-m", "raysim.cli", "run", sys.argv[1], f"output_dir={run_dir}",
                           "ray.num_actors=2"], env={**os.environ, "RAY_ADDRESS": cluster.address},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
while len(list((run_dir / "rounds.parquet").glob("round-*.parquet"))) < 2 and driver.poll() is None:
    time.sleep(0.05)
cluster.remove_node(worker, allow_graceful=False)  # the worker node dies mid-run: its actor and its work with it
at_removal = len(list((run_dir / "rounds.parquet").glob("round-*.parquet")))
_, err = driver.communicate(timeout=400)
cluster.shutdown()
print(json.dumps({"rc": driver.returncode, "stderr": err[-4000:], "at_removal": at_removal}))
"""


@pytest.mark.slow
def test_a_run_that_loses_a_node_mid_run_finishes_with_the_results_of_a_local_run(tmp_path, ray_session):
    from raysim.config import load_experiment
    from raysim.engine.run import run_experiment

    (tmp_path / "raylets").mkdir()
    (tmp_path / "tiny.yaml").write_text(_as_yaml([*SPREAD, "rounds=30"]))
    env = cluster_env("")
    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        env["RAY_health_check_period_ms"] = "500"  # notice the dead node within seconds
        env["RAY_health_check_failure_threshold"] = "4"
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(NODE_LOSS_SCRIPT), str(tmp_path / "tiny.yaml"),
                               str(tmp_path / "run")], cwd=tmp_path / "raylets", env=env, capture_output=True,
                              text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["stderr"]
    assert result["at_removal"] < 20  # the node died with most rounds still to run
    assert "a device actor was lost" in result["stderr"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"
    cfg = load_experiment(tmp_path / "tiny.yaml", [f"output_dir={tmp_path / 'local'}", "ray.num_actors=1"])
    assert_same_results(tmp_path / "run", run_experiment(cfg))
