"""Accountants: golden ε on methods.md's reference points, calibration, and ``raysim privacy``."""

import math

import pytest

from raysim.cli import main
from raysim.privacy import accounting

# (q, z, T, classic RDP, tighter RDP conversion, PLD) at delta = 1e-5: ../shared/reference/methods.md
REFERENCE = [
    (0.00426667, 1.12, 14062, 2.92, 2.52, 2.31),
    (0.00426667, 1.2, 2343, 1.20, 0.93, 0.79),
    (0.0354715, 1.2, 100, 2.42, 1.99, 1.71),
    (0.01, 4.0, 10000, 1.26, 1.04, 0.95),
]
# What Opacus 1.6 gives for them (rdp: the tighter-conversion column; prv: just above PLD).
GOLDEN = {"rdp": [2.5186, 0.9316, 1.9861, 1.0355], "prv": [2.3202, 0.8023, 1.7176, 0.9569]}


@pytest.mark.parametrize("name", accounting.ACCOUNTANTS)
@pytest.mark.parametrize("row", range(len(REFERENCE)))
def test_epsilon_lies_between_pld_and_two_percent_above_classic_rdp(name, row):
    q, z, t, classic, _, pld = REFERENCE[row]
    eps = accounting.epsilon(noise_multiplier=z, sample_rate=q, rounds=t, delta=1e-5, accountant=name)
    assert pld <= eps <= 1.02 * classic
    assert eps == pytest.approx(GOLDEN[name][row], abs=1e-3)


@pytest.mark.parametrize("name", accounting.ACCOUNTANTS)
def test_stepping_an_accountant_round_by_round_gives_the_planned_epsilon(name):
    acc = accounting.make_accountant(name)
    for _ in range(100):
        acc.step(noise_multiplier=1.2, sample_rate=0.0354715)
    planned = accounting.epsilon(noise_multiplier=1.2, sample_rate=0.0354715, rounds=100, delta=1e-5, accountant=name)
    assert accounting.spent(acc, delta=1e-5) == planned


def test_no_steps_spend_nothing_and_a_step_without_noise_spends_everything():
    acc = accounting.make_accountant("rdp")
    assert accounting.spent(acc, delta=1e-5) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.01)
    assert accounting.spent(acc, delta=1e-5) == math.inf


def test_unknown_accountant_is_rejected():
    with pytest.raises(ValueError, match="gdp"):
        accounting.make_accountant("gdp")


@pytest.mark.parametrize("name", accounting.ACCOUNTANTS)
def test_calibrated_noise_multiplier_reaches_the_target_within_tolerance(name):
    common = dict(sample_rate=0.0354715, rounds=100, delta=1e-5, accountant=name)
    z = accounting.noise_multiplier(target_epsilon=2.0, **common)
    assert 0.995 * 2.0 <= accounting.epsilon(noise_multiplier=z, **common) <= 2.0


def test_rounds_within_budget_is_the_last_round_at_or_below_it():
    common = dict(noise_multiplier=1.2, sample_rate=0.0354715, delta=1e-5)
    budget = accounting.epsilon(rounds=50, **common)
    assert accounting.rounds_within(max_epsilon=budget, rounds=100, **common) == 50
    assert accounting.rounds_within(max_epsilon=budget - 1e-9, rounds=100, **common) == 49
    assert accounting.rounds_within(max_epsilon=10.0, rounds=100, **common) == 100
    assert accounting.rounds_within(max_epsilon=0.01, rounds=100, **common) == 0


def _cli(capsys, *argv):
    code = main(["privacy", *argv])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err.strip().splitlines()


@pytest.mark.parametrize("name", accounting.ACCOUNTANTS)
def test_cli_prints_epsilon_last_for_each_reference_point(capsys, name):
    for q, z, t, classic, _, pld in REFERENCE:
        code, out, _ = _cli(capsys, "--noise-multiplier", str(z), "--sample-rate", str(q), "--rounds", str(t),
                            "--delta", "1e-5", "--accountant", name)
        assert code == 0 and out[-1].startswith("epsilon=")
        assert pld <= float(out[-1].split("=")[1]) <= 1.02 * classic


def test_cli_with_a_target_prints_the_noise_multiplier_last(capsys):
    code, out, _ = _cli(capsys, "--target-epsilon", "2", "--sample-rate", "0.0354715", "--rounds", "100",
                        "--delta", "1e-5")
    z = accounting.noise_multiplier(target_epsilon=2.0, sample_rate=0.0354715, rounds=100, delta=1e-5)
    assert code == 0 and out[-1] == f"noise_multiplier={z:.6g}"


@pytest.mark.parametrize("argv", [
    ["--noise-multiplier", "-1", "--sample-rate", "0.01", "--rounds", "10", "--delta", "1e-5"],
    ["--noise-multiplier", "1", "--sample-rate", "1.5", "--rounds", "10", "--delta", "1e-5"],
    ["--noise-multiplier", "1", "--target-epsilon", "2", "--sample-rate", "0.01", "--rounds", "10", "--delta", "1e-5"],
    ["--target-epsilon", "0.05", "--sample-rate", "0.5", "--rounds", "100", "--delta", "1e-5"],
])
def test_cli_bad_arguments_fail_with_one_line(capsys, argv):
    code, out, err = _cli(capsys, *argv)
    assert code != 0 and len(err) == 1 and not out


def test_cli_unparseable_number_fails_with_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["privacy", "--noise-multiplier", "x", "--sample-rate", "0.01", "--rounds", "10", "--delta", "1e-5"])
    assert exit_.value.code != 0 and len(capsys.readouterr().err.strip().splitlines()) == 1
