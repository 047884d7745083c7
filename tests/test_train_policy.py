"""train-policy: the rl policy learns over episodes, saves, and a later run starts from it."""

from __future__ import annotations

import json

from raysim.cli import main
from raysim.io import checkpoint as ckpt
from raysim.policies.rl.policy import unpack

from conftest import TINY


def test_trained_rl_policy_is_saved_and_a_later_run_loads_it(ray_session, tmp_path, tiny_cfg, capsys):
    from raysim.engine.run import run_experiment

    (tmp_path / "rl.yaml").write_text("policy: rl\nparams: {w_progress: 10.0}\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("methods: {bits: [32, 8], lora_rank: [4, 2]}\n")
    out = tmp_path / "ckpt" / "rl.safetensors"
    assert main(["train-policy", str(exp), *TINY, "rounds=3", f"policy={tmp_path / 'rl.yaml'}", "--episodes", "2",
                 "--out", str(out)]) == 0
    state = unpack(ckpt.load(out)["policy"])
    assert set(state) == {"net", "optimizer", "critic", "memory", "running"}
    assert state["running"]["duration"] > 0 and state["memory"]
    assert (tmp_path / "ckpt" / "rl-episodes" / "episode-1" / "summary.json").is_file()

    (tmp_path / "trained.yaml").write_text(f"policy: rl\nparams: {{checkpoint: {out}, learn: false}}\n")
    cfg = tiny_cfg(f"policy={tmp_path / 'trained.yaml'}", "methods.bits=[32,8]", "methods.lora_rank=[4,2]")
    assert (run_experiment(cfg) / "summary.json").is_file()


def _rl_experiment(tmp_path):
    (tmp_path / "rl.yaml").write_text("policy: rl\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"policy: {tmp_path / 'rl.yaml'}\n")
    return exp


def test_train_policy_refuses_an_existing_checkpoint_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "rl.safetensors"
    out.write_bytes(b"mine")
    code = main(["train-policy", str(_rl_experiment(tmp_path)), *TINY, "--episodes", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: --out: {out} exists: pass --overwrite to replace the checkpoint "
                                 "and its episodes' runs"]
    assert out.read_bytes() == b"mine" and not (tmp_path / "rl-episodes").exists()


def test_train_policy_out_that_is_a_folder_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "rl.safetensors").mkdir()
    code = main(["train-policy", str(_rl_experiment(tmp_path)), *TINY, "--out", str(tmp_path / "rl.safetensors"),
                 "--overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"raysim: error: --out: {tmp_path / 'rl.safetensors'} is a folder; the checkpoint "
                                 "is a file"]


def test_train_policy_with_overwrite_replaces_the_checkpoint_and_its_episodes_runs(ray_session, tmp_path):
    out, episode = tmp_path / "rl.safetensors", tmp_path / "rl-episodes" / "episode-0"
    out.write_bytes(b"old")
    episode.mkdir(parents=True)
    (episode / "summary.json").write_text(json.dumps({"status": "finished", "rounds": 1, "rounds_completed": 1,
                                                      "versions": {"raysim": "0.1"}}))
    (episode / "old.txt").write_text("from the last training")
    assert main(["train-policy", str(_rl_experiment(tmp_path)), *TINY, "rounds=1", "--episodes", "1",
                 "--out", str(out), "--overwrite"]) == 0
    assert set(unpack(ckpt.load(out)["policy"])) == {"net", "optimizer", "critic", "memory", "running"}
    assert not (episode / "old.txt").exists() and json.loads((episode / "summary.json").read_text())["rounds"] == 1
