"""Every YAML file the project ships loads and validates."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from raysim.config import load_experiment
from raysim.emulation.costmodel import Measurement
from raysim.emulation.profiles import load_population
from raysim.methods import method_space
from raysim.policies import CostOracle, PolicyContext, build_policy, read_policy
from raysim.study.compare import load_study

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "experiments" / "compare_policies.yaml"


def build_for(cfg, policy: str):
    """Build ``policy`` for ``cfg``'s method space with a stand-in cost model."""
    measurement = Measurement(flops_per_step=1e9, activation_bytes=1 << 20, param_bytes=1 << 20,
                              trainable_params=1000, bytes_down=4000, bytes_up=4000)
    oracle = CostOracle(measure=lambda c: measurement, local_steps=cfg.train.local_steps,
                        deadline_s=cfg.cohort.deadline_s)
    context = PolicyContext(methods=cfg.methods, space=method_space(cfg.methods), oracle=oracle, seed=cfg.seed,
                            rounds=cfg.rounds)
    return build_policy(read_policy(policy), context=context)


def is_study(path: Path) -> bool:
    return "axes" in OmegaConf.load(path)


@pytest.mark.parametrize("path", [p for p in sorted((ROOT / "experiments").glob("*.yaml")) if not is_study(p)],
                         ids=lambda p: p.name)
def test_shipped_experiment_validates_and_resolves(path):
    cfg = load_experiment(path)
    load_population(cfg.population, size=cfg.population_size)
    build_for(cfg, cfg.policy)


def study_naming(policy: Path) -> Path:
    """The shipped study whose policy axis names ``policy`` (its families fit that study's method space), else
    the shipped policy comparison."""
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        if is_study(path) and policy.stem in OmegaConf.load(path).axes.get("policy", []):
            return path
    return STUDY


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policy_builds_for_the_shipped_study_that_uses_it(path):
    runs = load_study(study_naming(path)).runs
    cfg = next((r.cfg for r in runs if Path(r.cfg.policy).stem == path.stem), runs[0].cfg)
    assert build_for(cfg, str(path)) is not None


@pytest.mark.parametrize("path", [p for p in sorted((ROOT / "experiments").glob("*.yaml")) if is_study(p)],
                         ids=lambda p: p.name)
def test_shipped_study_resolves_every_run_and_its_policy(path):
    study = load_study(path)
    assert len(study.runs) == np.prod([len(v) for v in study.axes.values()])
    for run in study.runs:
        load_population(run.cfg.population, size=run.cfg.population_size)
        build_for(run.cfg, run.cfg.policy)
