"""raysim.cluster: address resolution, failing fast, a loopback-only local Ray, cluster.yaml."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from raysim import cluster

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, *, timeout_s: float) -> dict:
    """Run ``code`` in a fresh interpreter (its own Ray, none of ours) and parse its last line as JSON."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}  # the session Ray's private token
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- address resolution (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "environ", "expected"),
    [
        (None, {}, None),
        ("local", {"RAY_ADDRESS": "10.0.0.5:6379"}, None),
        (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379"),
        (None, {"RAY_ADDRESS": ""}, None),
        (None, {"RAY_ADDRESS": "local"}, None),
        ("auto", {"RAY_ADDRESS": "10.0.0.5:6379"}, "auto"),
        ("10.0.0.7:6379", {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.7:6379"),
        ("ray://head:10001", {}, "ray://head:10001"),
    ],
)
def test_resolve_address_explicit_wins_then_env(address, environ, expected):
    assert cluster.resolve_address(address=address, environ=environ) == expected


# --- joining a cluster that is not there ---------------------------------------------------


def test_dead_or_malformed_address_fails_fast_with_config_error():
    result = run_python(
        """
        import json, time
        from raysim import cluster
        from raysim.errors import ConfigError
        out = {}
        for address in ["127.0.0.1:1", "ray://127.0.0.1:1", "no-port", "http://127.0.0.1:1"]:
            start = time.monotonic()
            try:
                cluster.connect(address=address)
                out[address] = None
            except ConfigError as err:
                out[address] = [str(err), err.field, time.monotonic() - start]
        print(json.dumps(out))
        """,
        timeout_s=60,
    )
    for address, outcome in result.items():
        assert outcome is not None, f"{address} connected"
        message, field, seconds = outcome
        assert field == "ray.address"
        assert address in message
        assert seconds < 30
    assert "no Ray cluster answers at 127.0.0.1:1" in result["127.0.0.1:1"][0]


# --- a private local Ray -------------------------------------------------------------------


def test_local_ray_listens_on_loopback_only():
    start = time.monotonic()
    result = run_python(
        """
        import ipaddress, json, time
        import psutil, ray
        from raysim import cluster

        start = time.monotonic()
        connection = cluster.connect(address=None, num_cpus=1)
        init_s = time.monotonic() - start
        ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
        me = psutil.Process()
        listening = set()
        for proc in [me, *me.children(recursive=True)]:
            try:
                sockets = proc.net_connections(kind="inet")
            except psutil.NoSuchProcess:
                continue
            listening |= {(s.laddr.ip, s.laddr.port) for s in sockets if s.status == psutil.CONN_LISTEN}

        def loopback(ip):
            ip = ipaddress.ip_address(ip.split("%")[0])
            return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)

        exposed = sorted(f"{ip}:{port}" for ip, port in listening if not loopback(ip))
        connection.shutdown()
        print(json.dumps({"description": connection.description, "n": len(listening), "exposed": exposed,
                          "init_s": init_s, "after_shutdown": ray.is_initialized()}))
        """,
        timeout_s=90,
    )
    assert result["n"] >= 5  # GCS, raylet, agents, workers: there was something to check
    assert result["exposed"] == []
    assert result["description"] == "local Ray (1 CPU, loopback only)"  # no dashboard URL
    assert result["after_shutdown"] is False
    print(f"local Ray up in {result['init_s']:.1f} s, whole check {time.monotonic() - start:.1f} s")


def test_initialised_ray_is_reused(ray_session):
    assert cluster.connect(address="127.0.0.1:1").description.startswith("Ray already running in this process")


def test_every_process_on_a_private_local_ray_knows_it_without_state_of_its_own(ray_session):
    """A private local Ray carries its mark (a resource of its node), so a reused connection, and a task in
    another process, see that nothing can join it: its placement timeout is the local one."""
    import ray

    reused = cluster.connect(address=None)
    assert not reused.started and cluster.private_local()
    assert cluster.placement_timeout_s(None) == cluster.LOCAL_PLACEMENT_TIMEOUT_S
    in_task = ray.get(ray.remote(num_cpus=0)(lambda: (cluster.private_local(), cluster.placement_timeout_s(None)))
                      .remote())
    assert in_task == (True, cluster.LOCAL_PLACEMENT_TIMEOUT_S)
    assert cluster.placement_timeout_s(7.0) == 7.0
    reused.shutdown()  # a reused Ray is left running
    assert ray.is_initialized()


def test_local_ray_authenticates_without_leaving_a_token_file(tmp_path):
    """A token file in ~/.ray would turn token authentication on for the next `ray start --head` here."""
    result = run_python(
        f"""
        import json, os
        os.environ["HOME"] = {str(tmp_path)!r}
        import ray
        from raysim import cluster

        connection = cluster.connect(address=None, num_cpus=1)
        mode = ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote())
        connection.shutdown()
        print(json.dumps({{"worker_mode": mode, "files": sorted(os.listdir({str(tmp_path)!r})),
                          "after": os.environ.get("RAY_AUTH_MODE")}}))
        """,
        timeout_s=90,
    )
    assert result == {"worker_mode": "token", "files": [], "after": None}


# --- placing device actors ------------------------------------------------------------------


def test_more_actors_than_a_local_ray_holds_fail_at_once_naming_the_keys(ray_session):
    from raysim.errors import ConfigError

    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        cluster.reserve(num_actors=5, cpus_per_actor=1.0, gpus_per_actor=0.0, timeout_s=None)
    assert time.monotonic() - start < 5
    assert err.value.field == "ray.num_actors"
    assert "ray.num_actors=5 x ray.cpus_per_actor=1 need 5 CPUs; this local Ray has 2 CPUs" in str(err.value)


def test_actors_that_cannot_be_placed_in_time_fail_in_bounded_time(ray_session):
    """Two CPUs, both held: a request that would fit an idle Ray waits out the timeout, then one line."""
    import ray

    from raysim.errors import ConfigError

    held = cluster.reserve(num_actors=2, cpus_per_actor=1.0, gpus_per_actor=0.0, timeout_s=None)
    try:
        start = time.monotonic()
        with pytest.raises(ConfigError, match=r"could not be placed within 3 s \(ray.placement_timeout_s\)"):
            cluster.reserve(num_actors=1, cpus_per_actor=1.0, gpus_per_actor=0.0, timeout_s=3.0)
        assert 3 <= time.monotonic() - start < 10
    finally:
        ray.util.remove_placement_group(held)


def test_an_actor_larger_than_the_local_ray_is_refused_naming_its_size(ray_session):
    from raysim.errors import ConfigError

    for cpus, gpus in ((3.0, 0.0), (1.0, 0.25)):
        with pytest.raises(ConfigError, match=r"this local Ray has 2 CPUs .*: not enough for one device actor of "
                                              rf"ray.cpus_per_actor={cpus:g}"):
            cluster.actors_that_fit(cpus_per_actor=cpus, gpus_per_actor=gpus)
    assert cluster.actors_that_fit(cpus_per_actor=0.5, gpus_per_actor=0.0) == 4


# --- cluster.yaml --------------------------------------------------------------------------


def load_cluster_yaml() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_rays_own_schema():
    config = prepare_config(load_cluster_yaml())  # the defaults filling `ray up` does
    validate_config(config)
    types = config["available_node_types"]
    assert config["cluster_name"] == "raysim"
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert sum(1 for t in types.values() if t["resources"].get("GPU", 0) == 0) >= 2  # head + CPU workers
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(bogus_key=1),
        lambda c: c["available_node_types"]["worker.gpu"].pop("resources"),
        lambda c: c["available_node_types"]["worker.gpu"]["resources"].update(GPU=-1),
        lambda c: c.update(max_workers="many"),
    ],
    ids=["unknown-top-level-key", "missing-resources", "negative-gpu", "max-workers-not-int"],
)
def test_schema_check_rejects_broken_configs(mutate):
    config = copy.deepcopy(load_cluster_yaml())
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def test_every_node_and_driver_runs_with_an_explicit_auth_mode():
    config = prepare_config(load_cluster_yaml())
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]  # the container of every node type
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_every_node_installs_the_tested_versions():
    config = load_cluster_yaml()
    commands = [*config["setup_commands"], *config["head_setup_commands"], *config["worker_setup_commands"]]
    installs = [c for c in commands if "pip install" in c]
    assert installs and all("-c ~/raysim/constraints.txt" in c for c in installs)
    assert any("raysim[cluster]" in c for c in config["head_setup_commands"])  # boto3, for the autoscaler
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert config["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-")  # the image's Ray is the pinned one
    assert "lost worker only costs" not in (ROOT / "cluster.yaml").read_text()


