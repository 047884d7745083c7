"""Device budgets (memory, compute time, upload per round) and the budget_fit policy (CAFF, Pfeiffer et al. 2024)."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysim.config import MethodsConfig, load_experiment
from raysim.emulation.clock import OVER_BUDGET, settle_round
from raysim.emulation.costmodel import Measurement, budget_limits, device_costs
from raysim.emulation.profiles import load_population
from raysim.errors import ConfigError
from raysim.methods import full_config, method_space
from raysim.policies import CostOracle, PolicyContext, PolicySpec, build_policy, read_policy
from raysim.types import Budgets, DeviceConfig, DeviceDraws, RoundState

from conftest import TINY

MiB = 2**20
CLASS = """\
kind: device_class
name: {name}
description: a board with fixed numbers
train_gflops:  {{dist: fixed, value: {gflops}, tag: assumption, source: test}}
memory_gib:    {{dist: fixed, value: 4, tag: assumption, source: test}}
uplink_mbps:   {{dist: fixed, value: 8, tag: assumption, source: test}}
downlink_mbps: {{dist: fixed, value: 16, tag: assumption, source: test}}
rtt_ms:        {{dist: fixed, value: 0, tag: assumption, source: test}}
dropout:       {{dist: fixed, value: 0, tag: assumption, source: test}}
availability:  {{kind: constant, p: 1.0, tag: assumption, source: test}}
"""


def fixed(value) -> str:
    return f"{{dist: fixed, value: {value}, tag: assumption, source: test}}"


def write_profiles(root, *, class_budgets: str = "", population_budgets: str = "") -> str:
    """Two golden classes (slow: 1 GFLOP/s, fast: 4 GFLOP/s) in equal shares; returns the population's path."""
    (root / "classes").mkdir(parents=True, exist_ok=True)
    (root / "populations").mkdir(exist_ok=True)
    (root / "classes" / "slow.yaml").write_text(CLASS.format(name="slow", gflops=1) + class_budgets)
    (root / "classes" / "fast.yaml").write_text(CLASS.format(name="fast", gflops=4))
    path = root / "populations" / "golden.yaml"
    path.write_text("kind: population\nname: golden\ndescription: two golden classes\nsize: 1000\n"
                    "clock_start_h: 0\nclasses: {slow: 0.5, fast: 0.5}\n" + population_budgets)
    return str(path)


# ---- profiles ------------------------------------------------------------------------------------------------

def test_a_device_keeps_the_tightest_budget_its_class_and_population_state(tmp_path):
    path = write_profiles(tmp_path, class_budgets=f"budgets:\n  memory_mib: {fixed(100)}\n  compute_s: {fixed(9)}\n",
                          population_budgets=textwrap.dedent(f"""\
                              budgets:
                                all: {{compute_s: {fixed(5)}, upload_fraction: {fixed(0.25)}}}
                                slow: {{memory_mib: {fixed(200)}}}
                                fast: {{memory_fraction: {fixed(0.5)}}}
                          """))
    draws = load_population(path).draw(np.arange(40), seed=3)
    slow = draws.device_class == "slow"
    assert 0 < slow.sum() < 40
    b = draws.budgets
    assert np.all(b.memory_bytes[slow] == 100 * MiB) and np.all(np.isinf(b.memory_bytes[~slow]))
    assert np.all(b.compute_s == 5.0)  # the population's 5 s binds the slow class's 9 s
    assert np.all(b.upload_fraction == 0.25) and np.all(np.isinf(b.upload_bytes))
    assert np.all(np.isinf(b.memory_fraction[slow])) and np.all(b.memory_fraction[~slow] == 0.5)
    assert np.all(np.isinf(b.compute_fraction))


def test_a_device_budget_depends_only_on_the_seed_and_its_id(tmp_path):
    spread = "{dist: lognormal, median: 2, sigma: 0.6, tag: assumption, source: test}"
    path = write_profiles(tmp_path, class_budgets=f"budgets:\n  compute_s: {spread}\n",
                          population_budgets=f"budgets:\n  all: {{upload_mib: {spread}}}\n")
    population = load_population(path)
    together = population.draw(np.arange(30), seed=5).budgets
    for i in (0, 7, 29):
        alone = population.draw(np.array([i]), seed=5).budgets
        assert alone.compute_s[0] == together.compute_s[i] and alone.upload_bytes[0] == together.upload_bytes[i]
    assert len(set(together.upload_bytes)) == 30  # a draw per device, not one for all


def test_a_population_without_budgets_draws_none():
    assert load_population("iot-edge").draw(np.arange(5), seed=0).budgets is None


