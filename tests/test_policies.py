"""Policies: inside the method space, feasible by the cost model, deterministic."""

from __future__ import annotations

import math

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.config import MethodsConfig
from raysim.costmodel import Measurement
from raysim.errors import ConfigError
from raysim.methods import method_space
from raysim.policies import CostOracle, PolicyContext, PolicySpec, build_policy, read_policy
from raysim.policies.static import richness_order
from raysim.types import DeviceConfig, DeviceDraws, RoundState

METHODS = MethodsConfig(lora_rank=[8, 2, 16], prune_ratio=[0.0, 0.5], trainable_layers=[None, 1], bits=[32, 8, 4])
POLICIES = ("uniform", "greedy_fit", "random", "rl")


def fake_measure(config: DeviceConfig) -> Measurement:
    """Costs that grow with rank, width and layers; traffic with bits."""
    width = 1.0 - config.prune_ratio
    layers = 2 if config.trainable_layers is None else config.trainable_layers
    params = int(1000 * (config.lora_rank + 1) * width * layers)
    return Measurement(flops_per_step=1e9 * width * layers * (1 + config.lora_rank / 16),
                       activation_bytes=int(2e8 * width * layers), param_bytes=int(1e8 * width),
                       trainable_params=params, bytes_down=params * 4, bytes_up=params * config.bits // 8)


def context(*, seed=0, deadline_s=60.0, methods=METHODS) -> PolicyContext:
    oracle = CostOracle(measure=fake_measure, local_steps=4, deadline_s=deadline_s)
    return PolicyContext(methods=methods, space=method_space(methods), oracle=oracle, seed=seed, rounds=5)


def draws(n: int, *, seed: int) -> DeviceDraws:
    g = np.random.default_rng(seed)
    return DeviceDraws(
        device_id=np.sort(g.choice(10_000, size=n, replace=False)).astype(np.int64),
        device_class=g.choice(["phone-low", "phone-mid", "phone-high"], size=n).astype(object),
        train_flops_per_s=10 ** g.uniform(8, 10.5, n),
        memory_bytes=10 ** g.uniform(8, 9.5, n),
        uplink_bps=10 ** g.uniform(5, 7, n),
        downlink_bps=10 ** g.uniform(5.5, 7.5, n),
        rtt_s=g.uniform(0.01, 0.2, n),
        dropout_prob=np.full(n, 0.1),
    )


def build(name: str, ctx: PolicyContext, **params):
    return build_policy(PolicySpec(name=name, path=f"{name}.yaml", params=params), context=ctx)


def results_for(devices: DeviceDraws, configs, *, loss: float) -> dict:
    n = len(devices)
    status = np.where(np.arange(n) % 5 == 0, "straggler", "ok")
    return {"round": {"train_loss": loss},
            "devices": {"status": status, "finish_s": np.linspace(1, 50, n), "bytes_up": np.full(n, 1000),
                        "bytes_down": np.full(n, 4000)}}


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10_000), round=st.integers(1, 50),
       deadline=st.sampled_from([None, 5.0, 30.0, 300.0]), name=st.sampled_from(POLICIES))
def test_every_policy_stays_inside_the_method_space(n, seed, round, deadline, name):
    ctx = context(seed=seed, deadline_s=deadline)
    devices = draws(n, seed=seed)
    configs = build(name, ctx).assign(devices, RoundState(round=round, sim_time_s=0.0))
    assert len(configs) == n and all(c in ctx.space for c in configs)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10_000), deadline=st.sampled_from([None, 5.0, 30.0, 300.0]),
       name=st.sampled_from(("greedy_fit", "random", "rl")))
