"""Bad input gets one line naming where it came from and a non-zero exit, before any training.

Every float key must be finite: an infinite clip norm made a run report a false ε, an infinite noise
multiplier hung the accountant, an infinite learning rate crashed in round 1 with a remote traceback.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

import pytest

from raysim.cli import main
from raysim.config import ExperimentConfig, load_experiment
from raysim.config import schema as config_module
from raysim.errors import ConfigError

from conftest import TINY


def float_keys(cls=ExperimentConfig, prefix: str = "") -> list[tuple[str, bool]]:
    """Every float key of the config (dotted) and whether it is a list of floats."""
    keys = []
    hints = typing.get_type_hints(cls, {**vars(config_module), **vars(sys.modules[cls.__module__])})
    for f in dataclasses.fields(cls):
        kind, dotted = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(kind):
            keys += float_keys(kind, f"{dotted}.")
        elif kind in (float, float | None):
            keys.append((dotted, False))
        elif kind == list[float]:
            keys.append((dotted, True))
    return keys


FLOAT_KEYS = float_keys()


def test_the_sweep_covers_the_keys_the_issue_names():
    names = {k for k, _ in FLOAT_KEYS}
    assert {"privacy.clip_norm", "privacy.noise_multiplier", "train.lr", "aggregation.beta1", "cohort.deadline_s",
            "cohort.over_selection", "eval.target_accuracy", "methods.prune_ratio", "ray.cpus_per_actor"} <= names
    assert len(names) >= 30


@pytest.mark.parametrize("key, is_list", FLOAT_KEYS, ids=[k for k, _ in FLOAT_KEYS])
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_key_must_be_finite_and_the_override_is_named(key, is_list, value):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [f"{key}=[{value}]" if is_list else f"{key}={value}"])
    assert err.value.field == (f"{key}[0]" if is_list else key) and err.value.file == "override"
    assert "must be finite" in err.value.message


def test_a_bad_value_is_blamed_on_whoever_set_it_last(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("train:\n  lr: .inf\nprivacy:\n  clip_norm: 1.0\ncohort:\n  sampling: poisson\n")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    assert (err.value.file, err.value.field) == (str(path), "train.lr")
    assert load_experiment(path, ["train.lr=0.01"]).train.lr == 0.01  # the override mends the file's value
    with pytest.raises(ConfigError) as err:
        load_experiment(path, ["train.lr=0.01", "privacy.clip_norm=inf"])
    assert (err.value.file, err.value.field) == ("override", "privacy.clip_norm")  # the file's 1.0 was fine
    with pytest.raises(ConfigError) as err:
        load_experiment(path, ["train.lr=0.01"], layers=[("study.yaml: axes", {"methods": {"bits": [8, 40]}})])
    assert (err.value.file, err.value.field) == ("study.yaml: axes", "methods.bits[1]")


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("override, key", [
    ("privacy.clip_norm=inf", "privacy.clip_norm"),
    ("privacy.noise_multiplier=inf", "privacy.noise_multiplier"),
    ("train.lr=inf", "train.lr"),
    ("cohort.deadline_s=nan", "cohort.deadline_s"),
])
def test_the_issues_inputs_stop_the_cli_with_one_line_before_anything_runs(override, key, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", "experiments/dp_fedavg.yaml", override, f"output_dir={out}"], capsys)
    assert code == 1 and err == [f"raysim: error: override: {key}: must be finite (got {override.split('=')[1]})"]
    assert not out.exists()


def test_a_cohort_larger_than_the_population_is_refused_before_ray_starts(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", *TINY, "cohort.size=500", "population_size=200", f"output_dir={out}"], capsys)
    assert code == 1 and len(err) == 1 and "cohort.size" in err[0] and "200" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("argv, flag", [
    (["--noise-multiplier", "inf"], "--noise-multiplier"),
    (["--noise-multiplier", "nan"], "--noise-multiplier"),
    (["--target-epsilon", "inf"], "--target-epsilon"),
])
def test_the_privacy_planner_refuses_non_finite_values_instead_of_hanging(argv, flag, capsys):
    code, err = run_cli(["privacy", *argv, "--sample-rate", "0.01", "--rounds", "10", "--delta", "1e-6"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"raysim: error: {flag}: must be finite")


@pytest.mark.parametrize("params, key", [("lr: .inf", "params.lr"), ("w_time: .nan", "params.w_time")])
def test_a_policy_file_with_a_non_finite_parameter_names_file_and_key(params, key, tmp_path):
    from raysim.policies import read_policy

    path = tmp_path / "p.yaml"
    path.write_text(f"policy: rl\nparams:\n  {params}\n")
    with pytest.raises(ConfigError) as err:
        read_policy(str(path))
    assert (err.value.file, err.value.field) == (str(path), key)


@pytest.mark.parametrize("params, key", [("decay: 2.0", "params.decay"), ("hidden: 0", "params.hidden"),
                                         ("lr: -1.0", "params.lr"), ("memory: 0", "params.memory")])
def test_rl_parameters_out_of_range_name_file_and_key(params, key, tmp_path):
    from raysim.policies import build_policy, read_policy

    path = tmp_path / "p.yaml"
    path.write_text(f"policy: rl\nparams:\n  {params}\n")
    with pytest.raises(ConfigError) as err:
        build_policy(read_policy(str(path)), context=None)
    assert (err.value.file, err.value.field) == (str(path), key)


def test_a_text_column_with_a_null_names_file_and_row(tmp_path):
    from raysim.data.sources import partition, read_table

    path = tmp_path / "d.jsonl"
    path.write_text('{"user": "a", "text": "x"}\n{"user": "b", "text": null}\n')
    cfg = load_experiment(None, [f"data.source={path}"])
    with pytest.raises(ConfigError) as err:
        partition(read_table(path), cfg.data, seed=0, source=str(path))
    assert (err.value.file, err.value.field) == (str(path), "data.text_column")
    assert "row 1 holds None" in str(err.value)


def test_a_jsonl_file_that_does_not_parse_names_file_and_row(tmp_path):
    from raysim.data.sources import read_table

    path = tmp_path / "d.jsonl"
    path.write_text('{"user": "a", "text": "x"}\n{"user": "b", "text": "y"\n')
    with pytest.raises(ConfigError) as err:
        read_table(path)
    assert err.value.file == str(path) and "row 1" in str(err.value)


def test_a_run_whose_aggregate_turns_non_finite_fails_and_keeps_its_state(tiny_cfg, ray_session):
    """lr = 1e30 is finite, so it passes validation; round 1's update overflows. The run must end ``failed``
    with the cause, record no round it could not finish, and leave no final state."""
    from raysim.engine.aggregator import NonFiniteUpdate
    from raysim.engine.run import run_experiment

    cfg = tiny_cfg("train.lr=1e30", "ray.cpus_per_actor=0.5", "ray.num_actors=1")
    with pytest.raises(NonFiniteUpdate, match="round 1: the aggregated update is not finite"):
        run_experiment(cfg)
    run_dir = Path(cfg.output_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert summary["cause"].startswith("NonFiniteUpdate: round 1: the aggregated update is not finite")
    assert not (run_dir / "final_state.pt").exists() and not list((run_dir / "rounds.parquet").glob("*.parquet"))


@pytest.mark.parametrize("overrides, message", [
    (["privacy.noise_space=sparse"], "must be dense or factors (or null)"),
    (["privacy.noise_space=factors"], "factors needs aggregation.lora=hetlora or ffa (ffa: exact, A frozen), "
                                      "not flexlora"),
    (["privacy.noise_space=dense", "aggregation.lora=ffa"], "dense needs aggregation.lora=flexlora, not ffa"),
])
def test_a_noise_space_the_lora_rule_does_not_aggregate_in_is_refused(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", "experiments/dp_fedavg.yaml", *overrides, f"output_dir={out}"], capsys)
    assert code == 1 and err == [f"raysim: error: override: privacy.noise_space: {message}"]
    assert not out.exists()


DP_PEU = ("partial embeddings under central DP: choose server_frequent or server_random (with "
          "methods.embedding_rows), or write device_seen, whose indices give the server each user's token set")


@pytest.mark.parametrize("overrides, source, message", [
    (["methods.partial_embeddings=[false,true]"], "experiments/dp_fedavg.yaml", DP_PEU),
    (["methods.embedding_selection=server_random"], "override",
     "server_random needs methods.embedding_rows (the rows the server picks)"),
    (["methods.embedding_selection=everything"], "override",
     "must be device_seen | server_frequent | server_random (or null)"),
])
def test_embedding_selection_under_dp_must_be_chosen(overrides, source, message, tmp_path, capsys):
    """The experiment file is blamed where it enables partial embeddings under DP without choosing rows."""
    out = tmp_path / "run"
    code, err = run_cli(["run", "experiments/dp_fedavg.yaml", *overrides, f"output_dir={out}"], capsys)
    assert code == 1 and err == [f"raysim: error: {source}: methods.embedding_selection: {message}"]
    assert not out.exists()


@pytest.mark.parametrize("overrides, key, message", [
    (["methods.output_loss=hierarchical"], "methods.output_loss", "must be softmax | nce | sampled_softmax"),
    (["methods.output_loss=nce", "methods.noise_samples=0"], "methods.noise_samples", "must be >= 1"),
    (["methods.output_loss=nce", "privacy.local.enabled=true"], "methods.output_loss",
     "local DP-SGD trains with the full softmax (privacy.local.enabled)"),
    (["model.tie_embeddings=maybe"], "model.tie_embeddings", None),
])
def test_output_loss_and_embedding_tying_reject_bad_values_with_one_line(overrides, key, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", "experiments/quickstart.yaml", *overrides, f"output_dir={out}"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"raysim: error: override: {key}: "), err
    assert message is None or err[0].endswith(message)
    assert not out.exists()


@pytest.mark.parametrize("overrides, key, message", [
    (["costs.recipe=fast"], "costs.recipe", "must be 'reference' or 'fused'"),
    (["costs.recipe=null"], "costs.recipe", None),
    (["costs.recpie=fused"], "costs.recpie", "unknown key (did you mean costs.recipe?)"),
    (["speedups.fused_activations=maybe"], "speedups.fused_activations", None),
    (["speedups.chunked_loss=[true]"], "speedups.chunked_loss", None),
    (["speedups.keep_freed=false"], "speedups.keep_freed", "unknown key (did you mean speedups.keep_freed_memory?)"),
])
def test_cost_recipe_and_speedups_reject_bad_values_with_one_line(overrides, key, message, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(["run", "experiments/quickstart.yaml", *overrides, f"output_dir={out}"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"raysim: error: override: {key}: "), err
    assert message is None or err[0].endswith(message), err
    assert not out.exists()
