"""DP-FedAvg's math: clipping, noise, the noisy mean, adaptive clipping; clipping on actors = at the server."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from raysim.aggregation.rules import PartialSum, combine, global_norm, weighted_mean
from raysim.config import AggregationConfig, PrivacyConfig, load_experiment
from raysim.engine.aggregator import Aggregator
from raysim.engine.processors import UpdateProcessor
from raysim.privacy.central import AdaptiveClipping, CentralDP, clip, gaussian_noise, noisy_sum
from raysim.privacy.plan import plan_central, update_noise_multiplier
from raysim.types import DeviceConfig

from conftest import TINY

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)
updates = st.dictionaries(st.sampled_from(["a", "b", "c"]),
                          arrays(np.float32, st.integers(1, 6).map(lambda n: (n,)), elements=finite), min_size=1)


@settings(max_examples=200, deadline=None)
@given(update=updates, clip_norm=st.floats(min_value=1e-3, max_value=1e3))
def test_clipped_norm_is_at_most_the_clip_norm_for_any_update(update, clip_norm):
    clipped, norm = clip({k: torch.from_numpy(v) for k, v in update.items()}, clip_norm=clip_norm)
    assert global_norm(clipped) <= clip_norm * (1 + 1e-12)
    assert norm == pytest.approx(math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in update.values())))


def test_an_update_within_the_clip_norm_is_left_as_it_is():
    update = {"a": torch.tensor([0.3, 0.4]), "b": torch.tensor([0.0])}
    clipped, norm = clip(update, clip_norm=1.0)
    assert norm == pytest.approx(0.5) and clipped["a"].tolist() == pytest.approx([0.3, 0.4])


def test_clipping_scales_all_tensors_jointly():
    clipped, _ = clip({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}, clip_norm=1.0)
    assert clipped["a"].item() == pytest.approx(0.6) and clipped["b"].item() == pytest.approx(0.8)


def test_noise_has_the_configured_std_and_zero_mean():
    noise = gaussian_noise({"w": torch.zeros(200_000), "v": torch.zeros(3, 4)}, std=0.7, seed=0, round=3)
    sample = torch.cat([t.flatten() for t in noise.values()])
    se = 0.7 / math.sqrt(len(sample))
    assert abs(sample.std().item() - 0.7) < 5 * 0.7 / math.sqrt(2 * len(sample))
    assert abs(sample.mean().item()) < 5 * se


def test_noise_is_keyed_by_seed_and_round():
    like = {"w": torch.zeros(8)}
    a = gaussian_noise(like, std=1.0, seed=0, round=3)["w"]
    assert torch.equal(a, gaussian_noise(like, std=1.0, seed=0, round=3)["w"])
    assert not torch.equal(a, gaussian_noise(like, std=1.0, seed=0, round=4)["w"])
    assert not torch.equal(a, gaussian_noise(like, std=1.0, seed=1, round=3)["w"])


def noisy_mean(total, **kwargs):
    noisy, snr = noisy_sum(total, **kwargs)
    return weighted_mean(noisy), snr


def _uniform_partial(updates):
    p = PartialSum.zeros_like({"w": torch.zeros_like(updates[0])})
    for u in updates:
        p.add({"w": u}, weight=1.0)
    return p


def test_without_noise_and_a_clip_above_every_norm_dp_fedavg_equals_fedavg():
    g = torch.Generator().manual_seed(0)
    raw = [torch.randn(6, generator=g) for _ in range(5)]
    clipped = [clip({"w": u}, clip_norm=1e6)[0]["w"] for u in raw]
    mean, snr = noisy_mean(_uniform_partial(clipped), noise_std=0.0, expected_devices=5, seed=0, round=1)
    torch.testing.assert_close(mean["w"], weighted_mean(_uniform_partial(raw))["w"], rtol=1e-12, atol=1e-15)
    assert snr == math.inf


def test_noisy_mean_divides_by_the_expected_cohort_not_the_count():
    partial = _uniform_partial([torch.ones(3), torch.ones(3)])
    mean, _ = noisy_mean(partial, noise_std=0.0, expected_devices=4.0, seed=0, round=1)
    assert mean["w"].tolist() == [0.5, 0.5, 0.5]


def test_signal_to_noise_compares_the_clipped_sum_with_the_noise_drawn():
    partial = _uniform_partial([torch.full((1000,), 0.1)])
    _, snr = noisy_mean(partial, noise_std=0.1, expected_devices=1.0, seed=0, round=1)
    assert snr == pytest.approx(1.0, rel=0.1)


def test_update_noise_multiplier_leaves_the_count_its_share_of_the_budget():
    z = update_noise_multiplier(1.0, count_std=5.0)
    assert z ** -2 + (2 * 5.0) ** -2 == pytest.approx(1.0)
    with pytest.raises(ValueError):
        update_noise_multiplier(1.0, count_std=0.5)


def test_adaptive_clip_norm_shrinks_when_more_than_the_quantile_are_unclipped():
    rule = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_std=1e-9)
    shrunk = rule.step(1.0, num_unclipped=100, expected_devices=100, seed=0, round=1)
    assert shrunk == pytest.approx(math.exp(-0.1))
    assert rule.step(shrunk, num_unclipped=0, expected_devices=100, seed=0, round=2) == pytest.approx(1.0)


def test_adaptive_clip_norm_converges_to_the_target_quantile_of_norms():
    norms = np.random.default_rng(0).lognormal(size=1000)
    rule, clip_norm = AdaptiveClipping(target_quantile=0.5, learning_rate=0.2, count_std=50.0), 0.01
    for rnd in range(200):
        clip_norm = rule.step(clip_norm, num_unclipped=int((norms <= clip_norm).sum()), expected_devices=1000,
                              seed=0, round=rnd)
    assert clip_norm == pytest.approx(np.median(norms), rel=0.15)


# Clipping on the actors, then summing, against clipping each update at the server.

IDS = [1, 2, 3, 4, 5]
CONFIG = DeviceConfig(lora_rank=4)


class Recorder(UpdateProcessor):
    """A device-side update processor that keeps a copy of every update it sees (what a server would receive)."""

    def __init__(self):
        self.updates = {}

    def on_device(self, update, *, context, params):
        self.updates[context.device_id] = {k: v.clone() for k, v in update.tensors.items()}
        return update


def _plan(clip_norm):
    return plan_central(PrivacyConfig(clip_norm=clip_norm, noise_multiplier=1.0), rounds=3, cohort_size=5,
                        population_size=1000)


@pytest.fixture(scope="module")
def workers():
    from raysim.data.build import build_dataset
    from raysim.engine.device import DeviceWorker
    from raysim.models.build import initial_base_model

    cfg = load_experiment(None, [*TINY, "ray.tokens_per_pass=128"])  # two devices per pass: three units
    base, dataset = initial_base_model(cfg.model, seed=cfg.seed), build_dataset(cfg)
    recorder = Recorder()  # before clipping: it sees what a server that clips would receive
    chains = [[recorder, CentralDP(plan=_plan(1.0), adaptive=None)],
              [Recorder(), CentralDP(plan=_plan(1.0), adaptive=None)]]
    return (*(DeviceWorker(cfg=cfg, base=base, dataset=dataset, num_threads=1, processors=c) for c in chains),
            recorder)


def _units(worker):
    from raysim.engine.work import plan

    return plan(IDS, [CONFIG] * len(IDS), np.ones(len(IDS)), pass_limit=worker.pass_limit, max_units=64)


def _train(workers_by_unit, state, clip_norm):
    """Each unit on its worker; the units' records (unit order) and partial sums (unit order)."""
    for w in set(workers_by_unit):
        w.begin_round(state, 3, [None, clip_norm])  # the chain's round parameters: (recorder, central DP)
    out = [w.train(u) for w, u in zip(workers_by_unit, _units(workers_by_unit[0]))]
    return [r for r, _ in out], [p for _, p in out]


