"""Local DP-SGD on a device: Poisson batches, Opacus per-example clipping and noise on LoRA parameters only."""

import math

import pytest
import torch

from raysim.config import load_experiment
from raysim.privacy import accounting, local
from raysim.types import DeviceConfig

from conftest import TINY, make_worker, train_unit


def test_poisson_batches_sample_each_example_at_the_expected_rate():
    g = torch.Generator().manual_seed(0)
    batches = local.poisson_batches(1000, steps=200, batch_size=50, generator=g)
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert sizes.mean().item() == pytest.approx(50, rel=0.05)
    assert all(len(set(b.tolist())) == len(b) for b in batches)


def test_device_epsilon_is_the_accountants_for_its_local_steps():
    cfg = load_experiment(None, [*TINY, "privacy.local.enabled=true"])
    eps = local.device_epsilon(num_examples=8, cfg=cfg.privacy.local, train=cfg.train)
    assert eps == accounting.epsilon(noise_multiplier=1.0, sample_rate=4 / 8, rounds=2, delta=1e-5)


@pytest.fixture(scope="module")
def worker():
    return make_worker(load_experiment(None, [*TINY, "privacy.local.enabled=true", "train.local_steps=3"]))


def _update(worker, state, device_id):
    records, partial = train_unit(worker, state, [device_id], [DeviceConfig(lora_rank=4)], round=1)
    return records, {k: s / partial.weights[k] for k, s in partial.sums.items()}


def test_dp_sgd_trains_only_lora_parameters_and_is_deterministic(worker):
    assert all("lora" in name for name in worker.submodel(DeviceConfig(lora_rank=4)).params)
    state = worker.initial_state()
    records, first = _update(worker, state, 5)
    _, again = _update(worker, state, 5)
    assert math.isfinite(records["train_loss"][0]) and records["update_norm"][0] > 0
    for k in first:
        assert torch.equal(first[k], again[k])


def test_an_empty_poisson_batch_still_takes_a_noisy_step(worker):
    dp = worker._dp_sgd(worker.submodel(DeviceConfig(lora_rank=4)))
    params = [p.detach().clone() for p in dp.optimizer.params]
    data = torch.zeros((10, 16), dtype=torch.long)
    loss = dp.train(data, steps=1, batch_size=0, device=torch.device("cpu"),
                    batch_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(0))
    assert math.isnan(loss)
    assert any(not torch.equal(p, q) for p, q in zip(params, dp.optimizer.params))
