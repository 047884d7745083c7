"""Long runs survive: checkpoints, --resume to the identical run, finished rounds readable after kill -9, and
results that are never destroyed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raysim.config import load_experiment
from raysim.engine.callbacks import Callback
from raysim.engine.run import run_experiment
from raysim.errors import ConfigError

from conftest import TINY, assert_same_results

ROOT = Path(__file__).resolve().parents[1]
# Everything a checkpoint must carry: central DP with adaptive clipping (clip norm, accountant), FedAdam's
# moments, the rl policy (network, optimizer, critic memory), evaluations, the time to a target, stragglers.
RICH = [*TINY, "rounds=20", "cohort.sampling=poisson", "cohort.size=6", "privacy.clip_norm=0.05",
        "privacy.noise_multiplier=0.5", "privacy.adaptive_clipping.enabled=true",
        "privacy.adaptive_clipping.count_std=2.0", "aggregation.server_optimizer=fedadam",
        "aggregation.server_lr=0.01", "policy=rl", "methods.lora_rank=[4,2]", "methods.bits=[32,8]",
        "eval.target_accuracy=0.02", "ray.tokens_per_pass=128", "eval.batch_size=8"]


class CrashAfter(Callback):
    """A callback that fails the run once round ``k`` is recorded (a crash between rounds)."""

    def __init__(self, k: int):
        self.k = k

    def after_record(self, run):
        if run.completed == self.k:
            raise RuntimeError("crash")


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    return run_experiment(load_experiment(None, [*RICH, f"output_dir={out}"]))


def _resume(run_dir: Path) -> Path:
    return run_experiment(load_experiment(run_dir / "config.yaml", []), resume=True)


def test_a_run_resumed_after_a_crash_ends_byte_identical_to_one_never_stopped(uninterrupted, tmp_path):
    cfg = load_experiment(None, [*RICH, f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="crash"):
        run_experiment(cfg, callbacks=[CrashAfter(2)])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["checkpoint"]["round"] == 2
    assert_same_results(_resume(tmp_path / "run"), uninterrupted)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"


def _kill_after_parts(args: list[str], run_dir: Path, *, parts: int, delay_s: float) -> None:
    """Start ``raysim ARGS`` with its own Ray; once ``parts`` rounds are written, wait ``delay_s`` and kill -9 the
    driver and every process it started (its Ray included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "raysim.cli", *args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while len(list((run_dir / "rounds.parquet").glob("round-*.parquet"))) < parts:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach its rounds in time"
            time.sleep(0.05)
        time.sleep(delay_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _readable(run_dir: Path) -> int:
    """Every finished round can be read after the kill: the parts, as one table; the summary parses. A round is
    finished once its rounds.parquet part is written (after its devices part: the round the kill interrupted may
    have left that one, which a resume replaces)."""
    rounds = pq.read_table(run_dir / "rounds.parquet").column("round").to_pylist()
    devices = set(pq.read_table(run_dir / "devices.parquet").column("round").to_pylist())
    assert rounds == list(range(1, len(rounds) + 1)) and devices - set(rounds) <= {len(rounds) + 1}
    assert set(rounds) <= devices
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    return len(rounds)


def test_kill_9_at_random_moments_keeps_every_finished_round_and_resumes_to_the_same_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    (tmp_path / "rich.yaml").write_text(yaml.safe_dump(_nested(RICH)))
    moments = random.Random(0)  # how many rounds before each kill, and a jitter within the next round
    _kill_after_parts(["run", str(tmp_path / "rich.yaml"), f"output_dir={run_dir}"], run_dir,
                      parts=moments.randint(1, 5), delay_s=moments.uniform(0, 0.05))
    first = _readable(run_dir)
    _kill_after_parts(["run", "--resume", str(run_dir)], run_dir, parts=first + moments.randint(1, 5),
                      delay_s=moments.uniform(0, 0.05))
    assert _readable(run_dir) > first
    assert_same_results(_resume(run_dir), uninterrupted)


def _nested(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(overrides))


def test_a_run_into_a_folder_with_a_run_is_refused_unless_resumed_or_overwritten(uninterrupted, tmp_path):
    cfg = load_experiment(None, [*TINY, "rounds=1", f"output_dir={uninterrupted}"])
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")}
    with pytest.raises(ConfigError, match="holds a run .status finished, 20 of 20 rounds.: "
                                          "pass --resume to continue it or --overwrite to replace it"):
        run_experiment(cfg)
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*")} == before  # nothing touched
    with pytest.raises(ConfigError, match="the run ended .finished.; there is nothing to resume"):
        run_experiment(load_experiment(uninterrupted / "config.yaml", []), resume=True)


def test_overwrite_replaces_a_raysim_run_and_leaves_no_file_of_the_old_one(ray_session, tmp_path):
    run_dir = tmp_path / "run"
    run_experiment(load_experiment(None, [*TINY, "rounds=2", f"output_dir={run_dir}"]))
    run_experiment(load_experiment(None, [*TINY, "rounds=1", f"output_dir={run_dir}"]), overwrite=True)
    assert sorted(p.name for p in (run_dir / "rounds.parquet").iterdir()) == ["round-000001.parquet"]
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 1


@pytest.mark.parametrize("summary", [None, {"status": "finished", "rounds": 3}], ids=["no-summary", "another-tools"])
def test_overwrite_refuses_a_folder_raysim_did_not_write_and_leaves_it_untouched(tmp_path, capsys, summary):
    """A config.yaml (or a summary.json of another tool) does not make a folder a raysim run."""
    from raysim.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("rounds: 3\n")
    (mine / "notes.txt").write_text("keep me")
    if summary is not None:
        (mine / "summary.json").write_text(json.dumps(summary))
    before = {p: p.read_bytes() for p in mine.iterdir()}
    code = main(["run", *TINY, f"output_dir={mine}", "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: output_dir: {mine} is not a raysim run directory; --overwrite "
                                 "replaces only those (a summary.json that raysim wrote marks one)"]
    assert {p: p.read_bytes() for p in mine.iterdir()} == before


def test_resume_refuses_a_changed_config_naming_the_key(tmp_path, ray_session):
    run_dir = tmp_path / "run"
    cfg = load_experiment(None, [*TINY, "rounds=3", f"output_dir={run_dir}"])
    with pytest.raises(RuntimeError, match="crash"):
        run_experiment(cfg, callbacks=[CrashAfter(1)])
    with pytest.raises(ConfigError, match="cohort.size: differs from the run's config"):
        run_experiment(load_experiment(run_dir / "config.yaml", ["cohort.size=5"]), resume=True)


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path, ray_session):
    import pickle

    run_dir = tmp_path / "run"
    cfg = load_experiment(None, [*TINY, "rounds=3", f"output_dir={run_dir}"])
    with pytest.raises(RuntimeError, match="crash"):
        run_experiment(cfg, callbacks=[CrashAfter(1)])
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (run_dir / "checkpoint.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError, match="checkpoint.safetensors: not a raysim checkpoint"):
        run_experiment(load_experiment(run_dir / "config.yaml", []), resume=True)
    assert not marker.exists()


class FailAtStart(Callback):
    def on_start(self, run):
        raise RuntimeError("broken before round 1")


def test_a_run_that_fails_before_round_1_says_so_in_its_summary(tiny_cfg, ray_session):
    """Before, a failure during the initial evaluation left no summary.json at all."""
    cfg = tiny_cfg()
    with pytest.raises(RuntimeError, match="broken before round 1"):
        run_experiment(cfg, callbacks=[FailAtStart()])
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert summary["cause"] == "RuntimeError: broken before round 1" and summary["initial"]  # evaluated first


def test_sigterm_stops_cleanly_saves_the_state_and_the_run_resumes_to_the_same_results(ray_session, tmp_path):
    """SIGTERM (what a scheduler or `kill` sends) stops the driver like Ctrl-C: exit 130, one line, no traceback,
    status interrupted with a checkpoint at its last round; resumed, it ends as the run never stopped."""
    overrides = [*TINY, "rounds=12", "eval.every=3"]
    run_dir = tmp_path / "run"
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(_nested(overrides)))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = subprocess.Popen([sys.executable, "-m", "raysim.cli", "run", str(tmp_path / "tiny.yaml"),
                             f"output_dir={run_dir}"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while len(list((run_dir / "rounds.parquet").glob("round-*.parquet"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.rstrip().splitlines()[-1] == "raysim: interrupted"
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    done = len(list((run_dir / "rounds.parquet").glob("round-*.parquet")))
    assert summary["status"] == "interrupted" and summary["rounds_completed"] == done < 12
    assert summary["checkpoint"]["round"] == done and not (run_dir / "final_state.pt").exists()
    whole = run_experiment(load_experiment(None, [*overrides, f"output_dir={tmp_path / 'whole'}"]))
    assert_same_results(_resume(run_dir), whole)
