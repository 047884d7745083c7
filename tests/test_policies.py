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
from raysim.emulation.clock import settle_round
from raysim.emulation.costmodel import Measurement, device_costs
from raysim.errors import ConfigError
from raysim.io import checkpoint as ckpt
from raysim.io.results import ROUNDS_SCHEMA, RoundResult, RoundRow
from raysim.methods import method_space
from raysim.policies import CostOracle, PolicyContext, PolicySpec, build_policy, read_policy
from raysim.policies.rl.critic import fit
from raysim.policies.rl.planning import Proposal
from raysim.policies.rl.policy import pack
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


def round_results(ctx: PolicyContext, devices: DeviceDraws, configs, *, round: int = 1, target: int | None = None,
                  train_loss: float = 2.0, eval_loss: float = math.nan) -> RoundResult:
    """What a run hands ``observe``: the round rule applied to the cost model's finish times, as in run.py."""
    n = len(devices)
    costs = device_costs(devices, [ctx.oracle.measure(c) for c in configs], local_steps=ctx.oracle.local_steps)
    dropped = np.arange(n) % 7 == 3
    outcome = settle_round(finish_s=costs.total_s, available=np.ones(n, dtype=bool), fits=costs.fits(devices),
                           dropped=dropped, target=n if target is None else target, deadline_s=ctx.oracle.deadline_s)
    row = RoundRow(**({name: 0 for name in ROUNDS_SCHEMA.names}
                      | {"round": round, "train_loss": train_loss, "eval_loss": eval_loss,
                         "round_duration_s": outcome.duration_s}))
    devices = {"status": outcome.status, "finish_s": costs.total_s, "bytes_up": costs.bytes_up,
               "bytes_down": costs.bytes_down, "num_examples": np.full(n, 8),
               "utility": np.where(outcome.status == "ok", 0.01, np.nan)}
    return RoundResult(row=row, devices=devices, started_s=0.0)


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
        policy.observe(round_results(ctx, devices, configs, round=rnd, train_loss=3.0 / (rnd + 1)))


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
        ctx = context(seed=7)
        policy = build(name, ctx)
        picked = []
        for rnd in (1, 2, 3):
            configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=2.0))
            policy.observe(round_results(ctx, devices, configs, round=rnd, train_loss=2.0 - 0.1 * rnd))
            picked.append(configs)
        runs.append(picked)
    assert runs[0] == runs[1]
    other = build(name, context(seed=8)).assign(devices, RoundState(round=1, sim_time_s=0.0))
    assert other != runs[0][0]


def test_random_draws_do_not_depend_on_which_devices_share_the_cohort():
    devices = draws(20, seed=4)
    half = devices.select(slice(None, None, 2))
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


def team_episode(policy, ctx, devices, *, rounds: int, utility, target=None) -> list[list]:
    """Rounds by the round rule; each trained device's update has ``utility(config)``."""
    picked = []
    for rnd in range(1, rounds + 1):
        configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=5.0, target=target))
        picked.append(configs)
        results = round_results(ctx, devices, configs, round=rnd, target=target)
        trained = np.isin(results.devices["status"], ("ok", "straggler"))
        results.devices["utility"] = np.where(trained, [utility(c) for c in configs], np.nan)
        policy.observe(results)
    return picked


def share_of(picked: list[list], predicate) -> np.ndarray:
    return np.array([np.mean([predicate(c) for c in configs]) for configs in picked])


def test_rl_credits_each_device_with_its_updates_utility():
    """Only 4-bit updates lower the held-out loss: the critic learns it, and the policy shifts to 4 bits."""
    ctx = context(deadline_s=None, methods=MethodsConfig(bits=[32, 4]))
    policy = build("rl", ctx, w_time=0.0, w_bytes=0.0, w_failure=0.0, lr=0.01, plan=0)  # the network alone
    devices = draws(16, seed=6)
    can_choose = ctx.oracle.price(devices, ctx.space).feasible.all(axis=1)  # the others get the fallback
    picked = team_episode(policy, ctx, devices, rounds=40, utility=lambda c: 0.02 * (c.bits == 4))
    share = share_of([[c for c, free in zip(configs, can_choose) if free] for configs in picked], lambda c: c.bits == 4)
    assert share[:5].mean() < 0.8 and share[-5:].mean() > 0.95
    g = dict(zip(ctx.space, policy.critic.values()))
    assert g[DeviceConfig(bits=4)] > g[DeviceConfig(bits=32)] + 0.5


def test_rl_critic_recovers_utilities_linear_in_the_config_features():
    """With a weak prior and utilities exactly linear in the features, g is that line (in units of the scale)."""
    ctx = context(deadline_s=None)
    policy = build("rl", ctx, ridge=1e-6, learn=True, plan=0)  # sampled configs: every feature varies
    truth = policy.own @ np.array([0.5, -0.3, 0.2, 0.1, -0.4, 0.0, 0.0]) + 1.0
    team_episode(policy, ctx, draws(24, seed=2), rounds=6, utility=lambda c: 0.01 * truth[ctx.space.index(c)])
    values = policy.critic.values() * policy.running["progress"]
    assert values == pytest.approx(0.01 * truth, rel=1e-2)  # older rounds were scaled by an older running mean


