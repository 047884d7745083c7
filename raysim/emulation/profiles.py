"""Device classes and populations from YAML, drawn lazily per device.

A *class* (``device_profiles/classes/<name>.yaml``) gives one distribution per
profile field, each with a provenance tag and a source; a *population*
(``device_profiles/populations/<name>.yaml``) mixes classes with shares. Device
``i``'s class and values are pure functions of ``(seed, i)`` through
:mod:`raysim.rng`, so a population of 10^6 devices stores nothing per device.
The file format is documented in ``device_profiles/README.md``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raysim import rng
from raysim.errors import ConfigError
from raysim.io import shipped
from raysim.types import DeviceDraws

SHIPPED_PROFILES = shipped.folder("device_profiles")
PROFILE_DIRS: tuple[Path, ...] = (
    Path("device_profiles"),  # relative: resolved against the working directory when used
    SHIPPED_PROFILES,
)
TAGS = ("measured", "derived", "reported", "assumption")

_Bound = tuple[Callable[[float], bool], str]
_POSITIVE: _Bound = (lambda x: x > 0, "must be > 0")
_NON_NEGATIVE: _Bound = (lambda x: x >= 0, "must be >= 0")
_PROBABILITY: _Bound = (lambda x: 0 <= x <= 1, "must be a probability in [0, 1]")
_HOUR: _Bound = (lambda x: 0 <= x < 24, "must be an hour in [0, 24)")

# YAML field -> (DeviceDraws column, factor to SI, bound on its values)
_FIELDS: dict[str, tuple[str, float, _Bound]] = {
    "train_gflops": ("train_flops_per_s", 1e9, _POSITIVE),
    "memory_gib": ("memory_bytes", float(2**30), _POSITIVE),
    "uplink_mbps": ("uplink_bps", 1e6, _POSITIVE),
    "downlink_mbps": ("downlink_bps", 1e6, _POSITIVE),
    "rtt_ms": ("rtt_s", 1e-3, _NON_NEGATIVE),
    "dropout": ("dropout_prob", 1.0, _PROBABILITY),
}
_DISTS = {"fixed": ("value",), "lognormal": ("median", "sigma"), "choice": ("values", "weights")}
_AVAILABILITY = {"constant": ("p",), "diurnal": ("day", "night", "night_start_h", "night_end_h")}
_USAGE = "usage: raysim profiles [list | show NAME | validate FILE...]"


def _pick(u: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """Index of the weight whose cumulative interval holds each uniform draw."""
    cdf = np.cumsum(weights)
    return np.searchsorted(cdf / cdf[-1], u, side="right")


@dataclass(frozen=True, kw_only=True)
class Fixed:
    """The same value for every device."""

    value: float
    tag: str
    source: str

    @property
    def median(self) -> float:
        return self.value

    def sample(self, *, seed: int, field: str, ids: np.ndarray) -> np.ndarray:
        return np.full(len(ids), self.value)

    def describe(self) -> str:
        return f"fixed {self.value:g}"


@dataclass(frozen=True, kw_only=True)
class LogNormal:
    """``median * exp(sigma * N(0, 1))``: FedScale's spread for device capacities."""

    median: float
    sigma: float
    tag: str
    source: str

    def sample(self, *, seed: int, field: str, ids: np.ndarray) -> np.ndarray:
        return self.median * np.exp(self.sigma * rng.normal(seed, "profile", field, ids=ids))

    def describe(self) -> str:
        return f"lognormal median {self.median:g}, sigma {self.sigma:g}"


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One of ``values`` with probabilities proportional to ``weights``."""

    values: tuple[float, ...]
    weights: tuple[float, ...]
    tag: str
    source: str

    @property
    def median(self) -> float:
        order = np.argsort(self.values)
        cdf = np.cumsum(np.asarray(self.weights)[order])
        return float(np.asarray(self.values)[order][np.searchsorted(cdf / cdf[-1], 0.5)])

    def sample(self, *, seed: int, field: str, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.values)[_pick(rng.uniform(seed, "profile", field, ids=ids), self.weights)]

    def describe(self) -> str:
        pairs = ", ".join(f"{v:g}: {w:g}" for v, w in zip(self.values, self.weights))
        return f"choice {{{pairs}}}"


Distribution = Fixed | LogNormal | Choice


@dataclass(frozen=True, kw_only=True)
class Constant:
    """Available with the same probability at every hour."""

    p: float
    tag: str
    source: str

    def probability(self, hour: float) -> float:
        return self.p

    def describe(self) -> str:
        return f"constant {self.p:g}"


@dataclass(frozen=True, kw_only=True)
class Diurnal:
    """One probability by day, another at night; the night may wrap midnight."""

    day: float
    night: float
    night_start_h: float
    night_end_h: float
    tag: str
    source: str

    def probability(self, hour: float) -> float:
        start, end = self.night_start_h, self.night_end_h
        is_night = start <= hour < end if start <= end else (hour >= start or hour < end)
        return self.night if is_night else self.day

    def describe(self) -> str:
        return (f"diurnal {self.day:g} by day, {self.night:g} at night "
                f"({self.night_start_h:g}h-{self.night_end_h:g}h)")


Availability = Constant | Diurnal


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    """A kind of device: one distribution per profile field, units in the names."""

    name: str
    description: str
    train_gflops: Distribution
    memory_gib: Distribution
    uplink_mbps: Distribution
    downlink_mbps: Distribution
    rtt_ms: Distribution
    dropout: Distribution
    availability: Availability
    file: Path


@dataclass(frozen=True, kw_only=True)
class Population:
    """A mixture of device classes; devices ``0..size-1`` are drawn on demand."""

    name: str
    description: str
    size: int
    clock_start_h: float
    classes: tuple[DeviceClass, ...]
    shares: tuple[float, ...]  # aligned with ``classes``, in file order
    file: Path

    def draw(self, ids: np.ndarray, *, seed: int) -> DeviceDraws:
        """Profiles of devices ``ids`` in SI units; each depends only on (seed, id)."""
        ids = self._checked(ids)
        which = self._class_index(ids, seed=seed)
        masks = [which == k for k in range(len(self.classes))]
        columns = {}
        for field, (column, factor, _) in _FIELDS.items():
            values = np.empty(len(ids))
            for cls, mask in zip(self.classes, masks):
                values[mask] = getattr(cls, field).sample(seed=seed, field=field, ids=ids[mask]) * factor
            columns[column] = values
        names = np.array([cls.name for cls in self.classes], dtype=object)
        return DeviceDraws(device_id=ids, device_class=names[which], **columns)

    def available(self, ids: np.ndarray, *, seed: int, round: int, sim_time_s: float) -> np.ndarray:
        """Whether each device is available in ``round`` at virtual time ``sim_time_s``."""
        ids = self._checked(ids)
        hour = (self.clock_start_h + sim_time_s / 3600.0) % 24.0
        p = np.array([cls.availability.probability(hour) for cls in self.classes])
        return rng.uniform(seed, "available", round, ids=ids) < p[self._class_index(ids, seed=seed)]

    def _class_index(self, ids: np.ndarray, *, seed: int) -> np.ndarray:
        return _pick(rng.uniform(seed, "profile", "class", ids=ids), self.shares)

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError("device ids must be a 1-D array of integers")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"device ids must lie in [0, {self.size}) for population '{self.name}'")
        return ids


# ---- reading and validating -------------------------------------------------


@dataclass(frozen=True)
class _Node:
    """A mapping read from a profile file, with where it is, for error messages."""

    data: dict
    file: str
    field: str = ""

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, field=f"{self.field}.{key}" if self.field else key)

    def expect_keys(self, keys: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in keys:
                raise self.error(str(key), f"unknown key (expected one of: {', '.join(keys)})")
        for key in keys:
            if key not in self.data:
                raise self.error(key, "missing field")

    def get(self, key: str, types: type | tuple[type, ...], what: str) -> Any:
        if key not in self.data:
            raise self.error(key, "missing field")
        value = self.data[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise self.error(key, f"expected {what}, got {value!r}")
        return value

    def node(self, key: str) -> _Node:
        return _Node(self.get(key, dict, "a mapping"), self.file, f"{self.field}.{key}" if self.field else key)

    def text(self, key: str) -> str:
        value = self.get(key, str, "a string")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def number(self, key: str, bound: _Bound) -> float:
        value = float(self.get(key, (int, float), "a number"))
        check, rule = bound
        if not math.isfinite(value) or not check(value):
            raise self.error(key, f"{rule} (got {value:g})")
        return value

    def numbers(self, key: str, bound: _Bound) -> tuple[float, ...]:
        values = self.get(key, list, "a list of numbers")
        if not values:
            raise self.error(key, "must not be empty")
        items = _Node({f"{key}[{i}]": v for i, v in enumerate(values)}, self.file, self.field)
        return tuple(items.number(k, bound) for k in items.data)

    def choice(self, key: str, options: tuple[str, ...] | dict) -> str:
        value = self.text(key)
        if value not in options:
            raise self.error(key, f"'{value}' is not one of: {', '.join(options)}")
        return value


def _read(path: Path) -> _Node:
    file = str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", file=file) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read file: {getattr(err, 'strerror', None) or err}", file=file) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"YAML syntax error{where}: {getattr(err, 'problem', None) or err}", file=file) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of fields at the top level", file=file)
    return _Node(data, file)


def _provenance(node: _Node) -> dict[str, str]:
    return {"tag": node.choice("tag", TAGS), "source": node.text("source")}


def _distribution(node: _Node, bound: _Bound) -> Distribution:
    dist = node.choice("dist", _DISTS)
    if dist == "lognormal" and bound is _PROBABILITY:
        raise node.error("dist", "a probability cannot be lognormal; use fixed or choice")
    node.expect_keys(("dist", *_DISTS[dist], "tag", "source"))
    if dist == "fixed":
        return Fixed(value=node.number("value", bound), **_provenance(node))
    if dist == "lognormal":
        return LogNormal(median=node.number("median", bound), sigma=node.number("sigma", _NON_NEGATIVE),
                         **_provenance(node))
    values, weights = node.numbers("values", bound), node.numbers("weights", _NON_NEGATIVE)
    if len(weights) != len(values):
        raise node.error("weights", f"needs one weight per value ({len(values)}), got {len(weights)}")
    if sum(weights) <= 0:
        raise node.error("weights", "must not all be zero")
    return Choice(values=values, weights=weights, **_provenance(node))


def _availability(node: _Node) -> Availability:
    kind = node.choice("kind", _AVAILABILITY)
    node.expect_keys(("kind", *_AVAILABILITY[kind], "tag", "source"))
    if kind == "constant":
        return Constant(p=node.number("p", _PROBABILITY), **_provenance(node))
    return Diurnal(day=node.number("day", _PROBABILITY), night=node.number("night", _PROBABILITY),
                   night_start_h=node.number("night_start_h", _HOUR),
                   night_end_h=node.number("night_end_h", _HOUR), **_provenance(node))


def _header(node: _Node, path: Path, kind: str, keys: tuple[str, ...]) -> str:
    """Check kind and keys of a profile file; return its name (which must match the file)."""
    if node.text("kind") != kind:
        raise node.error("kind", f"expected '{kind}', got '{node.data['kind']}'")
    node.expect_keys(("kind", "name", "description", *keys))
    name = node.text("name")
    if name != path.stem:
        raise node.error("name", f"'{name}' does not match the file name '{path.name}'")
    return name


def _parse_class(node: _Node, path: Path) -> DeviceClass:
    name = _header(node, path, "device_class", (*_FIELDS, "availability"))
    fields = {field: _distribution(node.node(field), bound) for field, (_, _, bound) in _FIELDS.items()}
    return DeviceClass(name=name, description=node.text("description"), **fields,
                       availability=_availability(node.node("availability")), file=path)


def _parse_population(node: _Node, path: Path) -> Population:
    name = _header(node, path, "population", ("size", "clock_start_h", "classes"))
    size = node.get("size", int, "a positive integer")
    if size <= 0:
        raise node.error("size", f"must be > 0 (got {size})")
    shares_node = node.node("classes")
    shares = {str(k): shares_node.number(k, _PROBABILITY) for k in shares_node.data}
    if not shares:
        raise node.error("classes", "needs at least one device class")
    if abs(sum(shares.values()) - 1.0) > 1e-6:
        raise node.error("classes", f"shares must sum to 1 (got {sum(shares.values()):g})")
    roots = (path.parent.parent, *PROFILE_DIRS)
    classes = []
    for cls in shares:
        found = _find(cls, "classes", roots)
        if found is None:
            raise node.error(f"classes.{cls}", f"unknown device class '{cls}' (known: {_known('device_class')})")
        classes.append(load_class(found))
    return Population(name=name, description=node.text("description"), size=size,
                      clock_start_h=node.number("clock_start_h", _HOUR), classes=tuple(classes),
                      shares=tuple(shares.values()), file=path)


def _find(name: str, sub: str, roots: tuple[Path, ...]) -> Path | None:
    return next((p.resolve() for root in roots if (p := root / sub / f"{name}.yaml").is_file()), None)


def _known(kind: str) -> str:
    return ", ".join(name for k, name, _ in list_profiles() if k == kind) or "none"


def _resolve(name_or_path: str | Path, kind: str) -> Path:
    text = str(name_or_path)
    if text.endswith(".yaml"):
        return Path(text)
    sub = "classes" if kind == "device_class" else "populations"
    path = _find(text, sub, PROFILE_DIRS)
    if path is None:
        where = ", ".join(str(root / sub) for root in PROFILE_DIRS)
        raise ConfigError(f"unknown {kind.replace('_', ' ')} '{text}': no {text}.yaml in {where} "
                          f"(known: {_known(kind)})")
    return path


# ---- public loaders -----------------------------------------------------------


def population_file(name_or_path: str | Path) -> Path:
    """The file a population name (looked up in ``PROFILE_DIRS``) or ``.yaml`` path designates."""
    return _resolve(name_or_path, "population")


def is_shipped_population(name: str) -> bool:
    """Whether ``name`` designates the population shipped with raysim (no working-directory file shadows it)."""
    shipped = _find(name, "populations", (SHIPPED_PROFILES,))
    return shipped is not None and shipped == _find(name, "populations", PROFILE_DIRS)


def load_class(name_or_path: str | Path) -> DeviceClass:
    """A device class by name (looked up in ``PROFILE_DIRS``) or by ``.yaml`` path."""
    path = _resolve(name_or_path, "device_class")
    return _parse_class(_read(path), path)


def load_population(name_or_path: str | Path, *, size: int | None = None) -> Population:
    """A population by name or ``.yaml`` path; ``size`` overrides the file's size."""
    path = _resolve(name_or_path, "population")
    population = _parse_population(_read(path), path)
    if size is None:
        return population
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"population size must be a positive integer (got {size!r})", file=str(path), field="size")
    return replace(population, size=size)


