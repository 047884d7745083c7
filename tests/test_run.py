"""End to end on the session's local Ray: files, contracts, determinism."""

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from raysim.engine.run import run_experiment

from conftest import assert_same_results

ROUND_COLUMNS = {"round", "sim_time_s", "wall_time_s", "train_loss", "eval_loss", "eval_accuracy", "epsilon",
                 "delta", "bytes_up", "bytes_down", "n_selected", "n_completed", "n_dropped", "n_oom",
                 "n_stragglers", "lora_truncation_error"}
DEVICE_COLUMNS = {"round", "device_id", "device_class", "lora_rank", "prune_ratio", "dropout_rate",
                  "trainable_layers", "bits", "status", "compute_s", "download_s", "upload_s", "bytes_up",
                  "bytes_down", "peak_memory_bytes", "num_examples", "train_loss"}

@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    from raysim.config import load_experiment

    from conftest import TINY

    def run(name, *overrides):
        out = tmp_path_factory.mktemp(name) / "run"
        return run_experiment(load_experiment(None, [*TINY, f"output_dir={out}", "cohort.deadline_s=0.12",
                                                     *overrides]))

    # Mixed configs, two devices per pass and four eval batches: several groups, units and shards to spread.
    spread = ["policy=random", "methods.lora_rank=[4,2]", "methods.bits=[32,8]", "ray.tokens_per_pass=128",
              "eval.batch_size=8", "ray.cpus_per_actor=0.5"]
    return {n: run(n, *spread, f"ray.num_actors={k}") for n, k in (("one", 1), ("two", 2), ("three", 3))}


def _rounds(run_dir):
    return pq.read_table(run_dir / "rounds.parquet").to_pydict()


def test_run_directory_holds_the_contract_files_and_columns(runs):
    d = runs["two"]
    assert {p.name for p in d.iterdir()} >= {"config.yaml", "rounds.parquet", "devices.parquet", "summary.json"}
    assert ROUND_COLUMNS <= set(pq.read_table(d / "rounds.parquet").schema.names)
    assert DEVICE_COLUMNS <= set(pq.read_table(d / "devices.parquet").schema.names)
    assert _rounds(d)["round"] == [1, 2, 3]


def test_lora_truncation_error_is_reported_every_round(runs):
    errors = _rounds(runs["two"])["lora_truncation_error"]
    assert len(errors) == 3 and all(0.0 <= e < 1.0 for e in errors)


def test_one_two_and_three_actors_write_byte_identical_results(runs):
    """Units of work come from the cohort and are summed in unit order, so the actor count changes no bit."""
    one = runs["one"]
    assert json.loads((runs["three"] / "summary.json").read_text())["num_actors"] == 3
    assert (one / "final_state.pt").exists()
    assert_same_results(one, runs["two"])
    assert_same_results(one, runs["three"])
    devices = pq.read_table(one / "devices.parquet").to_pydict()
    assert len(set(zip(devices["lora_rank"], devices["bits"]))) > 1  # there were configs to group


def test_round_totals_are_the_sums_of_device_rows(runs):
    rounds = _rounds(runs["two"])
    devices = pq.read_table(runs["two"] / "devices.parquet").to_pydict()
    for i, r in enumerate(rounds["round"]):
        rows = [j for j, x in enumerate(devices["round"]) if x == r]
        status = [devices["status"][j] for j in rows]
        assert rounds["n_selected"][i] == len(rows)
        assert rounds["n_completed"][i] == status.count("ok")
        assert rounds["n_stragglers"][i] == status.count("straggler")
        assert rounds["bytes_up"][i] == sum(devices["bytes_up"][j] for j in rows)
        losses = [devices["train_loss"][j] for j in rows if devices["status"][j] == "ok"]
        assert all(math.isfinite(x) for x in losses)


def test_virtual_clock_is_the_sum_of_round_durations(runs):
    rounds = _rounds(runs["two"])
    np.testing.assert_allclose(rounds["sim_time_s"], np.cumsum(rounds["round_duration_s"]))
    assert all(d <= 0.12 + 1e-12 for d in rounds["round_duration_s"])


def test_evaluation_runs_every_k_rounds_and_on_the_last(runs):
    ev = _rounds(runs["two"])["eval_loss"]
    assert math.isnan(ev[0]) and math.isfinite(ev[1]) and math.isfinite(ev[2])