def test_rl_learns_to_close_the_round_sooner_when_configs_do_not_change_progress():
    """Every update is worth the same: only the devices that hold the round open should get cheaper, and the
    round (closed by the 8th of 12 arrivals) gets shorter."""
    ctx = context(deadline_s=None, methods=MethodsConfig(lora_rank=[16, 2], bits=[32]))
    devices = draws(12, seed=9)
    policy = build("rl", ctx, w_bytes=0.0, w_failure=0.0, prior_information=0.0, lr=0.01, plan=0)
    picked = team_episode(policy, ctx, devices, rounds=60, target=8, utility=lambda c: 0.01)
    durations = [round_results(ctx, devices, configs, target=8).row.round_duration_s for configs in picked]
    assert np.mean(durations[-10:]) < np.mean(durations[:10])


def planning_proposal(total_s: np.ndarray, *, target: int) -> Proposal:
    """Every device chose config 0 of two; all feasible, no traffic."""
    n, k = total_s.shape
    return Proposal(rows=np.arange(n), x=torch.zeros(n, k, 1), mask=torch.ones(n, k, dtype=torch.bool),
                    choice=np.zeros(n, dtype=np.int64), total_s=total_s, fits=np.ones((n, k), dtype=bool),
                    traffic=np.zeros((n, k)), target=target)


def test_rl_counterfactual_charges_a_device_the_time_it_holds_the_round_open():
    """Q(a', a_-i) recomputes who is aggregated and when the round closes with device i's config swapped."""
    ctx = context(deadline_s=None, methods=MethodsConfig(lora_rank=[16, 2], bits=[32]))
    policy = build("rl", ctx, w_progress=0.0, w_bytes=0.0, w_failure=0.0)
    total_s = np.array([[1.0, 0.5], [2.0, 1.0], [4.0, 3.0]])  # (devices, configs): rank 16 slower than rank 2
    proposal = planning_proposal(total_s, target=2)
    present = np.ones(3, dtype=bool)
    policy.running["duration"] = 2.0
    values = policy.counterfactual_values(proposal, present=present)
    # the round closes at the 2nd arrival: 2.0 s as chosen; device 1 at rank 2 closes it at 1.0 s; device 0 at
    # rank 2 arrives first either way; device 2 is not aggregated unless it beats device 1
    assert values == pytest.approx(-np.array([[2.0, 2.0], [2.0, 1.0], [2.0, 2.0]]) / 2.0)
    # progress: device 2 at rank 2 (3.0 s) still arrives after device 1, so the aggregated set is unchanged
    policy = build("rl", ctx, w_time=0.0, w_bytes=0.0, w_failure=1.0)
    values = policy.counterfactual_values(proposal, present=present)
    g = policy.critic.values()
    assert values[2] == pytest.approx([g[0] - 1.0, g[0] - 1.0])


def test_rl_checkpoint_round_trips(tmp_path):
    ctx = context()
    devices = draws(10, seed=7)
    policy = build("rl", ctx)
    for rnd in (1, 2, 3):
        configs = policy.assign(devices, RoundState(round=rnd, sim_time_s=0.0, last_train_loss=2.0))
        policy.observe(round_results(ctx, devices, configs, round=rnd, train_loss=2.0 - 0.1 * rnd))
    ckpt.save(tmp_path / "rl.safetensors", {"policy": pack(policy.state_dict())})
    loaded = build("rl", ctx, checkpoint=str(tmp_path / "rl.safetensors"), learn=False)
    state = RoundState(round=4, sim_time_s=0.0, last_train_loss=1.7)
    for a, b in zip(policy.net.parameters(), loaded.net.parameters()):
        assert torch.equal(a, b)
    again = build("rl", ctx, checkpoint=str(tmp_path / "rl.safetensors"))
    assert loaded.assign(devices, state) == again.assign(devices, state)


def test_rl_with_a_missing_checkpoint_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rl.yaml: params.checkpoint: checkpoint not found"):
        build("rl", context(), checkpoint="/nonexistent.pt")


def test_rl_temperature_below_one_sharpens_the_same_preferences():
    ctx = context(deadline_s=None, methods=MethodsConfig(bits=[32, 4]))
    devices = draws(16, seed=6)
    policy = build("rl", ctx, w_time=0.0, w_bytes=0.0, w_failure=0.0, lr=0.01, plan=0)
    team_episode(policy, ctx, devices, rounds=10, utility=lambda c: 0.02 * (c.bits == 4))
    state = RoundState(round=11, sim_time_s=0.0, last_train_loss=5.0)
    x = policy._inputs(devices, state, ctx.oracle.price(devices, ctx.space), target=len(devices))
    cold = build("rl", ctx, temperature=0.1)
    cold.load_state_dict(policy.state_dict())
    warm, sharp = (torch.softmax(p._logits(x), dim=-1)[:, 1] for p in (policy, cold))  # config 1: 4 bits
    assert (warm > 0.5).all() and (sharp >= warm - 1e-6).all() and (sharp > 0.98).all()
    with pytest.raises(ConfigError, match="params.temperature: must be > 0"):
        build("rl", ctx, temperature=0.0)




