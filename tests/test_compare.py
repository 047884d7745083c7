"""Comparison studies: one row per run, identical for a seed, resumable, errors in one line."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from omegaconf import OmegaConf

from raysim.cli import main
from raysim.study.compare import is_finished, load_study, run_study

from conftest import TINY

AXES = {"policy": ["greedy_fit", "rl"], "seed": [0]}


def write_study(folder: Path, *, axes=AXES, **extra) -> Path:
    experiment = OmegaConf.to_container(OmegaConf.from_dotlist([
        *TINY, "methods.bits=[32,8]", "methods.lora_rank=[4,2]", "eval.target_accuracy=0.0", "ray.num_actors=2"]))
    study = {"name": "tiny", "output_dir": str(folder / "study"), "axes": axes, "experiment": experiment, **extra}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, ray_session):
    folder = tmp_path_factory.mktemp("compare")
    return run_study(load_study(write_study(folder))), folder


def test_a_study_writes_one_row_per_run_with_its_labels_and_metrics(finished_study):
    study_dir, _ = finished_study
    table = pq.read_table(study_dir / "comparison.parquet").to_pylist()
    assert [(r["policy"], r["seed"]) for r in table] == [("greedy_fit", 0), ("rl", 0)]
    for row in table:
        assert row["population"] == "gboard" and row["status"] == "finished"
        assert row["rounds_completed"] == 3 and row["bytes_total"] > 0 and math.isinf(row["epsilon"])
        assert row["time_to_target_s"] == 0.0 and row["bytes_to_target"] == 0.0  # target 0: met before round 1
        assert 0.0 <= row["oom_rate"] <= 1 and 0.0 <= row["straggler_rate"] <= 1 and 0.0 <= row["dropout_rate"] <= 1
    assert (study_dir / "report.md").is_file()


def test_two_runs_of_a_study_with_the_same_seed_give_the_same_comparison(finished_study, tmp_path):
    study_dir, _ = finished_study
    again = run_study(load_study(write_study(tmp_path)))
    first, second = (pq.read_table(d / "comparison.parquet").drop_columns(["wall_time_s"]) for d in (study_dir, again))
    assert first.equals(second)


def test_policies_of_one_seed_see_the_same_device_draws(finished_study):
    study_dir, _ = finished_study
    round1 = {}
    for run in ("policy-greedy_fit_seed-0", "policy-rl_seed-0"):
        devices = pq.read_table(study_dir / "runs" / run / "devices.parquet").to_pydict()
        round1[run] = [(d, m) for r, d, m in zip(devices["round"], devices["device_id"], devices["memory_bytes"])
                       if r == 1]
    assert round1["policy-greedy_fit_seed-0"] == round1["policy-rl_seed-0"]


def test_a_resumed_study_reruns_only_unfinished_runs(finished_study, tmp_path, monkeypatch):
    study_dir, folder = finished_study
    path = write_study(tmp_path)
    shutil.copytree(study_dir, tmp_path / "study")
    summary_file = tmp_path / "study" / "runs" / "policy-rl_seed-0" / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps(summary | {"status": "interrupted"}))
    ran = []
    import raysim.engine.run

    real = raysim.engine.run.run_experiment
    monkeypatch.setattr(raysim.engine.run, "run_experiment", lambda cfg, **kw: ran.append(cfg.name) or real(cfg, **kw))
    run_study(load_study(path))
    assert ran == ["tiny-policy-rl_seed-0"]
    assert all(is_finished(r) for r in load_study(path).runs)


def test_a_changed_base_experiment_makes_finished_runs_stale(finished_study, tmp_path):
    study_dir, _ = finished_study
    path = write_study(tmp_path)
    shutil.copytree(study_dir, tmp_path / "study")
    assert all(is_finished(r) for r in load_study(path).runs)
    assert not any(is_finished(r) for r in load_study(path, ["train.lr=0.5"]).runs)


def test_a_run_whose_policy_file_changed_since_is_stale(finished_study, tmp_path):
    """The run directory records the policy's parameters; a file edited since (same name) reruns it."""
    study_dir, _ = finished_study
    path = write_study(tmp_path)
    shutil.copytree(study_dir, tmp_path / "study")
    summary_file = tmp_path / "study" / "runs" / "policy-rl_seed-0" / "summary.json"
    summary = json.loads(summary_file.read_text())
    assert summary["policy"]["name"] == "rl" and "w_time" in summary["policy"]["params"]
    summary["policy"]["params"]["w_time"] += 1.0  # as if the run had used another version of policies/rl.yaml
    summary_file.write_text(json.dumps(summary))
    assert [is_finished(r) for r in load_study(path).runs] == [True, False]