@pytest.mark.parametrize("class_budgets, population_budgets, field, message", [
    (f"budgets:\n  memory_mib: {fixed(-1)}\n", "", "budgets.memory_mib.value", "must be > 0 (got -1)"),
    (f"budgets:\n  memory_fraction: {fixed(1.5)}\n", "", "budgets.memory_fraction.value",
     "must be a fraction in (0, 1] (got 1.5)"),
    (f"budgets:\n  ram_mib: {fixed(1)}\n", "", "budgets.ram_mib", "unknown key (expected one of: memory_mib"),
    ("budgets: {}\n", "", "budgets", "needs at least one of: memory_mib"),
    ("", f"budgets:\n  medium: {{compute_s: {fixed(1)}}}\n", "budgets.medium",
     "unknown key (expected one of: all, slow, fast)"),
    ("", f"budgets:\n  all: {{upload_mib: {fixed('.nan')}}}\n", "budgets.all.upload_mib.value", "must be > 0"),
    ("", "budgets:\n  all: {compute_s: 3}\n", "budgets.all.compute_s", "expected a mapping"),
])
def test_a_bad_budget_is_one_error_naming_the_file_and_key(tmp_path, class_budgets, population_budgets, field,
                                                           message):
    path = write_profiles(tmp_path, class_budgets=class_budgets, population_budgets=population_budgets)
    with pytest.raises(ConfigError) as err:
        load_population(path)
    assert err.value.field == field and message in err.value.message
    assert err.value.file.endswith("slow.yaml" if class_budgets else "golden.yaml")
    assert "\n" not in str(err.value)


def test_every_shipped_budget_population_loads():
    for name in ("phones-memory-budget", "phones-low-memory-budgets", "phones-compute-budget",
                 "phones-upload-budget"):
        assert load_population(name).draw(np.arange(10), seed=0).budgets is not None


# ---- limits and the round rule --------------------------------------------------------------------------------

def device_draws(n: int, *, gflops: float = 1.0, **budgets) -> DeviceDraws:
    stated = {k: np.full(n, math.inf) for k in ("memory_bytes", "memory_fraction", "compute_s", "compute_fraction",
                                                "upload_bytes", "upload_fraction")}
    stated |= {k: np.asarray(v, dtype=np.float64) for k, v in budgets.items()}
    return DeviceDraws(device_id=np.arange(n), device_class=np.array(["x"] * n, dtype=object),
                       train_flops_per_s=np.full(n, gflops * 1e9), memory_bytes=np.full(n, 4e9),
                       uplink_bps=np.full(n, 8e6), downlink_bps=np.full(n, 16e6), rtt_s=np.zeros(n),
                       dropout_prob=np.zeros(n), budgets=Budgets(**stated))


FULL = Measurement(flops_per_step=1e9, activation_bytes=60 * MiB, param_bytes=4 * MiB, trainable_params=MiB // 4,
                   bytes_down=MiB, bytes_up=MiB)  # peak: 4 + 0.25 * 12 + 60 = 67 MiB


def test_fractions_are_of_what_full_fine_tuning_costs_each_device():
    draws = device_draws(3, memory_fraction=[0.5, math.inf, 0.25], compute_s=[math.inf, 2.0, 10.0],
                         compute_fraction=[0.5, math.inf, math.inf], upload_fraction=[math.inf, 0.25, math.inf],
                         upload_bytes=[MiB, math.inf, math.inf])
    asked = []
    limits = budget_limits(draws, lambda: asked.append(1) or FULL, local_steps=4)
    assert asked == [1]
    assert FULL.peak_memory_bytes == 67 * MiB
    np.testing.assert_array_equal(limits.memory_bytes, [33.5 * MiB, math.inf, 16.75 * MiB])
    np.testing.assert_array_equal(limits.compute_s, [2.0, 2.0, 10.0])  # 0.5 x 4 steps x 1 GFLOP at 1 GFLOP/s
    np.testing.assert_array_equal(limits.upload_bytes, [MiB, MiB / 4, math.inf])


def test_absolute_budgets_never_measure_full_fine_tuning():
    draws = device_draws(2, memory_bytes=[MiB, 2 * MiB])
    limits = budget_limits(draws, lambda: pytest.fail("full fine-tuning measured"), local_steps=4)
    np.testing.assert_array_equal(limits.memory_bytes, [MiB, 2 * MiB])
    unbudgeted = DeviceDraws(**{k: v for k, v in vars(draws).items() if k != "budgets"})
    assert budget_limits(unbudgeted, lambda: FULL, local_steps=4) is None


