"""Split fine-tuning (raysim.split, methods.split): exact emulation, costs, and the label-leakage attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raysim.config import load_experiment
from raysim.errors import ConfigError
from raysim.split import leakage

from conftest import TINY, make_worker, new_state, train_unit

# A labelled task on the shipped corpus: each docstring or comment one sequence, classified by kind.
CLASSIFY = [*TINY, "data.source=python-docs", "data.task=classification", "data.labels=[comment,docstring]",
            "model.n_layer=3", "model.vocab_size=512", "data.eval_users=4", "data.max_examples=16",
            "eval.max_examples=32", "train.local_steps=3", "train.batch_size=4", "methods.lora_rank=[4]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def worker(cache):
    return make_worker(load_experiment(None, [*CLASSIFY, "methods.split=[null, 0, 2]", f"pretrain.cache_dir={cache}"]))


@pytest.fixture(scope="module")
def p3eft_worker(cache):
    return make_worker(load_experiment(None, [*CLASSIFY, "methods.split=[1]", "split.mechanism=p3eft",
                                              f"pretrain.cache_dir={cache}"]))


def _configs(worker, *cuts):
    from raysim.methods import default_config

    base = default_config(worker.cfg.methods)
    return [type(base)(**{**base.__dict__, "split": c}) for c in cuts]


def test_split_update_equals_the_unsplit_one(worker):
    """Detach at the cut and backward with the received gradient: the same gradients, so the same update.

    Both runs execute the same float32 kernels on the same shapes in the same order, so they agree to the
    rounding of a reduction that might be regrouped: a few ulps of the largest entry. We allow 16 float32
    epsilons of each tensor's largest magnitude (float64 sums of float32 updates add nothing comparable)."""
    state = worker.initial_state()
    whole, split0, split2 = _configs(worker, None, 0, 2)
    results = {}
    for name, config in (("whole", whole), ("cut0", split0), ("cut2", split2)):
        records, partial = train_unit(worker, state, [5], [config], round=1)
        results[name] = (records, new_state(state, partial))
    eps = torch.finfo(torch.float32).eps
    for name in ("cut0", "cut2"):
        records, after = results[name]
        assert records["train_loss"][0] == pytest.approx(results["whole"][0]["train_loss"][0], rel=16 * eps)
        for key, value in results["whole"][1].items():
            tol = 16 * eps * float(value.abs().max())
            assert torch.allclose(after[key], value, rtol=0, atol=tol), (name, key)
        assert results["whole"][1].keys() == after.keys()
    moved = results["whole"][1]["classifier.weight"] - state["classifier.weight"].double()
    assert float(moved.abs().max()) > 0  # the head trained


def test_what_crossed_is_recorded_per_example(worker):
    state = worker.initial_state()
    (config,) = _configs(worker, 2)
    records, _ = train_unit(worker, state, [7], [config], round=1)
    crossing = records["crossing"][0]
    steps, batch, width = worker.cfg.train.local_steps, worker.cfg.train.batch_size, worker.cfg.model.n_embd
    assert crossing.activations.shape == crossing.gradients.shape == (1, steps * batch, width)  # one adapter set
    assert set(np.unique(crossing.labels)) <= {0, 1}
    assert np.abs(crossing.gradients).sum() > 0
    (whole,) = _configs(worker, None)
    assert train_unit(worker, state, [7], [whole], round=1)[0]["crossing"][0] is None


def test_the_utility_gradient_of_a_classifier_is_its_held_out_cross_entropys(worker):
    """The rl policy's feedback on a labelled task: the gradient of the held-out cross-entropy, head included,
    matches a finite difference along the head."""
    state = {k: v.double().float() for k, v in worker.initial_state().items()}
    grads, loss = worker.held_out.loss_gradient(state)
    assert math.isfinite(loss) and "classifier.weight" in grads
    direction = torch.randn(state["classifier.weight"].shape, generator=torch.Generator().manual_seed(0))
    h = 1e-2

    def at(t):
        shifted = {**state, "classifier.weight": state["classifier.weight"] + t * direction}
        return worker.held_out.loss_gradient(shifted)[1]

    slope = (at(h) - at(-h)) / (2 * h)
    # a float32 forward: the central difference carries ~eps32 * loss / h of rounding and O(h²) curvature
    assert slope == pytest.approx(float((grads["classifier.weight"] * direction).sum()), rel=0.02, abs=1e-3)


