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


def test_device_epsilon_is_opacus_accountant_stepped_once_per_local_step():
    """Opacus's own RDP accountant, stepped by hand (z = 1, q = batch 4 / 8 examples, 2 local steps)."""
    from opacus.accountants import RDPAccountant

    cfg = load_experiment(None, [*TINY, "privacy.local.enabled=true"])
    opacus = RDPAccountant()
    for _ in range(2):
        opacus.step(noise_multiplier=1.0, sample_rate=4 / 8)
    eps = local.device_epsilon(num_examples=8, cfg=cfg.privacy.local, train=cfg.train)
    assert eps == opacus.get_epsilon(delta=1e-5)
    assert eps == accounting.epsilon(noise_multiplier=1.0, sample_rate=4 / 8, rounds=2, delta=1e-5)


def test_every_per_example_gradient_reaching_the_optimizer_is_clipped_to_c():
    """With noise 0 the gradient AdamW receives must be (1/B)·Σ_i g_i·min(1, C/‖g_i‖), each g_i one example's
    gradient, here taken one example at a time with plain autograd before Opacus wraps the model. With
    q = 1 (batch 8 of 8 examples) the Poisson batch is all 8 and B = 8. C = 1e-3 is below every ‖g_i‖, so
    without per-example clipping the gradient would be the plain mean and the test fails.

    Tolerance: Opacus forms g_i as an einsum of activations and output gradients, autograd as the matmuls
    of backward; both sum the same ≤ 16·32 float32 products in other orders, so they agree to a few hundred
    ulp of the largest terms: rtol 1e-4, atol 1e-4·C/B.
    """
    C, B = 1e-3, 8
    cfg = load_experiment(None, [*TINY, "privacy.local.enabled=true", "privacy.local.noise_multiplier=0",
                                 f"privacy.local.clip_norm={C}", f"train.batch_size={B}", "train.local_steps=1"])
    worker = make_worker(cfg)
    sub = worker.submodel(DeviceConfig(lora_rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B away from its zero start, so that A's gradients are not zero too
        for name, p in sub.params.items():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    data = worker.dataset.device_examples(5)
    assert len(data) == B
    params = list(sub.params.values())
    per_example = [torch.autograd.grad(sub.lm(input_ids=x[None], labels=x[None]).loss, params) for x in data]
    norms = [torch.sqrt(sum(t.double().pow(2).sum() for t in grads)).item() for grads in per_example]
    assert min(norms) > C
    expected = [sum(grads[j].double() * min(1.0, C / n) for grads, n in zip(per_example, norms)) / B
                for j in range(len(params))]

    dp = local.LocalDPSGD(model=sub.lm, optimizer=sub.optimizer, cfg=cfg.privacy.local, batch_size=B)
    received = []
    dp.optimizer.original_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: received.append([p.grad.detach().clone() for p in params]))
    dp.train(data, steps=1, batch_size=B, device=torch.device("cpu"), batch_generator=torch.Generator().manual_seed(1),
             noise_generator=torch.Generator().manual_seed(2))
    [grads] = received
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * C / B)
    assert torch.sqrt(sum(t.double().pow(2).sum() for t in grads)).item() <= C * (1 + 1e-4)  # ‖mean‖ ≤ C


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
