"""Device profiles: shipped YAML, keyed lazy draws, validation errors, the CLI."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.emulation.profiles import (
    PROFILE_DIRS,
    list_profiles,
    load_class,
    load_population,
    load_profile,
    profiles_command,
)
from raysim.errors import ConfigError

SHIPPED_ROOT = PROFILE_DIRS[-1]
SHIPPED = sorted(SHIPPED_ROOT.glob("*/*.yaml"))
N = 20_000


@pytest.fixture(scope="module")
def gboard():
    return load_population("gboard")


def _phone_mid() -> dict:
    return yaml.safe_load((SHIPPED_ROOT / "classes" / "phone-mid.yaml").read_text())


def _write(root: Path, spec: dict) -> Path:
    folder = "classes" if spec["kind"] == "device_class" else "populations"
    path = root / folder / f"{spec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _population(root: Path, classes: dict, name: str = "mix") -> Path:
    spec = {"kind": "population", "name": name, "description": "test mix", "size": N,
            "clock_start_h": 22, "classes": classes}
    return _write(root, spec)


# ---- shipped library ------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_profile_validates(path):
    assert load_profile(path).name == path.stem


def test_shipped_library_has_proposed_classes_and_populations():
    names = {(kind, name) for kind, name, _ in list_profiles()}
    classes = {"phone-low", "phone-mid", "phone-high", "rpi4-4gb", "rpi5-8gb",
               "jetson-nano-4gb", "jetson-tx2", "jetson-orin-nano"}
    populations = {"gboard", "iot-edge", "phones-low-memory"}
    assert {("device_class", c) for c in classes} | {("population", p) for p in populations} <= names


# ---- draws ----------------------------------------------------------------------


def _row(draws, i: int) -> tuple:
    """Device ``i``'s draw, every field (and every budget, where the population states any)."""
    values = [getattr(draws, f.name)[i] for f in dataclasses.fields(draws) if f.name != "budgets"]
    if draws.budgets is not None:
        values += [getattr(draws.budgets, f.name)[i] for f in dataclasses.fields(draws.budgets)]
    return tuple(values)


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, 99_999), min_size=1, max_size=20, unique=True), seed=st.integers(0, 2**40))
def test_device_draw_is_independent_of_other_ids_and_their_order(gboard, ids, seed):
    together = gboard.draw(np.array(ids), seed=seed)
    backwards = gboard.draw(np.array(ids[::-1]), seed=seed)
    for j, device in enumerate(ids):
        alone = _row(gboard.draw(np.array([device]), seed=seed), 0)
        assert _row(together, j) == alone
        assert _row(backwards, len(ids) - 1 - j) == alone


def test_different_seeds_give_different_draws(gboard):
    ids = np.arange(1000)
    a, b = gboard.draw(ids, seed=0), gboard.draw(ids, seed=1)
    assert np.mean(a.device_class != b.device_class) > 0.3
    assert not np.any(a.uplink_bps == b.uplink_bps)


def test_class_shares_match_population_within_sampling_error(gboard):
    drawn = gboard.draw(np.arange(N), seed=7).device_class
    for cls, share in zip(gboard.classes, gboard.shares):
        assert np.mean(drawn == cls.name) == pytest.approx(share, abs=4 * np.sqrt(share * (1 - share) / N))


def test_lognormal_medians_match_class_within_three_percent(tmp_path):
    population = load_population(_population(tmp_path, {"phone-mid": 1.0}))
    draws = population.draw(np.arange(N), seed=3)
    assert np.median(draws.train_flops_per_s) / 1e9 == pytest.approx(8, rel=0.03)
    assert np.median(draws.memory_bytes) / 2**30 == pytest.approx(1.5, rel=0.03)
    assert np.median(draws.uplink_bps) / 1e6 == pytest.approx(6, rel=0.03)
    assert np.median(draws.downlink_bps) / 1e6 == pytest.approx(13, rel=0.03)
    assert np.median(draws.rtt_s) * 1e3 == pytest.approx(30, rel=0.03)


def test_profile_fields_are_drawn_independently(tmp_path):
    draws = load_population(_population(tmp_path, {"phone-mid": 1.0})).draw(np.arange(N), seed=3)
    columns = [draws.train_flops_per_s, draws.memory_bytes, draws.uplink_bps, draws.downlink_bps, draws.rtt_s]
    correlation = np.corrcoef(np.log(columns))
    assert np.all(np.abs(correlation[np.triu_indices(len(columns), 1)]) < 0.04)


