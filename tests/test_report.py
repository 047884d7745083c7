"""Reports: metrics read back from run directories, report.md and its plots."""

from __future__ import annotations

import math

import pytest

from raysim.cli import main
from raysim.config import load_experiment, to_yaml
from raysim.io.results import DEVICES_SCHEMA, ROUNDS_SCHEMA, RoundResult, RoundRow, RunWriter
from raysim.study.report import PLOTS, run_metrics, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, *, policy: str, seed: int, accuracy: list[float], target=0.3, epsilon=math.inf,
             status="finished"):
    """A run (finished unless told) with evaluations every round, 100 s and 1000 + 4000 bytes per round."""
    cfg = load_experiment(None, [f"policy={policy}", f"seed={seed}", f"eval.target_accuracy={target}"])
    writer = RunWriter(folder, config_yaml=to_yaml(cfg))
    for i, acc in enumerate(accuracy, 1):
        row = RoundRow(**({name: 0 for name in ROUNDS_SCHEMA.names} | {
            "round": i, "sim_time_s": 100.0 * i, "eval_accuracy": acc, "epsilon": epsilon, "bytes_up": 1000,
            "bytes_down": 4000, "n_selected": 10, "n_oom": 1, "n_stragglers": 2, "n_dropped": 0,
            "train_loss": 1.0, "eval_loss": 2.0}))
        writer.write_round(RoundResult(row=row, devices={name: [] for name in DEVICES_SCHEMA.names}, started_s=0.0))
    writer.write_summary({"status": status, "rounds_completed": len(accuracy), "wall_time_s": 1.0,
                          "initial": {"eval_accuracy": 0.1}, "final": {"eval_loss": 2.0, "train_loss": 1.0}})
    return folder


def test_run_metrics_find_time_and_bytes_to_target_and_failure_rates(tmp_path):
    m = run_metrics(fake_run(tmp_path / "r", policy="uniform", seed=0, accuracy=[0.2, 0.31, 0.35]))
    assert m["time_to_target_s"] == 200.0 and m["bytes_to_target"] == 10_000
    assert m["final_eval_accuracy"] == 0.35 and m["sim_time_s"] == 300.0 and m["bytes_total"] == 15_000
    assert m["oom_rate"] == 0.1 and m["straggler_rate"] == 0.2 and m["dropout_rate"] == 0.0
    assert math.isinf(m["epsilon"])


def test_a_run_that_never_reaches_the_target_has_no_time_to_target(tmp_path):
    m = run_metrics(fake_run(tmp_path / "r", policy="uniform", seed=0, accuracy=[0.2, 0.25]))
    assert math.isnan(m["time_to_target_s"]) and math.isnan(m["bytes_to_target"])


def test_a_given_target_replaces_the_runs_own(tmp_path):
    m = run_metrics(fake_run(tmp_path / "r", policy="uniform", seed=0, accuracy=[0.2, 0.25]), target=0.2)
    assert m["time_to_target_s"] == 100.0 and m["target_accuracy"] == 0.2


def test_report_has_a_mean_std_row_per_policy_and_three_plots(tmp_path):
    runs = [fake_run(tmp_path / f"{p}-{s}", policy=p, seed=s, accuracy=acc)
            for p, acc in (("uniform", [0.2, 0.3]), ("greedy_fit", [0.3, 0.4])) for s in (0, 1)]
    report = write_report(runs, out_dir=tmp_path / "out", title="t")
    text = report.read_text()
    assert "| uniform | 2 | 0.3000 ± 0.0000 |" in text
    assert "| greedy_fit | 2 | 0.4000 ± 0.0000 |" in text
    for png in ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "accuracy_vs_epsilon.png"):
        assert f"]({png})" in text
        assert (tmp_path / "out" / png).read_bytes().startswith(PNG)


def test_report_marks_columns_that_only_some_seeds_reached(tmp_path):
    runs = [fake_run(tmp_path / "a", policy="uniform", seed=0, accuracy=[0.35]),
            fake_run(tmp_path / "b", policy="uniform", seed=1, accuracy=[0.2])]
    text = write_report(runs, out_dir=tmp_path / "out").read_text()
    assert "100.0 ± 0.0 (1/2)" in text  # time to target (s): one of two seeds