def test_split_costs_are_measured_on_the_real_tensors(worker):
    """The device is charged its own part only; the wire carries the real tensors each step."""
    cfg = worker.cfg
    whole, cut0, cut2 = (worker.measure(c) for c in _configs(worker, None, 0, 2))
    assert whole.server_flops_per_step == 0 and whole.round_trips == 0 and whole.wire_bytes_up == 0
    for m in (cut0, cut2):
        # the step's FLOPs are the same computation, split between device and server
        assert m.flops_per_step + m.server_flops_per_step == pytest.approx(whole.flops_per_step, rel=1e-9)
        assert m.round_trips == 2
        assert m.peak_memory_bytes < whole.peak_memory_bytes
        assert m.bytes_up < whole.bytes_up  # the server's adapters never travel
    assert cut0.flops_per_step < cut2.flops_per_step < whole.flops_per_step
    b, t, d = cfg.train.batch_size, cfg.data.seq_len, cfg.model.n_embd
    cut_activations, output = 4 * b * t * d, 4 * b * d  # float32: (batch, seq, d) at the cut, (batch, d) pooled
    assert cut2.wire_bytes_up == cut_activations + output
    assert cut2.wire_bytes_down == output + cut_activations  # the device trains blocks 0, 1: the cut's gradient
    assert cut0.wire_bytes_down == output  # nothing trains below cut 0 (the embedding is frozen)


def test_wire_time_on_the_round_clock():
    from raysim.emulation.costmodel import Measurement, device_costs
    from raysim.types import DeviceDraws

    n = 2
    draws = DeviceDraws(device_id=np.arange(n), device_class=np.array(["a", "a"]),
                        train_flops_per_s=np.full(n, 1e9), memory_bytes=np.full(n, 1 << 30),
                        uplink_bps=np.full(n, 1e6), downlink_bps=np.full(n, 4e6), rtt_s=np.full(n, 0.05),
                        dropout_prob=np.zeros(n))
    split = Measurement(flops_per_step=1e9, activation_bytes=0, param_bytes=0, trainable_params=0, bytes_down=0,
                        bytes_up=0, server_flops_per_step=2e12, wire_bytes_up=125_000, wire_bytes_down=500_000,
                        round_trips=2)
    costs = device_costs(draws, [split, split], local_steps=3, server_flops_per_s=1e12)
    # each step: 2 round trips, 1 Mbit up at 1 Mbit/s, 4 Mbit down at 4 Mbit/s
    assert costs.wire_s == pytest.approx([3 * (2 * 0.05 + 1.0 + 1.0)] * 2)
    assert costs.server_compute_s == pytest.approx([3 * 2e12 * 2 / 1e12] * 2)  # two devices share the server
    assert costs.total_s == pytest.approx(costs.download_s + costs.compute_s + costs.upload_s + costs.wire_s
                                          + costs.server_compute_s)


