"""Privacy settings: every bad one fails with one clear message before any training."""

import pytest

from raysim.cli import main
from raysim.config import load_experiment
from raysim.errors import ConfigError
from raysim.privacy import accounting
from raysim.privacy.plan import plan_central

from conftest import TINY

DP = [*TINY, "cohort.sampling=poisson", "privacy.clip_norm=0.1"]


def _plan(*overrides):
    cfg = load_experiment(None, [*DP, *overrides])
    return plan_central(cfg.privacy, rounds=cfg.rounds, cohort_size=cfg.cohort.size,
                        population_size=cfg.population_size)


@pytest.mark.parametrize("overrides, field", [
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["privacy.clip_norm=0"], "privacy.clip_norm"),
    (["privacy.accountant=gdp"], "privacy.accountant"),
    (["privacy.delta=1"], "privacy.delta"),
    (["privacy.target_epsilon=2", "privacy.noise_multiplier=1"], "privacy.target_epsilon"),
    (["cohort.sampling=fixed"], "cohort.sampling"),
    (["privacy.clip_norm=null", "privacy.noise_multiplier=1"], "privacy.clip_norm"),
    (["privacy.adaptive_clipping.target_quantile=1.5"], "privacy.adaptive_clipping.target_quantile"),
    (["privacy.local.clip_norm=-1"], "privacy.local.clip_norm"),
])
def test_bad_static_setting_names_its_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [*DP, *overrides])
    assert err.value.field == field


def test_fixed_size_cohorts_say_which_accounting_applies():
    with pytest.raises(ConfigError, match="Poisson sampling with q = cohort.size / population"):
        load_experiment(None, [*DP, "cohort.sampling=fixed"])


@pytest.mark.parametrize("overrides, field", [
    (["privacy.delta=0.001"], "privacy.delta"),  # not below 1 / 1000 devices
    (["privacy.target_epsilon=0.05"], "privacy.target_epsilon"),  # below what RDP certifies
    (["privacy.noise_multiplier=1", "privacy.max_epsilon=0.01"], "privacy.max_epsilon"),  # not one round
    (["privacy.noise_multiplier=1", "privacy.adaptive_clipping.enabled=true"],
     "privacy.adaptive_clipping.count_std"),  # cohort 4 / 20 = 0.2 < z / 2
])
def test_bad_population_dependent_setting_fails_before_training(overrides, field):
    with pytest.raises(ConfigError) as err:
        _plan(*overrides)
    assert err.value.field == field


def test_cli_run_with_a_bad_privacy_setting_exits_with_one_line_before_training(capsys, tmp_path):
    code = main(["run", *DP, f"output_dir={tmp_path / 'run'}", "privacy.delta=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "privacy.delta" in err[0]
    assert not (tmp_path / "run").exists()


def test_no_clip_norm_means_no_central_dp():
    assert plan_central(load_experiment(None, TINY).privacy, rounds=3, cohort_size=4, population_size=1000) is None


def test_target_epsilon_calibrates_the_noise_multiplier_for_all_rounds():
    plan = _plan("privacy.target_epsilon=3", "rounds=20")
    assert plan.sample_rate == 4 / 1000 and plan.expected_devices == 4
    assert plan.noise_multiplier == accounting.noise_multiplier(target_epsilon=3, sample_rate=0.004, rounds=20,
                                                                delta=1e-6)
    assert plan.epsilon <= 3 and plan.rounds == 20


def test_max_epsilon_plans_the_last_round_within_budget():
    budget = accounting.epsilon(noise_multiplier=1.0, sample_rate=0.004, rounds=2, delta=1e-6)
    plan = _plan("privacy.noise_multiplier=1", f"privacy.max_epsilon={budget}", "rounds=5")
    assert plan.rounds == 2 and plan.epsilon == budget


def test_adaptive_clipping_spends_part_of_the_budget_on_the_count():
    plan = _plan("privacy.noise_multiplier=1", "privacy.adaptive_clipping.enabled=true",
                 "privacy.adaptive_clipping.count_std=2")
    assert plan.noise_multiplier == 1 and plan.update_noise_multiplier > 1 and plan.count_std == 2


def test_dp_fedavg_is_assembled_from_the_config_when_a_clip_norm_is_set():
    from raysim.privacy import mechanisms

    cfg = load_experiment(None, [*DP, "privacy.noise_multiplier=1.0"])
    privacy = mechanisms.assemble(cfg, population_size=1000)
    assert privacy.name == "dp_fedavg" and privacy.rounds == cfg.rounds and privacy.delta == cfg.privacy.delta
    assert privacy.describe(cfg).startswith("DP-FedAvg: noise multiplier 1, clip norm 0.1")
    section = mechanisms.summary(privacy, cfg, noised_dims=7)
    assert section["central_dp"] and section["mechanism"] == "dp_fedavg" and section["noised_dims"] == 7
    assert mechanisms.assemble(load_experiment(None, TINY), population_size=1000) is None
    assert mechanisms.summary(None, cfg, noised_dims=0) == {"central_dp": False, "local_dp": False}


@pytest.mark.parametrize("override, key, message", [
    ("privacy.mechanism=laplace", "privacy.mechanism", "must be 'dp_fedavg' (or null)"),
    ("privacy.mechanism=dp_fedavg", "privacy.clip_norm", "dp_fedavg needs a clip norm"),
])
def test_a_bad_mechanism_is_one_error_naming_its_key(override, key, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [*TINY, override])
    assert err.value.field == key and message in str(err.value)