def test_an_available_device_over_a_budget_takes_no_part_and_costs_nothing():
    small = Measurement(flops_per_step=1e9, activation_bytes=10 * MiB, param_bytes=4 * MiB, trainable_params=1000,
                        bytes_down=MiB, bytes_up=10_000)
    draws = device_draws(4, memory_bytes=[20 * MiB, 10 * MiB, 20 * MiB, 20 * MiB], compute_s=[5, 5, 3, 5],
                         upload_bytes=[MiB, MiB, MiB, 5_000])
    costs = device_costs(draws, [small] * 4, local_steps=4)  # 4 s of compute, ~14 MiB, 10 kB up
    limits = budget_limits(draws, lambda: FULL, local_steps=4)
    within = limits.allow(costs)
    np.testing.assert_array_equal(within, [True, False, False, False])  # memory, compute, upload over in turn
    outcome = settle_round(finish_s=costs.total_s, available=np.array([True, True, True, False]),
                           fits=costs.fits(draws), dropped=np.zeros(4, dtype=bool), target=4, deadline_s=None,
                           within=within)
    assert list(outcome.status) == ["ok", OVER_BUDGET, OVER_BUDGET, "unavailable"]
    assert outcome.duration_s == costs.total_s[0]


# ---- the budget_fit policy -------------------------------------------------------------------------------------

SPACE = MethodsConfig(lora_rank=[8, 2, 0], trainable_layers=[None, 1, 2, 3])


def golden_measure(config: DeviceConfig) -> Measurement:
    """A 4-block model: each block the gradient reaches (the lowest trained one and all above) keeps 10 MiB of
    activations and costs 1 GFLOP more per step, LoRA or not; a full block has 1000 weights, a rank-r block 10 r;
    the head and embeddings keep 20 MiB and cost 2 GFLOP."""
    blocks = 4 if config.trainable_layers is None else config.trainable_layers  # the gradient reaches these
    trainable = (1000 if config.lora_rank == 0 else 10 * config.lora_rank) * blocks
    return Measurement(flops_per_step=(2 + blocks) * 1e9, activation_bytes=(20 + 10 * blocks) * MiB,
                       param_bytes=0, trainable_params=trainable, bytes_down=4 * trainable, bytes_up=4 * trainable)


def golden_context(deadline_s=None) -> PolicyContext:
    oracle = CostOracle(measure=golden_measure, local_steps=1, deadline_s=deadline_s)
    return PolicyContext(methods=SPACE, space=method_space(SPACE), oracle=oracle, seed=0, rounds=3)


def budget_fit(family=None, *, ctx=None):
    params = {} if family is None else {"family": family}
    return build_policy(PolicySpec(name="budget_fit", path="budget_fit.yaml", params=params),
                        context=ctx or golden_context())


@pytest.mark.parametrize("family, memory_mib, expected", [
    # CAFF's family: the most trainable weights that fit
    (None, [1000, 65, 45, 35, 25], [(0, None), (0, None), (0, 2), (0, 1), None]),
    # LoRA on every block keeps every block's activations: 60 MiB or nothing
    ([{"trainable_layers": None, "lora_rank": [8, 2]}], [1000, 65, 45, 35, 25], [(8, None), (8, None), None, None,
                                                                                 None]),
    # full top blocks
    ([{"lora_rank": 0}], [1000, 65, 45, 35, 25], [(0, None), (0, None), (0, 2), (0, 1), None]),
    # LoRA of rank 8 on the top k blocks
    ([{"lora_rank": 8, "trainable_layers": [1, 2, 3]}], [1000, 65, 45, 35, 25], [(8, 3), (8, 3), (8, 2), (8, 1),
                                                                                 None]),
])
def test_budget_fit_gives_each_device_the_most_capacity_within_its_memory_budget(family, memory_mib, expected):
    ctx = golden_context()
    draws = device_draws(5, memory_bytes=np.array(memory_mib) * MiB)
    configs = budget_fit(family, ctx=ctx).assign(draws, RoundState(round=1, sim_time_s=0.0))
    limits = ctx.oracle.limits(draws)
    costs = device_costs(draws, [golden_measure(c) for c in configs], local_steps=1)
    within = limits.allow(costs)
    for i, want in enumerate(expected):
        if want is None:  # nothing fits: left out, given the config with the least memory, which is over budget
            assert not within[i]
        else:
            assert (configs[i].lora_rank, configs[i].trainable_layers) == want and within[i]


def test_full_fine_tuning_as_the_whole_space_picks_it_when_it_fits():
    (config,) = budget_fit().assign(device_draws(1), RoundState(round=1, sim_time_s=0.0))
    assert config == full_config()