@pytest.mark.parametrize("override, key", [
    ("methods.split=[5]", "methods.split[0]"),
    ("methods.split=[-1]", "methods.split[0]"),
    ("data.labels=[comment]", "data.labels"),
    ("data.labels=[comment, comment]", "data.labels"),
    ("data.task=regression", "data.task"),
    ("split.mechanism=p4eft", "split.mechanism"),
    ("split.dcor_weight=-1", "split.dcor_weight"),
    ("split.adapter_sets=1", "split.adapter_sets"),
    ("split.coefficient_std=-0.5", "split.coefficient_std"),
    ("split.adversary_weight=-1", "split.adversary_weight"),
    ("server.train_gflops=0", "server.train_gflops"),
])
def test_bad_split_values_get_one_line(override, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [*CLASSIFY, override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_split_needs_a_labelled_task():
    with pytest.raises(ConfigError, match="data.task: classification"):
        load_experiment(None, [*TINY, "methods.split=[0]"])
    with pytest.raises(ConfigError, match="privacy.local.enabled"):
        load_experiment(None, [*CLASSIFY, "methods.split=[0]", "privacy.local.enabled=true"])


# -- the mechanisms -------------------------------------------------------------------------------------------

def test_p3eft_coefficients_sum_to_one_and_are_antisymmetric_around_1_over_n():
    from raysim.split.mechanisms import p3eft_coefficients

    c = p3eft_coefficients(sets=3, width=64, std=1.0, seed=0)
    assert c.shape == (3, 64)
    # drawn in float64, stored in float32: each entry within half an ulp of its value, so the column sums stay
    # within 3 entries' rounding of 1
    tol = 3 * torch.finfo(torch.float32).eps * float(c.abs().max())
    assert torch.allclose(c.double().sum(0), torch.ones(64, dtype=torch.float64), atol=tol)
    two = p3eft_coefficients(sets=2, width=64, std=1.0, seed=0).double()
    assert torch.allclose(two[0] - 0.5, -(two[1] - 0.5), atol=tol)
    assert float((two[0] - 0.5).std()) == pytest.approx(1.0, abs=0.3)  # N(0, 1) per dimension
    assert torch.equal(p3eft_coefficients(sets=2, width=64, std=1.0, seed=0),
                       p3eft_coefficients(sets=2, width=64, std=1.0, seed=0))


def test_log_dcor_is_zero_for_a_copy_of_the_labels_and_small_for_noise():
    from raysim.split.mechanisms import log_dcor2

    y = torch.arange(64) % 2
    assert float(log_dcor2(torch.nn.functional.one_hot(y, 2).double() * 3.0, y, 2)) == pytest.approx(0.0, abs=1e-9)
    noise = torch.randn(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(log_dcor2(noise, y, 2)) < -2.0  # dCor² below e⁻²


def test_p3eft_trains_every_adapter_set_and_maps_each_to_its_entries(p3eft_worker):
    worker = p3eft_worker
    state = worker.initial_state()
    sets = [k for k in state if k.startswith("set1/")]
    assert sets and all(k.startswith("set1/transformer.h.") and int(k.split(".")[2]) >= 1 for k in sets)
    assert not any(k.startswith("set1/transformer.h.0.") or k == "set1/classifier.weight" for k in state)
    records, partial = train_unit(worker, state, [3], [_configs(worker, 1)[0]], round=1)
    after = new_state(state, partial)
    for key in sets:
        base = key.removeprefix("set1/")
        assert not torch.equal(after[key], state[key].double()), key  # set 1 trained
        assert not torch.allclose(after[key], after[base]), key  # differently from set 0: its own coefficients
    crossing = records["crossing"][0]
    assert crossing.activations.shape[0] == crossing.gradients.shape[0] == 2  # both sets' outputs crossed
    m = worker.measure(_configs(worker, 1)[0])
    b, t, d = worker.cfg.train.batch_size, worker.cfg.data.seq_len, worker.cfg.model.n_embd
    assert m.wire_bytes_up == 4 * (b * t * d + 2 * b * d)  # the cut's activations once, each set's gradient
    assert m.wire_bytes_down == 4 * (2 * b * d + b * t * d)  # each set's output, the cut's summed gradient
    # central DP's support covers every set's entries where set 0's are
    support = worker.space.support([_configs(worker, 1)[0]], state, pruning="heterofl", round=1)
    for key in sets:
        assert torch.equal(support[key], support[key.removeprefix("set1/")])


def test_p3eft_needs_one_cut():
    with pytest.raises(ConfigError, match="methods.split"):
        load_experiment(None, [*CLASSIFY, "methods.split=[null, 1]", "split.mechanism=p3eft"])
    with pytest.raises(ConfigError, match="split.mechanism"):
        load_experiment(None, [*CLASSIFY, "methods.split=[1]", "split.mechanism=secret"])


# -- the attacks: golden values on synthetic data --------------------------------------------------------------

def _separable(n: int = 400, d: int = 16, seed: int = 0):
    g = np.random.default_rng(seed)
    labels = g.integers(0, 2, n)
    x = g.normal(size=(n, d)) * 0.3
    x[:, 0] += np.where(labels == 1, 3.0, -3.0)  # one direction separates the labels, far beyond the noise
    x[:, 1] += np.where(labels == 1, 2.0, 0.0)  # and one the norm sees
    return x.astype(np.float32), labels


def test_attacks_find_separable_labels():
    x, y = _separable()
    out = leakage.attack(x, y, classes=2, seed=0, round=1, source="activations")
    assert out["kmeans"] > 0.99
    assert out["spectral"] > 0.99
    assert out["probe"] > 0.99
    assert out["norm"] > 0.9


def test_attacks_are_at_chance_on_independent_labels():
    g = np.random.default_rng(1)
    n = 2000
    x, y = g.normal(size=(n, 16)).astype(np.float32), g.integers(0, 2, n)
    out = leakage.attack(x, y, classes=2, seed=0, round=1, source="activations")
    # chance: 0.5, with a binomial standard error of sqrt(0.25 / n) ≈ 0.011; k-means and the two-sided AUCs
    # take a max of two symmetric outcomes, so they sit above 0.5 by about that much: allow 5 standard errors
    se = math.sqrt(0.25 / n)
    for name in leakage.ATTACKS:
        assert abs(out[name] - 0.5) < 5 * se, name


def test_auc_is_the_mann_whitney_statistic():
    assert leakage.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], dtype=bool)) == 0.75
    assert leakage.auc(np.array([1.0, 1.0]), np.array([0, 1], dtype=bool)) == 0.5  # ties count half
    assert leakage.two_sided_auc(np.array([3.0, 2.0, 1.0, 0.0]), np.array([0, 0, 1, 1])) == 1.0