def load_profile(path: str | Path) -> DeviceClass | Population:
    """A class or a population from a file, whichever its ``kind`` says."""
    path = Path(path)
    node = _read(path)
    parse = {"device_class": _parse_class, "population": _parse_population}
    return parse[node.choice("kind", tuple(parse))](node, path)


def list_profiles() -> list[tuple[str, str, Path]]:
    """``(kind, name, path)`` of every profile on the search path; earlier dirs shadow later."""
    found: dict[tuple[str, str], Path] = {}
    for root in PROFILE_DIRS:
        for kind, sub in (("device_class", "classes"), ("population", "populations")):
            for path in sorted((root / sub).glob("*.yaml")):
                found.setdefault((kind, path.stem), path.resolve())
    return [(kind, name, path) for (kind, name), path in sorted(found.items())]


# ---- the `raysim profiles` command ------------------------------------------


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
    for field in (*_FIELDS, "availability"):
        value = getattr(cls, field)
        lines.append(f"  {field:<14} {value.describe()}")
        lines.append(f"  {'':<14} [{value.tag}] {value.source}")
    return "\n".join(lines)


def _format_population(population: Population) -> str:
    width = max(len(cls.name) for cls in population.classes)
    header = f"  {'class':<{width}}  {'share':>6}" + "".join(f"  {field:>13}" for field in _FIELDS)
    lines = [f"population {population.name}  ({population.file})", f"  {population.description.strip()}",
             f"  size {population.size}, virtual clock starts at {population.clock_start_h:g}h",
             "  classes, shares and medians:", header]
    for cls, share in zip(population.classes, population.shares):
        medians = "".join(f"  {getattr(cls, field).median:>13g}" for field in _FIELDS)
        lines.append(f"  {cls.name:<{width}}  {share:>6.3f}{medians}")
    return "\n".join(lines)


def _show(name: str) -> str:
    if name.endswith(".yaml"):
        profile = load_profile(name)
    elif path := _find(name, "classes", PROFILE_DIRS) or _find(name, "populations", PROFILE_DIRS):
        profile = load_profile(path)
    else:
        raise ConfigError(f"unknown profile '{name}' (device classes: {_known('device_class')}; "
                          f"populations: {_known('population')})")
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
            print(_USAGE, file=sys.stderr)
            return 2
    return 0
