"""train-policy: the rl policy learns over episodes, saves, and a later run starts from it."""

from __future__ import annotations

from raysim import checkpoint as ckpt
from raysim.cli import main
from raysim.policies.rl.policy import unpack


def test_trained_rl_policy_is_saved_and_a_later_run_loads_it(ray_session, tmp_path, tiny_cfg, capsys):
    from raysim.run import run_experiment

    (tmp_path / "rl.yaml").write_text("policy: rl\nparams: {w_progress: 10.0}\n")
    exp = tmp_path / "exp.yaml"
    exp.write_text("methods: {bits: [32, 8], lora_rank: [4, 2]}\n")
    from conftest import TINY

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
