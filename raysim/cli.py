"""The ``raysim`` command line: ``run``, ``compare``, ``report``, ``train-policy`` and ``profiles``.

Errors a user can cause (``ConfigError``) print as one line and exit 1; any
other failure prints one line too unless ``--debug`` asks for the traceback.
"""

from __future__ import annotations

import argparse
import re
import sys

from raysim.errors import ConfigError


def _run(args: argparse.Namespace) -> int:
    from raysim.config import QUICKSTART, load_experiment
    from raysim.run import run_experiment

    path, overrides = args.experiment, list(args.overrides)
    if path is not None and re.match(r"[A-Za-z_][\w.]*=", path):  # no file, only overrides
        path, overrides = None, [path, *overrides]
    cfg = load_experiment(path or QUICKSTART, overrides)
    run_dir = run_experiment(cfg)
    print(f"run directory: {run_dir}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from raysim.compare import load_study, run_study

    study_dir = run_study(load_study(args.study, list(args.overrides)))
    print(f"comparison: {study_dir / 'comparison.parquet'}\nreport: {study_dir / 'report.md'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysim.report import write_report

    dirs = []
    for given in map(Path, args.run_dirs):
        nested = sorted(p.parent for p in given.glob("runs/*/summary.json"))  # a study folder: its runs
        dirs += nested or [given]
    print(f"report: {write_report(dirs, out_dir=Path(args.out), target=args.target)}")
    return 0


def _train_policy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raysim.config import load_experiment
    from raysim.train_policy import train_policy

    cfg = load_experiment(args.experiment, list(args.overrides))
    print(f"checkpoint: {train_policy(cfg, episodes=args.episodes, out=Path(args.out))}")
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from raysim.profiles import profiles_command

    return profiles_command(list(args.args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raysim", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one experiment (default: the shipped quickstart)")
    run.add_argument("experiment", nargs="?", help="experiment YAML (default: experiments/quickstart.yaml)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. rounds=5 cohort.size=32")
    run.set_defaults(func=_run)
    compare = sub.add_parser("compare", help="run a comparison study (policies x seeds x populations)")
    compare.add_argument("study", help="study YAML, e.g. experiments/compare_policies.yaml")
    compare.add_argument("overrides", nargs="*", help="key=value: experiment keys, or study keys (axes.seed=[0,1])")
    compare.set_defaults(func=_compare)
    report = sub.add_parser("report", help="report.md and plots from finished runs (or study folders)")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", default="report", help="output folder (default: ./report)")
    report.add_argument("--target", type=float, help="target eval accuracy (default: each run's eval.target_accuracy)")
    report.set_defaults(func=_report)
    train = sub.add_parser("train-policy", help="train the rl policy over several episodes and save it")
    train.add_argument("experiment", help="experiment YAML whose policy is an rl policy file")
    train.add_argument("overrides", nargs="*", help="key=value overrides")
    train.add_argument("--episodes", type=int, default=3)
    train.add_argument("--out", default="runs/rl-policy.pt", help="checkpoint to write (default: runs/rl-policy.pt)")
    train.set_defaults(func=_train_policy)
    profiles = sub.add_parser("profiles", help="list | show NAME | validate FILE...")
    profiles.add_argument("args", nargs="*")
    profiles.set_defaults(func=_profiles)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"raysim: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("raysim: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: one line unless --debug
        if args.debug:
            raise
        print(f"raysim: error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
