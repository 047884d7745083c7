"""Every YAML file the project ships loads and validates."""

from pathlib import Path

import pytest

from raysim.config import MethodsConfig, load_experiment
from raysim.policies import load_policy
from raysim.profiles import load_population

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_experiment_validates_and_resolves(path):
    cfg = load_experiment(path)
    load_population(cfg.population, size=cfg.population_size)
    load_policy(cfg.policy, methods=cfg.methods)


@pytest.mark.parametrize("path", sorted((ROOT / "policies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_policy_builds(path):
    assert load_policy(str(path), methods=MethodsConfig()) is not None