def test_draws_are_converted_to_si_units(tmp_path):
    fixed = {field: {"dist": "fixed", "value": value, "tag": "assumption", "source": "test"}
             for field, value in [("train_gflops", 2.5), ("memory_gib", 1.5), ("uplink_mbps", 4),
                                  ("downlink_mbps", 8), ("rtt_ms", 30), ("dropout", 0.1)]}
    _write(tmp_path, {**_phone_mid(), **fixed, "name": "fixed-phone"})
    device = load_population(_population(tmp_path, {"fixed-phone": 1.0})).draw(np.array([5]), seed=0)
    assert (int(device.device_id[0]), str(device.device_class[0])) == (5, "fixed-phone")
    assert device.train_flops_per_s[0] == 2.5e9
    assert device.memory_bytes[0] == 1.5 * 2**30
    assert (device.uplink_bps[0], device.downlink_bps[0]) == (4e6, 8e6)
    assert device.rtt_s[0] == pytest.approx(0.030)
    assert device.dropout_prob[0] == 0.1


def test_choice_distribution_draws_values_by_weight(tmp_path):
    choice = {"dist": "choice", "values": [1, 2], "weights": [3, 1], "tag": "assumption", "source": "test"}
    _write(tmp_path, {**_phone_mid(), "memory_gib": choice, "name": "choice-phone"})
    memory = load_population(_population(tmp_path, {"choice-phone": 1.0})).draw(np.arange(N), seed=0).memory_bytes
    assert set(np.unique(memory)) == {2**30, 2 * 2**30}
    assert np.mean(memory == 2**30) == pytest.approx(0.75, abs=0.015)


# ---- availability ---------------------------------------------------------------


def test_phones_are_four_times_as_available_at_night_as_by_day(gboard):
    ids = np.arange(N)
    night = gboard.available(ids, seed=0, round=0, sim_time_s=0.0).mean()  # 22h
    day = gboard.available(ids, seed=0, round=1, sim_time_s=12 * 3600.0).mean()  # 10h
    assert night == pytest.approx(0.20, abs=0.012)
    assert day == pytest.approx(0.05, abs=0.006)
    assert night / day == pytest.approx(4, rel=0.15)


def test_night_window_wraps_midnight():
    availability = load_class("phone-mid").availability
    assert [availability.probability(h) for h in (22, 23.5, 0, 5.9)] == [0.20] * 4
    assert [availability.probability(h) for h in (6, 12, 21.9)] == [0.05] * 3


def test_availability_is_redrawn_each_round(gboard):
    ids = np.arange(N)
    first = gboard.available(ids, seed=0, round=0, sim_time_s=0.0)
    second = gboard.available(ids, seed=0, round=1, sim_time_s=0.0)
    assert 0 < np.mean(first != second) < 0.5


# ---- population size ------------------------------------------------------------


def test_million_device_population_draws_its_last_ids():
    population = load_population("iot-edge", size=10**6)
    ids = np.arange(10**6 - 5, 10**6)
    draws = population.draw(ids, seed=0)
    assert np.array_equal(draws.device_id, ids)
    assert np.all(draws.train_flops_per_s > 0)


@pytest.mark.parametrize("bad", [[10**6], [-1], [0.5]])
def test_ids_outside_population_are_rejected(bad):
    with pytest.raises(ValueError, match="device ids"):
        load_population("iot-edge", size=10**6).draw(np.array(bad), seed=0)


def test_million_device_population_stores_nothing_per_device():
    tracemalloc.start()
    load_population("gboard", size=10**6)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 2**20  # one float per device would be 8 MB


def test_size_override_must_be_positive():
    with pytest.raises(ConfigError, match="positive integer") as err:
        load_population("gboard", size=0)
    assert err.value.field == "size"


# ---- validation -----------------------------------------------------------------


CLASS_ERRORS = {
    "uplink_mbps.median": lambda s: s["uplink_mbps"].update(median=-5),
    "train_gflops.value": lambda s: s.update(train_gflops={"dist": "fixed", "value": 0, "tag": "measured",
                                                            "source": "x"}),
    "rtt_ms": lambda s: s.pop("rtt_ms"),
    "colour": lambda s: s.update(colour="red"),
    "memory_gib.sigma": lambda s: s["memory_gib"].update(sigma=-0.1),
    "downlink_mbps.median": lambda s: s["downlink_mbps"].update(median="fast"),
    "dropout.value": lambda s: s["dropout"].update(value=1.5),
    "dropout.source": lambda s: s["dropout"].pop("source"),
    "train_gflops.tag": lambda s: s["train_gflops"].update(tag="guess"),
    "train_gflops.dist": lambda s: s["train_gflops"].update(dist="gamma"),
    "availability.night": lambda s: s["availability"].update(night=2),
    "kind": lambda s: s.update(kind="population"),
    "name": lambda s: s.update(name="other"),
}