@pytest.fixture(scope="module")
def rerun_after_edit(finished_study, tmp_path_factory):
    """The finished study started again with another learning rate, for one of its runs: its folder, the old run's
    files (by path inside the run) and what the study said on stderr."""
    study_dir, _ = finished_study
    folder = tmp_path_factory.mktemp("rerun")
    path = write_study(folder)
    shutil.copytree(study_dir, folder / "study")
    old = folder / "study" / "runs" / "policy-greedy_fit_seed-0"
    files = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        run_study(load_study(path, ["axes.policy=[greedy_fit]", "train.lr=0.01"]))
    return folder / "study", files, err.getvalue()


def test_a_rerun_after_a_result_changing_edit_moves_the_finished_run_to_superseded_and_says_so(rerun_after_edit):
    study_dir, old_files, err = rerun_after_edit
    moved = list(study_dir.glob("superseded/*/runs/policy-greedy_fit_seed-0"))
    assert len(moved) == 1
    assert {p.relative_to(moved[0]): p.read_bytes() for p in moved[0].rglob("*") if p.is_file()} == old_files
    lines = [line for line in err.splitlines() if "moved to" in line]
    assert lines == [f"raysim compare: policy-greedy_fit_seed-0: its finished run differs in train.lr; "
                     f"moved to {moved[0]}"]
    rerun = json.loads((study_dir / "runs" / "policy-greedy_fit_seed-0" / "summary.json").read_text())
    assert rerun["status"] == "finished"
    assert OmegaConf.load(study_dir / "runs" / "policy-greedy_fit_seed-0" / "config.yaml").train.lr == 0.01


def test_a_study_folder_reads_as_its_current_runs_without_the_superseded_ones(rerun_after_edit, tmp_path):
    import raysim

    study_dir, _, _ = rerun_after_edit
    runs = raysim.load_study(study_dir).runs
    assert sorted(runs) == ["policy-greedy_fit_seed-0", "policy-rl_seed-0"]
    assert runs["policy-greedy_fit_seed-0"].config["train"]["lr"] == 0.01
    superseded = raysim.load_study(next(study_dir.glob("superseded/*"))).runs  # read back on their own
    assert list(superseded) == ["policy-greedy_fit_seed-0"]
    assert superseded["policy-greedy_fit_seed-0"].config["train"]["lr"] != 0.01
    assert main(["report", str(study_dir), "--out", str(tmp_path / "report")]) == 0
    assert "superseded" not in (tmp_path / "report" / "report.md").read_text()


def test_overrides_change_the_study_or_the_base_experiment(tmp_path):
    study = load_study(write_study(tmp_path), ["axes.seed=[5]", "rounds=2", "parallel=2"])
    assert [r.cfg.seed for r in study.runs] == [5, 5] and {r.cfg.rounds for r in study.runs} == {2}
    assert study.parallel == 2
    assert study.runs[0].cfg.output_dir == str(tmp_path / "study" / "runs" / "policy-greedy_fit_seed-5")


def test_any_experiment_key_can_be_an_axis(tmp_path):
    study = load_study(write_study(tmp_path, axes={"policy": ["uniform"], "cohort.size": [2, 3]}))
    assert [(r.run_id, r.cfg.cohort.size) for r in study.runs] == [("policy-uniform_size-2", 2),
                                                                    ("policy-uniform_size-3", 3)]


@pytest.mark.parametrize(("extra", "overrides", "expected"), [
    ({}, ["axes.cohort.bogus=[1]"], "study.yaml: axes: cohort.bogus: unknown key"),
    ({"runs": 3}, [], "study.yaml: runs: unknown key"),
    ({}, ["axes.seed=3"], "study.yaml: axes.seed: expected a non-empty list"),
    ({}, ["axes.policy=[nope]"], "policy: no policy named 'nope'"),
    ({"parallel": 0}, [], "study.yaml: parallel: must be an integer >= 1"),
])
def test_a_bad_study_is_one_clear_line(tmp_path, capsys, extra, overrides, expected):
    path = write_study(tmp_path, **extra)
    code = main(["compare", str(path), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and expected in err[0], err


def test_a_missing_study_file_is_one_clear_line(tmp_path, capsys):
    code = main(["compare", str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: {tmp_path / 'none.yaml'}: study file not found"]


@pytest.mark.slow
def test_parallel_runs_report_what_sequential_runs_do(finished_study, tmp_path):
    """Two runs at once on a split cluster: metrics agree with the sequential study to 1e-6."""
    import numpy as np

    study_dir, _ = finished_study
    path = write_study(tmp_path, parallel=2)
    parallel_dir = run_study(load_study(path, ["ray.num_actors=null"]))
    first, second = (pq.read_table(d / "comparison.parquet").drop_columns(["wall_time_s"]).to_pydict()
                     for d in (study_dir, parallel_dir))
    for key, values in first.items():
        if isinstance(values[0], float):
            np.testing.assert_allclose(second[key], values, rtol=1e-6)
        else:
            assert second[key] == values