def test_rl_planning_moves_only_the_device_that_holds_the_round_open():
    """Time alone counts: device 1 (the 2nd of 2 arrivals) switches to its faster config; device 0 arrives
    first and device 2 last whatever they choose, so neither moves."""
    ctx = context(deadline_s=None, methods=MethodsConfig(lora_rank=[16, 2], bits=[32]))
    policy = build("rl", ctx, w_progress=0.0, w_bytes=0.0, w_failure=0.0)
    policy.running["duration"] = 2.0
    proposal = planning_proposal(np.array([[1.0, 0.5], [2.0, 1.0], [4.0, 3.0]]), target=2)
    assert list(policy.plan(proposal, device_id=np.arange(3))) == [0, 1, 0]


def test_rl_planning_trades_the_critics_progress_against_time():
    """g is 1 for rank 16 and 1/8 for rank 2. Device 1 at rank 2 closes the round 1 s sooner (half a typical
    round's duration) but lowers the round's progress from 1 to (1 + 1/8) / 2: it switches only where
    progress is worth less than 0.5 / 0.4375 of time."""
    ctx = context(deadline_s=None, methods=MethodsConfig(lora_rank=[16, 2], bits=[32]))
    total_s = np.array([[1.0, 0.5], [2.0, 1.0], [4.0, 3.0]])
    for w_progress, expected in ((2.0, [0, 0, 0]), (1.0, [0, 1, 0])):
        policy = build("rl", ctx, w_progress=w_progress, w_bytes=0.0, w_failure=0.0, prior_information=0.0)
        policy.critic.weights = np.append(np.zeros(policy.own.shape[1]), 0.0)
        policy.critic.weights[3] = 1.0  # g = rank / max rank: 1 for rank 16, 1/8 for rank 2
        policy.running["duration"] = 2.0
        proposal = planning_proposal(total_s, target=2)
        assert list(policy.plan(proposal, device_id=np.arange(3))) == expected, w_progress


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), target=st.integers(1, 12))
def test_rl_planning_never_lengthens_a_round_when_time_alone_counts(seed, target):
    ctx = context(deadline_s=None)
    devices = draws(12, seed=seed)
    proposal = build("rl", ctx, w_progress=0.0, w_bytes=0.0, w_failure=0.0, plan=0)
    planner = build("rl", ctx, w_progress=0.0, w_bytes=0.0, w_failure=0.0)
    state = RoundState(round=1, sim_time_s=0.0, target=target)
    prices = ctx.oracle.price(devices, ctx.space)
    n = np.arange(len(devices))

    def duration(configs) -> float:  # every device present, as the planner assumes
        k = [ctx.space.index(c) for c in configs]
        present = np.ones(len(devices), dtype=bool)
        return settle_round(finish_s=prices.total_s[n, k], available=present, fits=prices.fits[n, k],
                            dropped=~present, target=target, deadline_s=None).duration_s

    assert duration(planner.assign(devices, state)) <= duration(proposal.assign(devices, state))


def test_rl_planning_sweeps_must_not_be_negative():
    with pytest.raises(ConfigError, match="params.plan: must be >= 0"):
        build("rl", context(), plan=-1)


def test_rl_critic_fit_is_ridge_regression_shrunk_towards_the_prior():
    """Golden values: x = [0, 1, 2, 3], y = 2x + 1, ridge 1 on centred features (sum of squares 5): the slope
    moves from the prior p towards 2 by 5 / (5 + 1), the intercept keeps the line through the means."""
    x, y = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([1.0, 3.0, 5.0, 7.0])
    assert fit(x, y, prior=np.zeros(1), ridge=1.0) == pytest.approx([10 / 6, 4.0 - 1.5 * 10 / 6])
    assert fit(x, y, prior=np.array([2.0]), ridge=1.0) == pytest.approx([2.0, 1.0])  # a right prior stays
    assert fit(x, y, prior=np.array([-1.0]), ridge=1e-12) == pytest.approx([2.0, 1.0])  # no ridge: least squares


def test_rl_refuses_a_pickled_checkpoint_and_a_crafted_one_runs_no_code(tmp_path):
    """A .pt file is a pickle, which can run code as it loads: refused unopened. A .safetensors file holds tensors
    and JSON; one crafted to hold a pickle payload instead is refused with one line, and nothing runs."""
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match="an rl checkpoint is a .safetensors file"):
        build("rl", context(), checkpoint=str(tmp_path / "evil.pt"))
    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match="not a raysim checkpoint"):
        build("rl", context(), checkpoint=str(tmp_path / "evil.safetensors"))
    assert not marker.exists()
