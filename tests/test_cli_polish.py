"""The command line's manners: --version, --debug anywhere, helpful --help, one-line errors, --print-config.

None of these needs Ray: every test stops before a run would start.
"""

from __future__ import annotations

import argparse
import sys

import pytest

import raysim
from raysim.cli import build_parser, main
from raysim.config import QUICKSTART, load_experiment, to_yaml
from raysim.emulation.profiles import SHIPPED_PROFILES
from raysim.errors import ConfigError


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def exit_of(argv, capsys) -> tuple[int, str, str]:
    """The exit code and output of a command that ends in argparse's SystemExit (--help, --version, bad args)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def subcommands(parser: argparse.ArgumentParser, prefix: str = "raysim") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (command line, parser) below ``parser``: ``raysim run``, ``raysim profiles show``, ..."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{prefix} {name}", sub), *subcommands(sub, f"{prefix} {name}")]
    return found


SUBCOMMANDS = subcommands(build_parser())
PARSERS = [("raysim", build_parser()), *SUBCOMMANDS]


@pytest.fixture
def no_run(monkeypatch):
    """Importing raysim.engine.run (the only way to a run, and to Ray) fails the test."""
    monkeypatch.setitem(sys.modules, "raysim.engine.run", None)


def test_version_prints_the_package_version_and_exits_0(capsys):
    assert exit_of(["--version"], capsys) == (0, f"raysim {raysim.__version__}\n", "")


@pytest.mark.parametrize("argv", [
    ["--debug", "run", "--print-config"],
    ["run", "--debug", "--print-config"],
    ["run", "--print-config", "rounds=2", "--debug"],
], ids=["before", "after", "last"])
def test_debug_anywhere_lets_an_unexpected_error_raise_with_its_traceback(argv, monkeypatch, capsys):
    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr("raysim.config.to_yaml", broken)
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


def test_without_debug_an_unexpected_error_is_one_line(monkeypatch, capsys):
    def broken(cfg):
        raise RuntimeError("boom")

    monkeypatch.setattr("raysim.config.to_yaml", broken)
    code, err, _ = run_cli(["run", "--print-config"], capsys)
    assert code == 1 and err == ["raysim: error: RuntimeError: boom (rerun with --debug for the traceback)"]


@pytest.mark.parametrize("argv", [["profiles", "--debug", "list"], ["profiles", "list", "--debug"]])
def test_debug_is_accepted_after_a_nested_subcommand(argv, capsys):
    assert main(argv) == 0
    assert "phone-mid" in capsys.readouterr().out


def test_every_subcommand_is_covered_by_the_help_checks():
    assert {line for line, _ in SUBCOMMANDS} == {
        "raysim run", "raysim compare", "raysim report", "raysim train-policy", "raysim profiles",
        "raysim privacy", "raysim profiles list", "raysim profiles show", "raysim profiles validate",
        "raysim synth"}


@pytest.mark.parametrize("line, parser", PARSERS, ids=[line for line, _ in PARSERS])
def test_every_command_help_has_a_description_and_an_example(line, parser, capsys):
    code, out, _ = exit_of([*line.split()[1:], "--help"], capsys)
    assert code == 0 and parser.description
    assert f"{parser.description.splitlines()[0]}\n" in out
    examples = out.split("\nexamples:\n", 1)[1].splitlines()
    assert examples and all(example.startswith(f"  {line}") for example in examples)  # one per line, as written


@pytest.mark.parametrize("line, parser", PARSERS, ids=[line for line, _ in PARSERS])
def test_every_option_and_positional_has_help_text(line, parser):
    assert [a.dest for a in parser._actions if not a.help] == []


def test_profiles_help_names_its_actions_instead_of_args(capsys):
    _, out, _ = exit_of(["profiles", "--help"], capsys)
    assert "args" not in out
    assert "usage: raysim profiles [-h] [--debug] {list,show,validate} ..." in out
    for action in ("list", "show", "validate"):
        assert f"\n    {action} " in out


def test_bare_profiles_lists_as_profiles_list_does(capsys):
    assert main(["profiles"]) == 0
    bare = capsys.readouterr().out
    assert main(["profiles", "list"]) == 0
    assert capsys.readouterr().out == bare and "phone-mid" in bare


def test_profiles_validate_checks_every_file_given(capsys):
    files = [str(SHIPPED_PROFILES / sub / name) for sub, name in [("classes", "phone-mid.yaml"),
                                                                   ("populations", "gboard.yaml")]]
    assert main(["profiles", "validate", *files]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ok {f}" for f in files]


@pytest.mark.parametrize("argv, message", [
    (["profiles", "show"], "raysim profiles show: error: the following arguments are required: NAME "
                           "(see raysim profiles show --help)"),
    (["profiles", "show", "gboard", "phone-mid"], "raysim: error: unrecognized arguments: phone-mid "
                                                  "(see raysim --help)"),
    (["profiles", "validate"], "raysim profiles validate: error: the following arguments are required: FILE "
                               "(see raysim profiles validate --help)"),
])
def test_profiles_with_missing_or_extra_arguments_is_one_line_and_exit_2(argv, message, capsys):
    code, _, err = exit_of(argv, capsys)
    assert code == 2 and err.splitlines() == [message]


@pytest.mark.parametrize("override, line", [
    ("cohort.deadline=3", "override: cohort.deadline: unknown key (did you mean cohort.deadline_s?)"),
    ("roundz=3", "override: roundz: unknown key (did you mean rounds?)"),
    ("privacy.local.enabld=true", "override: privacy.local.enabld: unknown key (did you mean privacy.local.enabled?)"),
    ("train.epochs=3", "override: train.epochs: unknown key"),  # nothing close: no guess
])
def test_an_unknown_override_key_suggests_the_close_key_of_its_section(override, line, tmp_path, capsys, no_run):
    _assert_one_line_and_no_run(override, line, tmp_path, capsys)


def _assert_one_line_and_no_run(override, line, tmp_path, capsys):
    out = tmp_path / "run"
    code, err, _ = run_cli(["run", override, f"output_dir={out}"], capsys)
    assert code == 1 and err == [f"raysim: error: {line}"]
    assert not out.exists()


def test_an_unknown_key_in_a_file_suggests_the_close_key(tmp_path, capsys, no_run):
    exp = tmp_path / "exp.yaml"
    exp.write_text("rounds: 2\ncohort:\n  size: 4\n  deadline: 3\n")
    code, err, _ = run_cli(["run", str(exp)], capsys)
    assert code == 1
    assert err == [f"raysim: error: {exp}: cohort.deadline: unknown key (did you mean cohort.deadline_s?)"]


def test_an_unknown_key_in_a_study_layer_suggests_the_close_key():
    with pytest.raises(ConfigError) as err:
        load_experiment(None, layers=[("study.yaml: axes", {"cohort": {"deadline": 1}})])
    assert str(err.value) == "study.yaml: axes: cohort.deadline: unknown key (did you mean cohort.deadline_s?)"


@pytest.mark.parametrize("override, line", [
    ("methods.lora_rank=[8", "override: methods.lora_rank: cannot parse value '[8': did not find expected ',' or ']'"),
    ("cohort.size='3", "override: cohort.size: cannot parse value \"'3\": found unexpected end of stream"),
    ("methods.bits=[8,4]]", "override: methods.bits: cannot parse value '[8,4]]': did not find expected "
                            "<document start>"),
])
def test_a_malformed_override_value_is_one_line_naming_the_override(override, line, tmp_path, capsys, no_run):
    _assert_one_line_and_no_run(override, line, tmp_path, capsys)


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys, no_run):
    out = tmp_path / "run"
    overrides = ["rounds=3", "cohort.size=5", f"output_dir={out}"]
    code, err, printed = run_cli(["run", "--print-config", str(QUICKSTART), *overrides], capsys)
    cfg = load_experiment(QUICKSTART, overrides)
    assert (code, err, printed) == (0, [], to_yaml(cfg))
    assert not out.exists()
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert load_experiment(again) == cfg  # what it prints is a config file that runs the same experiment


def test_print_config_without_a_file_prints_the_quickstart_with_overrides(capsys, no_run):
    code, _, printed = run_cli(["run", "--print-config", "rounds=4"], capsys)
    assert code == 0 and printed == to_yaml(load_experiment(QUICKSTART, ["rounds=4"]))


def test_print_config_of_a_resume_prints_the_runs_config_with_overrides(tmp_path, capsys, no_run):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(load_experiment(QUICKSTART, ["rounds=2"])))
    code, _, printed = run_cli(["run", "--print-config", "--resume", str(run_dir), "rounds=6"], capsys)
    # the run continues in RUN_DIR, wherever its config said it was written
    want = load_experiment(QUICKSTART, ["rounds=6", f"output_dir={run_dir.absolute()}"])
    assert code == 0 and printed == to_yaml(want)


@pytest.mark.parametrize("override, line", [
    ("cohort.size=0", "raysim: error: override: cohort.size: must be >= 1"),
    ("train.lr=inf", "raysim: error: override: train.lr: must be finite (got inf)"),
])
def test_print_config_validates_as_a_run_does(override, line, capsys, no_run):
    code, err, printed = run_cli(["run", "--print-config", override], capsys)
    assert (code, err, printed) == (1, [line], "")