def test_budget_fit_fits_compute_and_upload_budgets_per_device():
    # compute: 1 GFLOP/s, one step; (2 + blocks) s. upload: 4 bytes per trainable weight
    draws = device_draws(4, compute_s=[4.5, 3.0, math.inf, math.inf], upload_bytes=[math.inf, math.inf, 8000, 100])
    configs = budget_fit().assign(draws, RoundState(round=1, sim_time_s=0.0))
    got = [(c.lora_rank, c.trainable_layers) for c in configs]
    assert got[0] == (0, 2) and got[1] == (0, 1)  # 2 + 2 blocks = 4 s; 2 + 1 = 3 s
    assert got[2] == (0, 2)  # 2000 weights x 4 bytes
    assert got[3] == (2, 1)  # only LoRA fits in 100 bytes: rank 2 on one block (80 bytes)


def test_fraction_budgets_price_against_full_fine_tuning():
    # full fine-tuning: 4 blocks, 60 MiB of activations; 0.5 of its peak = 30 MiB: one full block (30 MiB)
    draws = device_draws(1, memory_fraction=[0.5])
    (config,) = budget_fit([{"lora_rank": 0}]).assign(draws, RoundState(round=1, sim_time_s=0.0))
    assert (config.lora_rank, config.trainable_layers) == (0, 1)


def test_budget_fit_is_deterministic_and_independent_of_the_cohort():
    draws = device_draws(6, memory_bytes=np.array([1000, 65, 45, 35, 25, 50]) * MiB)
    state = RoundState(round=2, sim_time_s=0.0)
    whole = budget_fit().assign(draws, state)
    assert budget_fit().assign(draws, state) == whole
    assert budget_fit().assign(draws.select(np.array([5, 1, 3])), state) == [whole[5], whole[1], whole[3]]


@pytest.mark.parametrize("family, field, message", [
    ([{"rank": 0}], "params.family[0].rank", "unknown config field"),
    ([{"lora_rank": 64}], "params.family[0]", "matches no config of the experiment's method space"),
    ([], "params.family", "expected a non-empty list"),
    (["lora"], "params.family[0]", "expected a mapping"),
])
def test_a_bad_family_is_one_error_naming_the_policy_file_and_key(family, field, message):
    with pytest.raises(ConfigError) as err:
        budget_fit(family)
    assert err.value.field == field and message in err.value.message and err.value.file == "budget_fit.yaml"


def test_the_shipped_budget_fit_policies_read():
    for name in ("budget_fit", "budget_fit-lora-all", "budget_fit-layers", "budget_fit-lora-top"):
        assert read_policy(name).name == "budget_fit"


# ---- a run ------------------------------------------------------------------------------------------------------

def test_a_run_leaves_out_and_counts_devices_over_budget(ray_session, tmp_path):
    from raysim.engine.run import run_experiment

    path = write_profiles(tmp_path / "profiles", class_budgets=f"budgets:\n  memory_fraction: {fixed(0.75)}\n",
                          population_budgets=f"budgets:\n  fast:\n    upload_mib: {fixed(0.001)}\n")
    cfg = load_experiment(None, [*TINY, "model.n_layer=2", f"population={path}", "policy=budget_fit",
                                 "methods.lora_rank=[4,0]", "methods.trainable_layers=[null,1]",
                                 "methods.lora_target_modules=[c_attn,c_proj,c_fc]", f"output_dir={tmp_path / 'run'}"])
    run_dir = run_experiment(cfg)
    devices = pq.read_table(run_dir / "devices.parquet").to_pandas()
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    took_part = devices[devices.status != "over_budget"]
    assert (took_part.peak_memory_bytes <= took_part.memory_budget_bytes).all()
    assert (took_part.bytes_up <= took_part.upload_budget_bytes).all()
    slow = devices[devices.device_class == "slow"]
    assert np.isfinite(slow.memory_budget_bytes).all() and np.isinf(slow.upload_budget_bytes).all()
    fast = devices[devices.device_class == "fast"]
    assert (fast.upload_budget_bytes == 0.001 * MiB).all() and np.isinf(fast.memory_budget_bytes).all()
    assert (fast.status == "over_budget").all()  # 1 kB: not even rank-4 LoRA on one block (8 kB) fits
    # at 0.75 of full fine-tuning's memory the slow boards cannot hold both blocks' weights: one top block
    assert set(zip(slow.lora_rank, slow.trainable_layers)) <= {(0, 1)}
    left_out = devices[devices.status == "over_budget"]
    assert len(left_out) == len(fast) > 0
    assert int(rounds.n_over_budget.sum()) == len(left_out)
    assert (left_out.bytes_down == 0).all() and (left_out.flops == 0).all() and (left_out.compute_s == 0).all()
