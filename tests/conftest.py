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


def assert_metrics_close(a: dict, b: dict, columns: list[str], *, rtol: float = 1e-6) -> None:
    """Two runs' rounds columns agree to ``rtol`` (relative), column by column."""
    import numpy as np

    for col in columns:
        np.testing.assert_allclose(np.array(a[col], dtype=float), np.array(b[col], dtype=float), rtol=rtol,
                                   err_msg=col)


def make_worker(cfg):
    """A DeviceWorker in this process, built the way the pool builds one."""
    from raysim.data import build_dataset
    from raysim.device import DeviceWorker
    from raysim.models import initial_base_model

    return DeviceWorker(cfg=cfg, base=initial_base_model(cfg.model, seed=cfg.seed), dataset=build_dataset(cfg),
                        num_threads=1)


@pytest.fixture(scope="session")
def ray_session():
    from raysim import cluster

    cluster.connect(address=None, num_cpus=2)
    yield
    cluster.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path):
    """A few-second experiment on a tiny model, writing under tmp_path."""

    def make(*overrides: str):
        return load_experiment(None, [*TINY, f"output_dir={tmp_path / 'run'}", *overrides])

    return make