@pytest.mark.parametrize("field", CLASS_ERRORS)
def test_invalid_class_raises_config_error_naming_file_and_field(tmp_path, field):
    spec = _phone_mid()
    CLASS_ERRORS[field](spec)
    path = tmp_path / "classes" / "phone-mid.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_class(path)
    assert (err.value.file, err.value.field) == (str(path), field)
    assert str(path) in str(err.value) and field in str(err.value)


def test_zero_rtt_is_accepted(tmp_path):
    spec = _phone_mid()
    spec["rtt_ms"].update(median=0)
    assert load_class(_write(tmp_path, spec)).rtt_ms.median == 0


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("kind: device_class\nname: [unclosed\n")
    with pytest.raises(ConfigError, match="YAML syntax error at line") as err:
        load_profile(path)
    assert err.value.file == str(path)


def test_unknown_class_in_population_names_population_file_and_class(tmp_path):
    path = _population(tmp_path, {"phone-mid": 0.5, "phone-ultra": 0.5})
    with pytest.raises(ConfigError, match="unknown device class 'phone-ultra'") as err:
        load_population(path)
    assert (err.value.file, err.value.field) == (str(path), "classes.phone-ultra")


def test_population_shares_must_sum_to_one(tmp_path):
    path = _population(tmp_path, {"phone-mid": 0.5, "phone-low": 0.4})
    with pytest.raises(ConfigError, match="sum to 1") as err:
        load_population(path)
    assert (err.value.file, err.value.field) == (str(path), "classes")


def test_missing_population_file_is_named(tmp_path):
    path = tmp_path / "populations" / "nope.yaml"
    with pytest.raises(ConfigError, match="file not found") as err:
        load_population(path)
    assert str(path) in str(err.value)


def test_unknown_population_name_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown population 'nope'.*gboard"):
        load_population("nope")


def test_profile_in_working_directory_shadows_shipped_one(tmp_path, monkeypatch):
    spec = _phone_mid()
    spec["train_gflops"].update(median=99)
    _write(tmp_path / "device_profiles", spec)
    monkeypatch.chdir(tmp_path)
    assert load_class("phone-mid").train_gflops.median == 99


def test_population_resolves_classes_in_its_own_root_first(tmp_path):
    spec = _phone_mid()
    spec["train_gflops"].update(median=99)
    _write(tmp_path, spec)
    population = load_population(_population(tmp_path, {"phone-mid": 0.5, "phone-low": 0.5}))
    assert [cls.train_gflops.median for cls in population.classes] == [99, 3]
    assert population.classes[1].file == SHIPPED_ROOT / "classes" / "phone-low.yaml"


# ---- CLI ------------------------------------------------------------------------


def test_show_population_mentions_each_class(capsys, gboard):
    assert profiles_command(["show", "gboard"]) == 0
    out = capsys.readouterr().out
    assert all(cls.name in out for cls in gboard.classes)


def test_show_class_prints_each_field_with_tag_and_source(capsys):
    assert profiles_command(["show", "phone-mid"]) == 0
    out = capsys.readouterr().out
    for field in ("train_gflops", "memory_gib", "uplink_mbps", "downlink_mbps", "rtt_ms", "dropout", "availability"):
        assert field in out
    assert "[reported] Das et al." in out


def test_list_is_the_default_and_names_every_profile(capsys):
    assert profiles_command([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for _, name, _ in list_profiles())


def test_validate_prints_ok_per_file(capsys):
    files = [str(p) for p in SHIPPED[:2]]
    assert profiles_command(["validate", *files]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok {f}" for f in files]


def test_validate_raises_for_an_invalid_file(tmp_path):
    spec = _phone_mid()
    spec["uplink_mbps"].update(median=-1)
    with pytest.raises(ConfigError, match="uplink_mbps.median"):
        profiles_command(["validate", str(SHIPPED[0]), str(_write(tmp_path, spec))])


def test_unknown_subcommand_prints_usage_and_returns_2(capsys):
    assert profiles_command(["frobnicate"]) == 2
    assert "usage: raysim profiles" in capsys.readouterr().err
