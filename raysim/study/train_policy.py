"""``raysim train-policy``: train the ``rl`` policy over several runs (episodes) and save it.

Episode e is the experiment with seed ``seed + e`` (fresh device draws, data
order and cohorts); the policy carries its network, optimizer, critic memory and running means
from one episode to the next. A later run starts from the saved checkpoint
with ``params: {checkpoint: PATH}`` in its policy file.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from raysim.config import ExperimentConfig
from raysim.engine.run import run_experiment
from raysim.errors import ConfigError
from raysim.io import checkpoint as ckpt
from raysim.io.caches import Caches
from raysim.io.rundir import claim
from raysim.policies import PolicyContext, build_policy, read_policy
from raysim.policies.rl.policy import pack


def train_policy(cfg: ExperimentConfig, *, episodes: int, out: Path, overwrite: bool = False) -> Path:
    """Run ``episodes`` runs of ``cfg`` with one learning policy; save its state to ``out``. An existing ``out``
    or episode run is replaced only with ``overwrite``, and refused before any episode runs."""
    spec = read_policy(cfg.policy)
    if spec.name != "rl":
        raise ConfigError(f"train-policy trains an rl policy, not {spec.name!r}", file=spec.path, field="policy")
    if episodes < 1:
        raise ConfigError("must be >= 1", field="--episodes")
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out.name}: the checkpoint is written as safetensors (name it *.safetensors)",
                          field="--out")
    if not spec.params.get("learn", True):
        raise ConfigError("a policy with learn: false cannot be trained", file=spec.path, field="params.learn")
    episode_dirs = [out.parent / f"{out.stem}-episodes" / f"episode-{e}" for e in range(episodes)]
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; the checkpoint is a file", field="--out")
    taken = [path for path in (out, *episode_dirs) if path.exists()]
    if taken and not overwrite:
        raise ConfigError(f"{taken[0]} exists: pass --overwrite to replace the checkpoint and its episodes' runs",
                          field="--out")
    for run_dir in episode_dirs:
        claim(run_dir, overwrite=overwrite)  # --overwrite replaces only runs that raysim wrote
    state = None
    caches = Caches()  # the episodes share measurements and the built dataset
    for episode, run_dir in enumerate(episode_dirs):
        built = []

        def make(context: PolicyContext, state=state, built=built):  # called within this episode
            policy = build_policy(spec, context=context)
            if state is not None:
                policy.load_state_dict(state)
            built.append(policy)
            return policy

        run_cfg = dataclasses.replace(cfg, seed=cfg.seed + episode, name=f"{cfg.name}-episode-{episode}",
                                      output_dir=str(run_dir))
        run_experiment(run_cfg, make_policy=make, caches=caches, overwrite=overwrite)
        state = built[0].state_dict()
        final = _final(run_dir)
        accuracy = final["eval_accuracy"]
        reached = f"eval accuracy {accuracy:.4f}" if math.isfinite(accuracy) else "no evaluation (eval.every=0)"
        print(f"raysim train-policy: episode {episode + 1}/{episodes} seed {run_cfg.seed}: {reached}, "
              f"sim time {final['sim_time_s']:.1f} s", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(out, {"policy": pack(state)})
    return out


def _final(run_dir: Path) -> dict:
    from raysim.study.report import run_metrics

    m = run_metrics(run_dir)
    return {"eval_accuracy": m["final_eval_accuracy"], "sim_time_s": m["sim_time_s"]}
