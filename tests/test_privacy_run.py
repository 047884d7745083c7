"""DP runs end to end: ε every round from the same accountant, a budget that stops the run, local DP-SGD."""

import json
import math

import pyarrow.parquet as pq
import pytest

from raysim.engine.run import run_experiment
from raysim.privacy import accounting, local

from conftest import TINY, assert_same_results

BUDGET = accounting.epsilon(noise_multiplier=1.0, sample_rate=0.006, rounds=2, delta=1e-6)
# Three rounds asked for; the budget allows two.
DP = [*TINY, "rounds=3", "cohort.sampling=poisson", "cohort.size=6", "privacy.clip_norm=0.02",
      "privacy.noise_multiplier=1.0", f"privacy.max_epsilon={BUDGET}", "ray.tokens_per_pass=128"]


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    from raysim.config import load_experiment

    def run(name, *overrides):
        out = tmp_path_factory.mktemp(name) / "run"
        return run_experiment(load_experiment(None, [*DP, f"output_dir={out}", *overrides]))

    return {"two": run("two", "ray.num_actors=2"), "one": run("one", "ray.num_actors=1"),
            "local": run("local", "ray.num_actors=2", "rounds=1", "privacy.local.enabled=true")}


def _rounds(run_dir):
    return pq.read_table(run_dir / "rounds.parquet").to_pydict()


def test_epsilon_column_is_the_accountants_after_each_round(runs):
    rounds = _rounds(runs["two"])
    expected = [accounting.epsilon(noise_multiplier=1.0, sample_rate=0.006, rounds=t, delta=1e-6) for t in (1, 2)]
    assert rounds["epsilon"] == expected and rounds["delta"] == [1e-6] * 2
    assert rounds["noise_std"] == [0.02] * 2 and rounds["clip_norm"] == [0.02] * 2
    assert all(0 < s < math.inf for s in rounds["signal_to_noise"])


def test_one_and_two_actors_give_the_same_private_run(runs):
    assert_same_results(runs["two"], runs["one"])


def test_max_epsilon_stops_the_run_at_the_last_round_within_budget(runs):
    rounds = _rounds(runs["two"])
    assert rounds["round"] == [1, 2] and rounds["epsilon"][-1] <= BUDGET
    assert math.isfinite(rounds["eval_loss"][-1])  # the last round run is evaluated
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["status"] == "privacy_budget_spent" and summary["rounds_completed"] == 2
    assert summary["epsilon"] == rounds["epsilon"][-1] and summary["privacy"]["rounds_within_budget"] == 2


def test_summary_reports_epsilon_and_the_plan(runs):
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["epsilon"] == _rounds(runs["two"])["epsilon"][-1]
    assert summary["privacy"]["noise_multiplier"] == 1.0 and summary["privacy"]["sample_rate"] == 0.006


def test_device_rows_report_update_norms_and_local_epsilon(runs, tmp_path):
    from raysim.config import load_experiment

    devices = pq.read_table(runs["local"] / "devices.parquet").to_pydict()
    ok = [i for i, s in enumerate(devices["status"]) if s == "ok"]
    assert ok
    cfg = load_experiment(None, [*DP, "privacy.local.enabled=true"])
    for i in ok:
        expected = local.device_epsilon(num_examples=devices["num_examples"][i], cfg=cfg.privacy.local, train=cfg.train)
        assert devices["local_epsilon"][i] == expected and math.isfinite(expected)
        assert devices["update_norm"][i] > 0 and math.isfinite(devices["train_loss"][i])
    assert all(math.isnan(devices["local_epsilon"][i]) for i in range(len(ok)) if i not in ok)
    plain = pq.read_table(runs["two"] / "devices.parquet").to_pydict()
    assert all(math.isnan(e) for e in plain["local_epsilon"])


def test_private_runs_send_nothing_off_the_support(runs):
    assert _rounds(runs["two"])["off_support_norm"] == [0.0, 0.0]
    assert _rounds(runs["local"])["off_support_norm"] == [0.0]  # local DP-SGD under central DP


def test_a_device_update_off_the_support_fails_the_run_after_recording_its_round(ray_session, tmp_path):
    """A policy that assigns a config outside the method space (all blocks, where the space trains only the top
    one) makes devices update block 0, which central DP does not noise: the server releases nothing there,
    records the round with the leak's norm, and the run ends failed with the cause."""
    from raysim.config import load_experiment
    from raysim.errors import describe_error
    from raysim.policies import Policy
    from raysim.types import DeviceConfig

    class OutsideTheSpace(Policy):
        def assign(self, devices, state):
            return [DeviceConfig(lora_rank=4)] * len(devices)

    cfg = load_experiment(None, [*DP, "model.n_layer=2", "methods.trainable_layers=[1]", "privacy.max_epsilon=null",
                                 f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError) as failure:
        run_experiment(cfg, make_policy=lambda context: OutsideTheSpace())
    rounds = _rounds(tmp_path / "run")
    assert rounds["round"] == [1] and rounds["off_support_norm"][0] > 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "outside the coordinates central DP noises" in summary["cause"]
    assert "outside the coordinates central DP noises" in describe_error(failure.value)
    assert not (tmp_path / "run" / "final_state.pt").exists()