def test_report_cli_accepts_a_study_folder(tmp_path, capsys):
    for s in (0, 1):
        fake_run(tmp_path / "study" / "runs" / f"r{s}", policy="rl", seed=s, accuracy=[0.3], epsilon=2.0)
    assert main(["report", str(tmp_path / "study"), "--out", str(tmp_path / "out")]) == 0
    assert "| rl | 2 |" in (tmp_path / "out" / "report.md").read_text()


def test_report_on_a_folder_that_is_no_run_is_one_clear_line(tmp_path, capsys):
    code = main(["report", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: {tmp_path}: not a run directory (no config.yaml)"]


@pytest.mark.parametrize("argv", [["train-policy", "--episodes", "0"], []])
def test_train_policy_rejects_a_policy_that_does_not_learn(tmp_path, capsys, argv):
    exp = tmp_path / "exp.yaml"
    exp.write_text("rounds: 1\n")
    code = main(["train-policy", str(exp)] + (argv[1:] if argv else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "train-policy trains an rl policy, not 'uniform'" in err[0]


def test_a_run_that_did_not_finish_is_left_out_of_the_means_and_listed(tmp_path, capsys):
    """A 1-round interrupted run must not drag its group's mean (0.4 of the finished seeds) down unannounced."""
    runs = [fake_run(tmp_path / f"r{s}", policy="uniform", seed=s, accuracy=[0.3, 0.4]) for s in (0, 1)]
    runs.append(fake_run(tmp_path / "r2", policy="uniform", seed=2, accuracy=[0.1], status="interrupted"))
    text = write_report(runs, out_dir=tmp_path / "out").read_text()
    assert "| uniform | 2 | 0.4000 ± 0.0000 |" in text
    assert "1 run that did not finish is left out" in text
    assert f"| {runs[2]} | uniform | 2 | gboard | interrupted after 1 rounds, left out | 0.1000 |" in text


def test_a_flag_averages_unfinished_runs_in_and_marks_their_group(tmp_path, capsys):
    runs = [fake_run(tmp_path / "a", policy="uniform", seed=0, accuracy=[0.3, 0.4]),
            fake_run(tmp_path / "b", policy="uniform", seed=1, accuracy=[0.2], status="failed")]
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "out"),
                 "--include-unfinished"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| uniform † 1 | 2 | 0.3000 ± 0.1000 |" in text and "left out" not in text
    assert f"| {runs[1]} | uniform | 1 | gboard | failed after 1 rounds | 0.2000 |" in text


def test_report_out_refuses_an_earlier_report_and_writes_nothing(tmp_path, capsys):
    run = fake_run(tmp_path / "r", policy="uniform", seed=0, accuracy=[0.3])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text("my notes")
    code = main(["report", str(run), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: --out: {tmp_path / 'out'} holds a report (report.md): "
                                 "pass --overwrite to replace it"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.md"]
    assert (tmp_path / "out" / "report.md").read_text() == "my notes"


def test_report_out_replaces_an_earlier_report_with_overwrite(tmp_path):
    run = fake_run(tmp_path / "r", policy="uniform", seed=0, accuracy=[0.3])
    assert main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "report.md").write_text("stale")
    assert main(["report", str(run), "--out", str(tmp_path / "out"), "--overwrite"]) == 0
    assert "| uniform | 1 |" in (tmp_path / "out" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(["report.md", *PLOTS])


def test_report_out_that_is_a_file_is_one_clear_line(tmp_path, capsys):
    run = fake_run(tmp_path / "r", policy="uniform", seed=0, accuracy=[0.3])
    (tmp_path / "out").write_text("not a folder")
    code = main(["report", str(run), "--out", str(tmp_path / "out"), "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: --out: {tmp_path / 'out'} is a file; the report is a folder"]
    assert (tmp_path / "out").read_text() == "not a folder"
