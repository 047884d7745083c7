"""Shared fixtures: one local Ray per test session, and a tiny experiment."""

from __future__ import annotations

import os

import pytest

from raysim.config import load_experiment

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TINY = [
    "rounds=3",
    "population_size=1000",
    "progress=false",
    "cohort.size=4",
    "cohort.over_selection=1.5",
    "train.local_steps=2",
    "train.batch_size=4",
    "model.n_layer=1",
    "model.n_embd=32",
    "model.n_head=2",
    "model.vocab_size=128",
    "model.n_positions=16",
    "data.seq_len=16",
    "data.examples_per_user=8",
    "data.eval_users=4",
    "eval.every=2",
    "methods.lora_rank=[4]",
    "data.source=synthetic",
]


MACHINE_KEYS = ("wall_time_s", "versions", "num_actors", "actor_nodes", "checkpoint")  # summary.json: the machine's


def assert_same_results(a, b) -> None:
    """Two run directories hold the same results: byte-identical devices.parquet parts and final state,
    rounds.parquet equal in every column but wall time (the one that measures the machine, not the run), and
    summary.json equal but for what measures the machine or the session (MACHINE_KEYS). Folders of other
    names differ in ``run_id`` (the folder's name) alone: their devices parts are then equal in every other
    column, bit for bit."""
    import json

    import pyarrow.parquet as pq

    parts = [sorted(p.name for p in (d / "devices.parquet").iterdir()) for d in (a, b)]
    assert parts[0] == parts[1] and parts[0]
    for name in parts[0]:
        if a.name == b.name:
            assert (a / "devices.parquet" / name).read_bytes() == (b / "devices.parquet" / name).read_bytes(), name
        else:
            assert_same_columns(*(pq.read_table(d / "devices.parquet" / name).drop_columns(["run_id"])
                                  for d in (a, b)), where=name)
    assert (a / "final_state.pt").exists() == (b / "final_state.pt").exists()
    if (a / "final_state.pt").exists():
        assert (a / "final_state.pt").read_bytes() == (b / "final_state.pt").read_bytes()
    rounds_a, rounds_b = (pq.read_table(d / "rounds.parquet").drop_columns(["wall_time_s", "run_id"]) for d in (a, b))
    assert rounds_a.num_rows > 0
    assert_same_columns(rounds_a, rounds_b, where="rounds.parquet")
    summary_a, summary_b = ({k: v for k, v in json.loads((d / "summary.json").read_text()).items()
                             if k not in MACHINE_KEYS} for d in (a, b))
    assert json.dumps(summary_a, sort_keys=True) == json.dumps(summary_b, sort_keys=True)


def assert_same_columns(x_table, y_table, *, where: str) -> None:
    """Equal schemas and every column bit for bit (Arrow's equals calls NaN unequal to NaN); text by value."""
    import numpy as np

    assert x_table.schema == y_table.schema and x_table.num_rows == y_table.num_rows, where
    for name in x_table.column_names:
        x, y = (np.asarray(t[name].to_numpy()) for t in (x_table, y_table))
        assert (x.tolist() == y.tolist()) if x.dtype == object else (x.tobytes() == y.tobytes()), (where, name)


def make_worker(cfg, *, base=None):
    """A DeviceWorker in this process, built the way the pool builds one (on ``base``: the initial model)."""
    from raysim.data.build import build_dataset
    from raysim.engine.device import DeviceWorker
    from raysim.models.build import initial_base_model

    base = initial_base_model(cfg.model, seed=cfg.seed) if base is None else base
    return DeviceWorker(cfg=cfg, base=base, dataset=build_dataset(cfg), num_threads=1)


def train_unit(worker, state, ids, configs, *, round=3, utility=False):
    """Train devices ``ids`` (with ``configs``) on ``worker`` as one unit of round ``round``, grouped as the
    pool groups a cohort; return their records in the order of ``ids`` and the unit's partial sum."""
    from dataclasses import asdict

    import numpy as np

    from raysim.engine.work import WorkUnit, make_groups

    worker.begin_round(state, round, None, utility)
    groups = make_groups(ids, configs, pass_limit=worker.pass_limit)
    records, partial = worker.train(WorkUnit(index=0, groups=tuple(groups)))
    positions: dict[int, list[int]] = {}
    for i, d in enumerate(records.device_id):
        positions.setdefault(int(d), []).append(i)
    order = [positions[int(d)].pop(0) for d in ids]
    return {k: np.asarray(v)[order] for k, v in asdict(records).items()}, partial


def trained_alone(worker, state, device_id, config, *, round=1):
    """Device ``device_id`` trained alone on ``worker``: its final trainable tensors (by parameter name) and its
    example count."""
    records, _ = train_unit(worker, state, [device_id], [config], round=round)
    params = worker.submodel(config).params
    return {n: p.detach().clone() for n, p in params.items()}, int(records["num_examples"][0])


def new_state(state, partial):
    """The state a round's one partial sum gives (FedAvg at server lr 1), in float64."""
    from raysim.aggregation.rules import combine, weighted_mean

    mean = weighted_mean(combine([partial]))
    return {k: state[k].double() + mean[k] for k in state}


@pytest.fixture(scope="session")
def ray_session():
    from raysim import cluster

    connection = cluster.connect(address=None, num_cpus=2)
    yield
    connection.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path):
    """A few-second experiment on a tiny model, writing under tmp_path."""

    def make(*overrides: str):
        return load_experiment(None, [*TINY, f"output_dir={tmp_path / 'run'}", *overrides])

    return make