def test_kmeans_scores_the_best_permutation_with_three_labels():
    g = np.random.default_rng(2)
    y = np.repeat([0, 1, 2], 50)
    centres = np.array([[5.0, 0], [0, 5.0], [-5.0, -5.0]])
    x = centres[y] + g.normal(size=(150, 2)) * 0.2
    assert leakage.kmeans(x, y, classes=3, generator=np.random.default_rng(0)) == 1.0
    assert math.isnan(leakage.spectral(x, y))  # binary attacks do not apply


def test_round_columns_take_the_best_attack_and_nan_without_split():
    from raysim.split.protocol import Crossing

    x, y = _separable()
    noise = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    cols = leakage.round_columns([None, Crossing(noise[None], x[None], y)], classes=2, seed=0, round=1)
    assert all(cols[f"leakage_{a}_gradients"] > 0.9 for a in leakage.ATTACKS)
    assert all(cols[f"leakage_{a}_activations"] < 0.6 for a in leakage.ATTACKS)
    assert cols["label_leakage"] == max(cols[f"leakage_{a}_{s}"] for a in leakage.ATTACKS for s in leakage.SOURCES)
    assert all(math.isnan(v) for v in leakage.round_columns([None], classes=2, seed=0, round=1).values())


# -- whole runs on Ray -----------------------------------------------------------------------------------------

def test_split_runs_under_central_dp_and_a_cost_policy_on_any_number_of_actors(ray_session, cache, tmp_path):
    """Central DP clips and noises split devices' updates (the server's half included) on the support, a cost
    policy prices split configs with their wire time and server share, and the run is the same on 1 or 2 actors."""
    import pyarrow.parquet as pq

    from raysim.engine.run import run_experiment

    from conftest import assert_same_results

    def run(name, *overrides):
        return run_experiment(load_experiment(None, [
            *CLASSIFY, "rounds=2", "methods.split=[1]", "split.mechanism=p3eft", "privacy.clip_norm=0.5",
            "cohort.sampling=poisson", "cohort.size=6", "ray.tokens_per_pass=128",
            "privacy.noise_multiplier=1.0", "policy=greedy_fit", "methods.lora_rank=[4, 2]",
            f"pretrain.cache_dir={cache}", f"output_dir={tmp_path / name}", *overrides]))

    one, two = run("one", "ray.num_actors=1"), run("two", "ray.num_actors=2")
    assert_same_results(one, two)
    rounds = pq.read_table(one / "rounds.parquet").to_pydict()
    assert all(0 < e < math.inf for e in rounds["epsilon"])
    assert all(0.5 <= v <= 1.0 for v in rounds["label_leakage"])
    assert all(v > 0 for v in rounds["wire_bytes_up"])
    devices = pq.read_table(one / "devices.parquet").to_pydict()
    ok = [i for i, s in enumerate(devices["status"]) if s == "ok"]
    assert all(devices["server_compute_s"][i] > 0 and devices["wire_s"][i] > 0 for i in ok)
    assert all(devices["finish_s"][i] >= devices["wire_s"][i] + devices["server_compute_s"][i] for i in ok)
    assert math.isfinite(rounds["eval_accuracy"][-1])