def test_summary_reports_final_metrics_seed_and_versions(runs):
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["rounds"] == 3
    assert summary["final"]["eval_loss"] == _rounds(runs["two"])["eval_loss"][-1]
    assert summary["initial"]["eval_loss"] > 0 and summary["initial"]["eval_top3_accuracy"] >= summary["initial"][
        "eval_accuracy"]
    assert {"torch", "ray", "peft", "transformers"} <= set(summary["versions"])


def test_a_run_without_dp_reports_infinite_epsilon_and_no_noise(runs):
    rounds = _rounds(runs["two"])
    assert set(rounds["epsilon"]) == {math.inf} and set(rounds["delta"]) == {0.0}
    assert set(rounds["noise_std"]) == {0.0} and set(rounds["signal_to_noise"]) == {math.inf}
    assert all(math.isnan(c) for c in rounds["clip_norm"])
    assert all(math.isnan(n) for n in rounds["off_support_norm"])  # no noised coordinates, nothing off them


def test_a_run_that_fails_keeps_its_finished_rounds_readable_and_says_why(ray_session, tmp_path):
    from raysim.config import load_experiment
    from raysim.policies.base import REGISTRY
    from raysim.policies.static import Uniform

    from conftest import TINY

    class FailsInRoundTwo(Uniform):
        def assign(self, devices, state):
            if state.round == 2:
                raise RuntimeError("policy bug")
            return super().assign(devices, state)

    REGISTRY["fails-in-round-two"] = FailsInRoundTwo
    (tmp_path / "p.yaml").write_text("policy: fails-in-round-two\n")
    cfg = load_experiment(None, [*TINY, f"output_dir={tmp_path / 'run'}", f"policy={tmp_path / 'p.yaml'}"])
    try:
        with pytest.raises(RuntimeError, match="policy bug"):
            run_experiment(cfg)
    finally:
        del REGISTRY["fails-in-round-two"]
    assert _rounds(tmp_path / "run")["round"] == [1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 1
    assert summary["cause"] == "RuntimeError: policy bug"
    assert not (tmp_path / "run" / "final_state.pt").exists()  # only a clean stop writes a final state


def test_stop_at_target_ends_the_run_at_the_first_evaluation_that_reaches_it(ray_session, tmp_path):
    from raysim.config import load_experiment

    from conftest import TINY

    cfg = load_experiment(None, [*TINY, f"output_dir={tmp_path / 'run'}", "rounds=5", "eval.every=2",
                                 "eval.target_accuracy=0.0", "eval.stop_at_target=true"])
    run_experiment(cfg)
    rounds = _rounds(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert rounds["round"] == [1, 2]  # round 1 is not evaluated; round 2 is, and reaches 0.0
    assert summary["status"] == "target_reached" and summary["rounds_completed"] == 2
    assert summary["time_to_target_s"] == pytest.approx(rounds["sim_time_s"][-1])


def test_a_device_actor_killed_mid_round_costs_no_round_and_changes_no_result(runs, tmp_path, monkeypatch, capsys):
    """Round 2's second unit is handed to an actor, which is then killed: the unit is computed again (by the other
    actor, or the one that replaced the killed one) and the run's files are the bytes of the run never killed."""
    import ray

    import raysim.engine.pool
    from raysim.config import load_experiment

    from conftest import TINY

    real = raysim.engine.pool.dispatch
    killed = []

    def killing(actors, items, call, *, what, **kw):
        def call_then_kill(actor, item):
            refs = call(actor, item)
            if what == "round 2" and not killed and getattr(item, "index", None) == 1:
                ray.kill(actor)
                killed.append(item.index)
            return refs

        return real(actors, items, call_then_kill, what=what, **kw)

    monkeypatch.setattr(raysim.engine.pool, "dispatch", killing)
    spread = ["policy=random", "methods.lora_rank=[4,2]", "methods.bits=[32,8]", "ray.tokens_per_pass=128",
              "eval.batch_size=8", "ray.cpus_per_actor=0.5", "ray.num_actors=2"]
    cfg = load_experiment(None, [*TINY, f"output_dir={tmp_path / 'run'}", "cohort.deadline_s=0.12", *spread])
    run_dir = run_experiment(cfg)
    assert killed == [1] and "round 2: a device actor was lost" in capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    assert_same_results(run_dir, runs["two"])