@pytest.fixture(scope="module")
def clipped(workers):
    a, b, recorder = workers
    state = a.initial_state()
    assert len(_units(a)) == 3
    _train([a, a, a], state, math.inf)  # each device's own update, unclipped: what a server that clips would receive
    raw = [recorder.updates[i] for i in IDS]
    clip_norm = float(np.median([global_norm(u) for u in raw]))  # clipping is active for some devices
    server = [clip(u, clip_norm=clip_norm)[0] for u in raw]
    one = _train([a, a, a], state, clip_norm)[1]
    two = _train([a, b, a], state, clip_norm)[1]
    return state, clip_norm, server, one, two


def test_clipping_on_one_or_two_actors_equals_clipping_each_update_at_the_server(clipped):
    _, _, server, one, two = clipped
    a, b = combine(one), combine(two)
    assert a.num_devices == b.num_devices == len(IDS)
    for k in a.sums:
        assert torch.equal(a.sums[k], b.sums[k])  # the same units added in the same order, wherever they ran
        # The same clipped values summed in another order: each float64 addition rounds by at most eps
        # relative to the running sum, so |error| <= n * eps * sum |u_i| (n = devices).
        magnitude = sum(u[k].double().abs() for u in server)
        error = (a.sums[k] - sum(u[k].double() for u in server)).abs()
        assert (error <= len(IDS) * torch.finfo(torch.float64).eps * magnitude).all()
        assert float(a.weights[k]) == len(IDS)


def test_noisy_aggregate_is_the_same_for_one_two_actors_and_the_server(clipped):
    state, clip_norm, server, one, two = clipped
    plan = _plan(clip_norm)

    def aggregate(partials):
        agg = Aggregator(state=state, cfg=AggregationConfig(), seed=0, processors=[CentralDP(plan=plan, adaptive=None)])
        return agg.aggregate(3, partials)

    new_one, stats = aggregate(one)
    new_two, _ = aggregate(two)
    noise = gaussian_noise(state, std=clip_norm, seed=0, round=3)
    for k, v in state.items():
        expected = (v.double() + (sum(u[k] for u in server) + noise[k]) / plan.expected_devices).float()
        # float32 state: the float64 result rounds once to float32 (half an ulp either way of the same value)
        torch.testing.assert_close(new_one[k], expected, rtol=torch.finfo(torch.float32).eps, atol=0)
        assert torch.equal(new_two[k], new_one[k])
    assert stats["noise_std"] == pytest.approx(clip_norm)


def test_records_report_each_devices_norm_before_clipping(clipped, workers):
    state, clip_norm, _, _, _ = clipped
    records, _ = _train([workers[0]] * 3, state, clip_norm)
    assert (np.concatenate([r.update_norm for r in records]) > clip_norm).any()