def test_greedy_random_and_rl_choose_a_feasible_config_whenever_one_exists(n, seed, deadline, name):
    ctx = context(seed=seed, deadline_s=deadline)
    devices = draws(n, seed=seed)
    policy = build(name, ctx)
    for rnd in (1, 2):
        configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=3.0 / rnd))
        prices = ctx.oracle.price(devices, ctx.space)
        for i, c in enumerate(configs):
            if prices.feasible[i].any():
                assert prices.feasible[i, ctx.space.index(c)]
        policy.observe(results_for(devices, configs, loss=3.0 / (rnd + 1)))


def test_greedy_fit_gives_each_device_its_richest_feasible_config():
    ctx = context()
    devices = draws(30, seed=1)
    order = richness_order(ctx)
    prices = ctx.oracle.price(devices, ctx.space)
    configs = build("greedy_fit", ctx).assign(devices, RoundState(round=1, sim_time_s=0.0))
    for i, c in enumerate(configs):
        feasible = [j for j in order if prices.feasible[i, j]]
        if feasible:
            assert ctx.space.index(c) == feasible[0]


def test_richness_prefers_more_trainable_parameters_then_more_bits():
    ctx = context()
    richest = ctx.space[richness_order(ctx)[0]]
    assert richest == DeviceConfig(lora_rank=16, prune_ratio=0.0, trainable_layers=None, bits=32)


def test_a_device_with_no_feasible_config_gets_the_cheapest_one():
    ctx = context(deadline_s=1e-6)
    devices = draws(5, seed=2)
    prices = ctx.oracle.price(devices, ctx.space)
    configs = build("greedy_fit", ctx).assign(devices, RoundState(round=1, sim_time_s=0.0))
    assert [ctx.space.index(c) for c in configs] == list(prices.fallback())


@pytest.mark.parametrize("name", ("random", "rl"))
def test_stochastic_policies_are_deterministic_for_a_seed(name):
    devices = draws(20, seed=3)
    runs = []
    for _ in range(2):
        policy = build(name, context(seed=7))
        picked = []
        for rnd in (1, 2, 3):
            configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=2.0))
            policy.observe(results_for(devices, configs, loss=2.0 - 0.1 * rnd))
            picked.append(configs)
        runs.append(picked)
    assert runs[0] == runs[1]
    other = build(name, context(seed=8)).assign(devices, RoundState(round=1, sim_time_s=0.0))
    assert other != runs[0][0]


def test_random_draws_do_not_depend_on_which_devices_share_the_cohort():
    devices = draws(20, seed=4)
    half = DeviceDraws(**{k: v[::2] for k, v in vars(devices).items()})
    state = RoundState(round=3, sim_time_s=0.0)
    full = build("random", context()).assign(devices, state)
    assert build("random", context()).assign(half, state) == full[::2]


def test_tiered_gives_each_class_its_config_and_others_the_default():
    ctx = context()
    low = {"lora_rank": 2, "bits": 4}
    policy = build("tiered", ctx, classes={"phone-low": low})
    devices = draws(20, seed=5)
    configs = policy.assign(devices, RoundState(round=1, sim_time_s=0.0))
    default = ctx.space[0]
    for cls, c in zip(devices.device_class, configs):
        assert c == (replace(default, **low) if cls == "phone-low" else default)


def test_a_tiered_config_outside_the_space_is_a_config_error_naming_the_field():
    with pytest.raises(ConfigError, match=r"tiered.yaml: params.classes.phone-low: .*outside the experiment's method"):
        build("tiered", context(), classes={"phone-low": {"lora_rank": 3}})


def test_an_unknown_policy_parameter_is_a_config_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("policy: greedy_fit\nparams: {richest: true}\n")
    with pytest.raises(ConfigError, match=r"p.yaml: params.richest: unknown parameter"):
        read_policy(str(path))