def test_constraints_pin_every_installed_requirement_at_its_version():
    """constraints.txt is what this environment runs: regenerate it with .ci/constraints.py after an upgrade."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("constraints", ROOT / ".ci" / "constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    closure = module.closure("raysim", extras=module.EXTRAS)
    installed = {name: version.split("+")[0] for name, version in closure.items()}
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert installed == pins


def test_no_node_gets_the_launchers_world_open_ssh_group():
    """Ray's AWS launcher creates a group admitting SSH from 0.0.0.0/0 for any node type without
    SecurityGroupIds; with them on every type its security-group step returns the config untouched
    (and calls no AWS API), so nodes get only the group cluster.yaml documents."""
    from ray.autoscaler._private.aws import config as aws_config

    config = prepare_config(load_cluster_yaml())
    before = copy.deepcopy(config)
    assert aws_config._configure_security_group(config) == before
    groups = {tuple(t["node_config"]["SecurityGroupIds"]) for t in config["available_node_types"].values()}
    assert groups == {("sg-REPLACE-ME",)}  # one group, the placeholder the documented commands replace
    text = (ROOT / "cluster.yaml").read_text()
    assert "--cidr $MY_CIDR" in text and "--source-group $SG" in text and 's/sg-REPLACE-ME/$SG/' in text
