"""``raysim profiles [list | show NAME | validate FILE...]``: what is on the search path, one profile, checks."""

from __future__ import annotations

import sys

from raysim.emulation.profiles.population import FIELDS, DeviceClass, Population
from raysim.emulation.profiles.reader import PROFILE_DIRS, find, known, list_profiles, load_profile
from raysim.errors import ConfigError

USAGE = "usage: raysim profiles [list | show NAME | validate FILE...]"


def _format_list() -> str:
    lines, heading = [], None
    for kind, name, path in list_profiles():
        if kind != heading:
            heading = kind
            lines.append("device classes:" if kind == "device_class" else "populations:")
        lines.append(f"  {name:<20} {load_profile(path).description.strip().splitlines()[0]}")
    return "\n".join(lines)


def _format_class(cls: DeviceClass) -> str:
    lines = [f"device class {cls.name}  ({cls.file})", f"  {cls.description.strip()}"]
    for field in (*FIELDS, "availability"):
        value = getattr(cls, field)
        lines.append(f"  {field:<14} {value.describe()}")
        lines.append(f"  {'':<14} [{value.tag}] {value.source}")
    return "\n".join([*lines, *_format_budgets("", cls.budgets)])


def _format_budgets(scope: str, budgets: dict) -> list[str]:
    """One line per stated budget (``scope``: a population's ``all`` or class name; empty for a class's own)."""
    lines = []
    for key, value in budgets.items():
        name = f"budgets.{scope}.{key}" if scope else f"budgets.{key}"
        lines += [f"  {name} {value.describe()}", f"    [{value.tag}] {value.source}"]
    return lines


def _format_population(population: Population) -> str:
    width = max(len(cls.name) for cls in population.classes)
    header = f"  {'class':<{width}}  {'share':>6}" + "".join(f"  {field:>13}" for field in FIELDS)
    lines = [f"population {population.name}  ({population.file})", f"  {population.description.strip()}",
             f"  size {population.size}, virtual clock starts at {population.clock_start_h:g}h",
             "  classes, shares and medians:", header]
    for cls, share in zip(population.classes, population.shares):
        medians = "".join(f"  {getattr(cls, field).median:>13g}" for field in FIELDS)
        lines.append(f"  {cls.name:<{width}}  {share:>6.3f}{medians}")
    for scope, budgets in population.budgets.items():
        lines += _format_budgets(scope, budgets)
    return "\n".join(lines)


def _show(name: str) -> str:
    if name.endswith(".yaml"):
        profile = load_profile(name)
    elif path := find(name, "classes", PROFILE_DIRS) or find(name, "populations", PROFILE_DIRS):
        profile = load_profile(path)
    else:
        raise ConfigError(f"unknown profile '{name}' (device classes: {known('device_class')}; "
                          f"populations: {known('population')})")
    return _format_class(profile) if isinstance(profile, DeviceClass) else _format_population(profile)


def profiles_command(argv: list[str]) -> int:
    """``raysim profiles [list | show NAME | validate FILE...]`` (argv without 'profiles').

    Raises :class:`ConfigError` for the first invalid profile; the CLI prints it.
    """
    match argv:
        case [] | ["list"]:
            print(_format_list())
        case ["show", name]:
            print(_show(name))
        case ["validate", _, *_]:
            for file in argv[1:]:
                load_profile(file)
                print(f"ok {file}")
        case _:
            print(USAGE, file=sys.stderr)
            return 2
    return 0
