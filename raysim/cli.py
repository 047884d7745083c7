"""The ``raysim`` command line: ``run``, ``compare``, ``report``, ``train-policy``, ``synth``, ``profiles`` and
``privacy``.

Errors a user can cause (``ConfigError``, bad arguments) print as one line and
exit non-zero; any other failure prints one line too unless ``--debug`` asks
for the traceback.
"""

from __future__ import annotations

import argparse
import functools
import re
import signal
import sys
import threading
from collections.abc import Callable

from raysim.errors import ConfigError, describe_error


def _run(args: argparse.Namespace) -> int:
    from raysim.api import experiment_config
    from raysim.config import QUICKSTART, load_experiment, to_yaml
    from raysim.io import shipped

    path, overrides = args.experiment, list(args.overrides)
    if path is not None and re.match(r"[A-Za-z_][\w.]*=", path):  # no file, only overrides
        path, overrides = None, [path, *overrides]
    if args.resume is not None:
        if path is not None:
            raise ConfigError("give an experiment file or --resume RUN_DIR (which runs the run's config), not both")
        if args.overwrite:
            raise ConfigError("--resume continues a run and --overwrite replaces it: give one")
        cfg = experiment_config(None, overrides, resume=args.resume)  # continues in RUN_DIR, wherever it is now
    else:
        cfg = load_experiment(shipped.experiment(path) if path else QUICKSTART, overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from raysim.engine.run import run_experiment  # imports Ray: not needed to print a config

    run_dir = run_experiment(cfg, resume=args.resume is not None, overwrite=args.overwrite)
    print(f"run directory: {run_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from raysim.study.compare import load_study, run_study

    study_dir = run_study(load_study(args.study, list(args.overrides)))
    print(f"comparison: {study_dir / 'comparison.parquet'}\nreport: {study_dir / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysim.study.report import write_report

    dirs = []
    for given in map(Path, args.run_dirs):
        nested = sorted(p.parent for p in given.glob("runs/*/summary.json"))  # a study folder: its runs
        dirs += nested or [given]
    report = write_report(dirs, out_dir=Path(args.out), target=args.target,
                          unfinished="mark" if args.include_unfinished else "leave-out", overwrite=args.overwrite)
    print(f"report: {report}")
    return 0


def _train_policy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysim.config import load_experiment
    from raysim.study.train_policy import train_policy

    cfg = load_experiment(args.experiment, list(args.overrides))
    print(f"checkpoint: {train_policy(cfg, episodes=args.episodes, out=Path(args.out), overwrite=args.overwrite)}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from raysim.synth.command import synth_command

    return synth_command(args.experiment, list(args.overrides), out=args.out, overwrite=args.overwrite,
                         progress=not args.no_progress)


def _profiles(args: argparse.Namespace) -> int:
    from raysim.emulation.profiles import profiles_command

    return profiles_command([args.action or "list", *args.targets])


def _privacy(args: argparse.Namespace) -> int:
    """ε for (z, q, T, δ), or the z that reaches a target ε: the accounting a run does."""
    import math

    from raysim.privacy import accounting

    if (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise ConfigError("give exactly one of --noise-multiplier and --target-epsilon")
    checks = [(0 < args.sample_rate <= 1, "--sample-rate", "must be in (0, 1]"),
              (args.rounds >= 1, "--rounds", "must be >= 1"),
              (0 < args.delta < 1, "--delta", "must be in (0, 1)"),
              (args.noise_multiplier is None or 0 <= args.noise_multiplier < math.inf, "--noise-multiplier",
               "must be finite and >= 0"),
              (args.target_epsilon is None or 0 < args.target_epsilon < math.inf, "--target-epsilon",
               "must be finite and > 0"),
              (args.accountant in accounting.ACCOUNTANTS, "--accountant",
               f"must be {accounting.ACCOUNTANTS.choices()}")]
    for ok, name, message in checks:
        if not ok:
            raise ConfigError(message, field=name)
    common = dict(sample_rate=args.sample_rate, rounds=args.rounds, delta=args.delta, accountant=args.accountant)
    z = args.noise_multiplier
    if z is None:
        try:
            z = accounting.noise_multiplier(target_epsilon=args.target_epsilon, **common)
        except ValueError as err:
            raise ConfigError(f"epsilon {args.target_epsilon:g} is unreachable: {err}",
                              field="--target-epsilon") from None
    print(f"accountant={args.accountant} sample_rate={args.sample_rate:g} rounds={args.rounds} delta={args.delta:g}")
    print(f"epsilon={accounting.epsilon(noise_multiplier=z, **common):.6g}")
    if args.target_epsilon is not None:
        print(f"noise_multiplier={z:.6g}")
    return 0


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line and exit 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _debug_flag() -> argparse.ArgumentParser:
    """``--debug`` for every parser, so it may come before or after the subcommand.

    Its default is SUPPRESS: a subcommand that is not given the flag must not
    overwrite the ``True`` the top level parsed (``main`` reads a missing one as False).
    """
    flag = argparse.ArgumentParser(add_help=False)
    flag.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                      help="print the full traceback of an unexpected error")
    return flag


def _command(sub, name: str, *, help: str, examples: str, description: str | None = None,
             debug: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows a description and examples."""
    return sub.add_parser(name, help=help, description=description or help, parents=[debug],
                          epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    import raysim

    debug = _debug_flag()
    parser = _Parser(prog="raysim", description=raysim.__doc__.splitlines()[0], parents=[debug],
                     epilog="examples:\n  raysim run\n  raysim run experiments/dp_fedavg.yaml rounds=3\n"
                            "  raysim run --help",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"raysim {raysim.__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="raysim COMMAND --help shows its options and examples")
    cmd = functools.partial(_command, sub, debug=debug)
    _add_run(cmd)
    _add_compare(cmd)
    _add_report(cmd)
    _add_train_policy(cmd)
    _add_synth(cmd)
    _add_profiles(cmd("profiles", help="list, show or validate device classes and populations",
                      description="list, show or validate device classes and populations (default: list)",
                      examples="  raysim profiles list\n  raysim profiles show gboard\n"
                               "  raysim profiles validate my_phones.yaml"), debug)
    _add_privacy(cmd)
    return parser


def _add_run(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    run = cmd("run", help="run one experiment (default: the shipped quickstart)",
              examples="  raysim run\n"
                       "  raysim run experiments/dp_fedavg.yaml rounds=3 cohort.size=32\n"
                       "  raysim run --print-config experiments/quickstart.yaml rounds=5\n"
                       "  raysim run --resume runs/quickstart-20250101-120000 rounds=20")
    run.add_argument("experiment", nargs="?",
                     help="experiment YAML, or a shipped experiment's name: quickstart, dp_fedavg, private_lm, ... "
                          "(default: quickstart)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds=5 cohort.size=32")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace the run in output_dir (default: refuse)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config as YAML and run nothing")
    run.set_defaults(func=_run)


def _add_compare(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    compare = cmd("compare", help="run a comparison study (policies x seeds x populations)",
                  examples="  raysim compare experiments/compare_policies.yaml\n"
                           "  raysim compare experiments/compare_policies.yaml 'axes.seed=[0,1]' rounds=4 parallel=2")
    compare.add_argument("study", help="study YAML, e.g. experiments/compare_policies.yaml")
    compare.add_argument("overrides", nargs="*", help="key=value: experiment keys, or study keys (axes.seed=[0,1])")
    compare.set_defaults(func=_compare)


def _add_report(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    report = cmd("report", help="report.md and plots from finished runs (or study folders)",
                 examples="  raysim report runs/quickstart-20250101-120000 --out report\n"
                          "  raysim report runs/compare_policies --target 0.3 --include-unfinished")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder, or a study folder (its runs)")
    report.add_argument("--out", default="report", help="output folder (default: ./report)")
    report.add_argument("--target", type=float, help="target eval accuracy (default: each run's eval.target_accuracy)")
    report.add_argument("--include-unfinished", action="store_true",
                        help="average in runs that did not finish, marked (default: leave them out, listed)")
    report.add_argument("--overwrite", action="store_true",
                        help="replace a report already in the --out folder (default: refuse)")
    report.set_defaults(func=_report)


def _add_train_policy(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    train = cmd("train-policy", help="train the rl policy over several episodes and save it",
                examples="  raysim train-policy experiments/quickstart.yaml policy=rl --episodes 5 "
                         "--out runs/rl-policy.safetensors")
    train.add_argument("experiment", help="experiment YAML whose policy is an rl policy file")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    train.add_argument("--episodes", type=int, default=3, help="runs of the experiment to learn over (default: 3)")
    train.add_argument("--out", default="runs/rl-policy.safetensors",
                       help="checkpoint to write (default: runs/rl-policy.safetensors); the episodes' runs go "
                            "beside it (runs/rl-policy-episodes/)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the checkpoint and its episodes' runs (default: refuse)")
    train.set_defaults(func=_train_policy)


def _add_synth(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    synth = cmd("synth", help="make public pre-training data that resembles the users' (server side, public text)",
                description="run the synth steps (generated, filtered, transformed; refiltered once its DP run has "
                            "finished) an experiment or study names, cached under pretrain.cache_dir/synth; a run "
                            "whose pretrain.sources name them runs them itself",
                examples="  raysim synth experiments/public_data.yaml\n"
                         "  raysim synth experiments/public_data.yaml synth.generated=1000 --out runs/synth")
    synth.add_argument("experiment", help="experiment or study YAML")
    synth.add_argument("overrides", nargs="*", help="key=value overrides, e.g. synth.generated=1000")
    synth.add_argument("--out", help="also write each step's texts and a manifest.json to this folder")
    synth.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder (default: refuse)")
    synth.add_argument("--no-progress", action="store_true", help="no progress bars")
    synth.set_defaults(func=_synth)


def _add_privacy(cmd: Callable[..., argparse.ArgumentParser]) -> None:
    privacy = cmd("privacy", help="plan DP: epsilon for a noise multiplier, or the reverse",
                  description=_privacy.__doc__,
                  examples="  raysim privacy --noise-multiplier 1.2 --sample-rate 0.01 --rounds 100 --delta 1e-5\n"
                           "  raysim privacy --target-epsilon 2 --sample-rate 0.0002 --rounds 20 --delta 1e-6")
    privacy.add_argument("--noise-multiplier", type=float, help="z: noise std / clip norm")
    privacy.add_argument("--target-epsilon", type=float, help="print the z that reaches this epsilon instead")
    privacy.add_argument("--sample-rate", type=float, required=True, help="q: cohort.size / population (Poisson)")
    privacy.add_argument("--rounds", type=int, required=True, help="T: rounds (accountant steps)")
    privacy.add_argument("--delta", type=float, required=True, help="delta of the (epsilon, delta) guarantee")
    privacy.add_argument("--accountant", default="rdp", help="as privacy.accountant (default: rdp)")
    privacy.set_defaults(func=_privacy)


def _add_profiles(profiles: argparse.ArgumentParser, debug: argparse.ArgumentParser) -> None:
    """``profiles [list | show NAME | validate FILE...]``: bare ``profiles`` lists."""
    actions = profiles.add_subparsers(dest="action", title="actions", help="default: list")
    cmd = functools.partial(_command, actions, debug=debug)
    cmd("list", help="every device class and population on the search path, with its description",
        examples="  raysim profiles list")
    show = cmd("show", help="one device class or population: its distributions and mix",
               examples="  raysim profiles show gboard\n  raysim profiles show phone-mid\n"
                        "  raysim profiles show my_phones.yaml")
    show.add_argument("targets", nargs=1, metavar="NAME", help="a class or population name, or a .yaml path")
    validate = cmd("validate", help="check profile files; print ok FILE for each, stop at the first bad one",
                   examples="  raysim profiles validate my_phones.yaml my_population.yaml")
    validate.add_argument("targets", nargs="+", metavar="FILE", help="device class or population YAML")
    profiles.set_defaults(func=_profiles, targets=[])


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a run as Ctrl-C does: cleanly, with its state saved


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    try:
        return args.func(args)
    except ConfigError as err:
        if debug:
            raise
        print(f"raysim: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: one line unless --debug
        if debug:
            raise
        print(f"raysim: error: {describe_error(err)} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
