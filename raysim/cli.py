"""The ``raysim`` command line: ``run`` and ``profiles``.

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
