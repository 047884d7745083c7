"""Bad input: one clear line naming file and field, non-zero exit, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from raysim.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _population(tmp_path, *, class_text=None, classes="{bad-phone: 1.0}"):
    (tmp_path / "classes").mkdir(exist_ok=True)
    (tmp_path / "populations").mkdir(exist_ok=True)
    good = (ROOT / "device_profiles" / "classes" / "phone-mid.yaml").read_text().replace("phone-mid", "bad-phone")
    (tmp_path / "classes" / "bad-phone.yaml").write_text(class_text(good) if class_text else good)
    pop = tmp_path / "populations" / "pop.yaml"
    pop.write_text(f"kind: population\nname: pop\ndescription: test\nsize: 100\nclock_start_h: 0\nclasses: {classes}\n")
    return pop


def _error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_negative_bandwidth_names_the_class_file_and_field(tmp_path, capsys):
    import re

    pop = _population(tmp_path, class_text=lambda t: re.sub(r"uplink_mbps: *\{[^}]*\}",
                      'uplink_mbps: {dist: fixed, value: -3, tag: assumption, source: "x"}', t))
    code, err = _error(capsys, "run", f"population={pop}")
    assert code == 1 and len(err) == 1
    assert "bad-phone.yaml" in err[0] and "uplink_mbps" in err[0]


def test_missing_field_is_named(tmp_path, capsys):
    import re

    pop = _population(tmp_path, class_text=lambda t: re.sub(r"\nrtt_ms:.*", "", t))
    code, err = _error(capsys, "run", f"population={pop}")
    assert code == 1 and len(err) == 1 and "rtt_ms" in err[0]


def test_unknown_class_in_a_population_is_named(tmp_path, capsys):
    pop = _population(tmp_path, classes="{bad-phone: 0.5, no-such-phone: 0.5}")
    code, err = _error(capsys, "run", f"population={pop}")
    assert code == 1 and len(err) == 1 and "pop.yaml" in err[0] and "no-such-phone" in err[0]


def test_unknown_experiment_key_is_named(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    exp.write_text("rounds: 2\ncohort:\n  size: 4\n  deadline: 3\n")
    code, err = _error(capsys, "run", str(exp))
    assert code == 1 and len(err) == 1 and "exp.yaml" in err[0] and "cohort.deadline" in err[0]


def test_missing_population_file_is_named(tmp_path, capsys):
    code, err = _error(capsys, "run", f"population={tmp_path / 'nope.yaml'}")
    assert code == 1 and len(err) == 1 and "nope.yaml" in err[0]


def test_console_script_exits_non_zero_without_a_traceback(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("roundz: 2\n")
    proc = subprocess.run([sys.executable, "-m", "raysim.cli", "run", str(exp)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "roundz" in proc.stderr


@pytest.mark.parametrize("argv", [["profiles", "list"], ["profiles", "show", "gboard"]])
def test_profiles_subcommands_succeed(argv, capsys):
    assert main(argv) == 0
    assert "phone-mid" in capsys.readouterr().out