def test_rl_learns_to_prefer_the_rewarded_config():
    """Only 4-bit devices are aggregated (so share the progress): the network shifts its mass to 4 bits."""
    ctx = context(deadline_s=None, methods=MethodsConfig(bits=[32, 8, 4]))
    policy = build("rl", ctx, w_time=0.0, w_bytes=0.0, w_failure=0.0, lr=0.02)
    devices = draws(32, seed=6)
    share = []
    loss = 5.0
    for rnd in range(1, 31):
        configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=loss))
        four = np.array([c.bits == 4 for c in configs])
        share.append(four.mean())
        loss *= 0.9
        n = len(devices)
        policy.observe({"round": {"train_loss": loss},
                        "devices": {"status": np.where(four, "ok", "straggler"), "finish_s": np.ones(n),
                                    "bytes_up": np.zeros(n), "bytes_down": np.zeros(n)}})
    assert np.mean(share[-5:]) > np.mean(share[:5]) + 0.2


def team_episode(policy, devices, *, rounds: int, eval_every: int, progress) -> list[float]:
    """Every device finishes at once; the eval loss drops by ``progress(configs)`` per round, seen at evaluations."""
    share, loss, seen = [], 5.0, 5.0
    for rnd in range(1, rounds + 1):
        configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=5.0,
                                                    last_eval_loss=seen))
        share.append(np.mean([c.bits == 4 for c in configs]))
        loss *= 1 - progress(configs)
        evaluated = rnd % eval_every == 0
        seen = loss if evaluated else seen
        n = len(devices)
        policy.observe({"round": {"train_loss": 5.0, "eval_loss": loss if evaluated else math.nan},
                        "devices": {"status": np.full(n, "ok"), "finish_s": np.ones(n),
                                    "bytes_up": np.zeros(n), "bytes_down": np.zeros(n)}})
    return share


@pytest.mark.parametrize("eval_every", [1, 2])
def test_rl_credits_each_device_with_its_share_of_the_team_progress(eval_every):
    """Only 4-bit devices move the eval loss; the critic's counterfactual credit shifts the policy to 4 bits."""
    ctx = replace(context(deadline_s=None, methods=MethodsConfig(bits=[32, 8, 4])), eval_every=eval_every)
    policy = build("rl", ctx, w_time=0.0, w_bytes=0.0, w_failure=0.0, lr=0.01)
    share = team_episode(policy, draws(16, seed=6), rounds=160, eval_every=eval_every,
                         progress=lambda configs: 0.02 * np.mean([c.bits == 4 for c in configs]))
    assert np.mean(share[-20:]) > np.mean(share[:10]) + 0.15


def test_rl_spreads_an_evaluations_progress_over_the_rounds_since_the_last():
    ctx = replace(context(deadline_s=None, methods=MethodsConfig(bits=[32, 8, 4])), eval_every=2)
    policy = build("rl", ctx)
    team_episode(policy, draws(8, seed=1), rounds=4, eval_every=2, progress=lambda configs: 0.01)
    # two evaluations, each after two rounds of 1 %: every round is credited (1 - 0.99 ** 2) / 2
    assert policy.scale == pytest.approx((1 - 0.99 ** 2) / 2)
    assert policy.pending == [] and len(policy.memory) == 4


def test_rl_checkpoint_round_trips(tmp_path):
    ctx = context()
    devices = draws(10, seed=7)
    policy = build("rl", ctx)
    for rnd in (1, 2, 3):
        configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=2.0))
        policy.observe(results_for(devices, configs, loss=2.0 - 0.1 * rnd))
    torch.save(policy.state_dict(), tmp_path / "rl.pt")
    loaded = build("rl", ctx, checkpoint=str(tmp_path / "rl.pt"), learn=False)
    state = RoundState(round=4, sim_time_s=0.0, last_train_loss=1.7)
    for a, b in zip(policy.net.parameters(), loaded.net.parameters()):
        assert torch.equal(a, b)
    assert loaded.assign(devices, state) == build("rl", ctx, checkpoint=str(tmp_path / "rl.pt")).assign(devices, state)


def test_rl_with_a_missing_checkpoint_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rl.yaml: params.checkpoint: checkpoint not found"):
        build("rl", context(), checkpoint="/nonexistent.pt")
