"""Reading device profiles: YAML files checked field by field, with one error naming the file and the key.

Profiles are looked up by name in ``PROFILE_DIRS`` (the working directory's ``device_profiles/``, then the
shipped ones) or given as ``.yaml`` paths. Every number has a bound, a provenance tag and a source; a field's
distribution and a class's availability are read by the class their registry names. The format is documented
in ``device_profiles/README.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from raysim.emulation.profiles.availability import AVAILABILITY, Availability
from raysim.emulation.profiles.distributions import DISTRIBUTIONS, HOUR, PROBABILITY, Bound, Distribution
from raysim.emulation.profiles.population import ALL, BUDGETS, FIELDS, DeviceClass, Population
from raysim.errors import ConfigError
from raysim.io import shipped

SHIPPED_PROFILES = shipped.folder("device_profiles")
PROFILE_DIRS: tuple[Path, ...] = (
    Path("device_profiles"),  # relative: resolved against the working directory when used
    SHIPPED_PROFILES,
)
TAGS = ("measured", "derived", "reported", "assumption")


@dataclass(frozen=True)
class Node:
    """A mapping read from a profile file, with where it is, for error messages."""

    data: dict
    file: str
    field: str = ""

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, field=f"{self.field}.{key}" if self.field else key)

    def expect_keys(self, keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key not in keys and key not in optional:
                raise self.error(str(key), f"unknown key (expected one of: {', '.join((*keys, *optional))})")
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

    def node(self, key: str) -> Node:
        return Node(self.get(key, dict, "a mapping"), self.file, f"{self.field}.{key}" if self.field else key)

    def text(self, key: str) -> str:
        value = self.get(key, str, "a string")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def number(self, key: str, bound: Bound) -> float:
        value = float(self.get(key, (int, float), "a number"))
        check, rule = bound
        if not math.isfinite(value) or not check(value):
            raise self.error(key, f"{rule} (got {value:g})")
        return value

    def numbers(self, key: str, bound: Bound) -> tuple[float, ...]:
        values = self.get(key, list, "a list of numbers")
        if not values:
            raise self.error(key, "must not be empty")
        items = Node({f"{key}[{i}]": v for i, v in enumerate(values)}, self.file, self.field)
        return tuple(items.number(k, bound) for k in items.data)

    def choice(self, key: str, options: tuple[str, ...] | dict) -> str:
        value = self.text(key)
        if value not in options:
            raise self.error(key, f"'{value}' is not one of: {', '.join(options)}")
        return value


def read(path: Path) -> Node:
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
    return Node(data, file)



def _provenance(node: Node) -> dict[str, str]:
    return {"tag": node.choice("tag", TAGS), "source": node.text("source")}



def _distribution(node: Node, bound: Bound) -> Distribution:
    kind = DISTRIBUTIONS[node.choice("dist", DISTRIBUTIONS)]
    node.expect_keys(("dist", *kind.keys, "tag", "source"))
    return kind.read(node, bound, _provenance(node))


def _availability(node: Node) -> Availability:
    kind = AVAILABILITY[node.choice("kind", AVAILABILITY)]
    node.expect_keys(("kind", *kind.keys, "tag", "source"))
    return kind.read(node, _provenance(node))


def _budgets(node: Node) -> dict[str, Distribution]:
    """A ``budgets:`` mapping: each key of BUDGETS optional, each a distribution with its bound."""
    if not node.data:
        raise ConfigError(f"needs at least one of: {', '.join(BUDGETS)}", file=node.file, field=node.field)
    node.expect_keys((), optional=tuple(BUDGETS))
    return {key: _distribution(node.node(key), BUDGETS[key][2]) for key in node.data}


def _header(node: Node, path: Path, kind: str, keys: tuple[str, ...]) -> str:
    """Check kind and keys of a profile file (``budgets`` optional); return its name (which must match the file)."""
    if node.text("kind") != kind:
        raise node.error("kind", f"expected '{kind}', got '{node.data['kind']}'")
    node.expect_keys(("kind", "name", "description", *keys), optional=("budgets",))
    name = node.text("name")
    if name != path.stem:
        raise node.error("name", f"'{name}' does not match the file name '{path.name}'")
    return name


def _parse_class(node: Node, path: Path) -> DeviceClass:
    name = _header(node, path, "device_class", (*FIELDS, "availability"))
    fields = {field: _distribution(node.node(field), bound) for field, (_, _, bound) in FIELDS.items()}
    budgets = _budgets(node.node("budgets")) if "budgets" in node.data else {}
    return DeviceClass(name=name, description=node.text("description"), **fields,
                       availability=_availability(node.node("availability")), file=path, budgets=budgets)


def _parse_population(node: Node, path: Path) -> Population:
    name = _header(node, path, "population", ("size", "clock_start_h", "classes"))
    size = node.get("size", int, "a positive integer")
    if size <= 0:
        raise node.error("size", f"must be > 0 (got {size})")
    shares_node = node.node("classes")
    shares = {str(k): shares_node.number(k, PROBABILITY) for k in shares_node.data}
    if not shares:
        raise node.error("classes", "needs at least one device class")
    if abs(sum(shares.values()) - 1.0) > 1e-6:
        raise node.error("classes", f"shares must sum to 1 (got {sum(shares.values()):g})")
    roots = (path.parent.parent, *PROFILE_DIRS)
    classes = []
    for cls in shares:
        found = find(cls, "classes", roots)
        if found is None:
            raise node.error(f"classes.{cls}", f"unknown device class '{cls}' (known: {known('device_class')})")
        classes.append(load_class(found))
    budgets = {}
    if "budgets" in node.data:  # per scope: every device (``all``) or one of the population's classes
        scopes = node.node("budgets")
        scopes.expect_keys((), optional=(ALL, *shares))
        budgets = {str(scope): _budgets(scopes.node(scope)) for scope in scopes.data}
    return Population(name=name, description=node.text("description"), size=size,
                      clock_start_h=node.number("clock_start_h", HOUR), classes=tuple(classes),
                      shares=tuple(shares.values()), file=path, budgets=budgets)


def find(name: str, sub: str, roots: tuple[Path, ...]) -> Path | None:
    return next((p.resolve() for root in roots if (p := root / sub / f"{name}.yaml").is_file()), None)


def known(kind: str) -> str:
    return ", ".join(name for k, name, _ in list_profiles() if k == kind) or "none"


def _resolve(name_or_path: str | Path, kind: str) -> Path:
    text = str(name_or_path)
    if text.endswith(".yaml"):
        return Path(text)
    sub = "classes" if kind == "device_class" else "populations"
    path = find(text, sub, PROFILE_DIRS)
    if path is None:
        where = ", ".join(str(root / sub) for root in PROFILE_DIRS)
        raise ConfigError(f"unknown {kind.replace('_', ' ')} '{text}': no {text}.yaml in {where} "
                          f"(known: {known(kind)})")
    return path


def population_file(name_or_path: str | Path) -> Path:
    """The file a population name (looked up in ``PROFILE_DIRS``) or ``.yaml`` path designates."""
    return _resolve(name_or_path, "population")


def is_shipped_population(name: str) -> bool:
    """Whether ``name`` designates the population shipped with raysim (no working-directory file shadows it)."""
    shipped = find(name, "populations", (SHIPPED_PROFILES,))
    return shipped is not None and shipped == find(name, "populations", PROFILE_DIRS)


def load_class(name_or_path: str | Path) -> DeviceClass:
    """A device class by name (looked up in ``PROFILE_DIRS``) or by ``.yaml`` path."""
    path = _resolve(name_or_path, "device_class")
    return _parse_class(read(path), path)


def load_population(name_or_path: str | Path, *, size: int | None = None) -> Population:
    """A population by name or ``.yaml`` path; ``size`` overrides the file's size."""
    path = _resolve(name_or_path, "population")
    population = _parse_population(read(path), path)
    if size is None:
        return population
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConfigError(f"population size must be a positive integer (got {size!r})", file=str(path), field="size")
    return replace(population, size=size)


def load_profile(path: str | Path) -> DeviceClass | Population:
    """A class or a population from a file, whichever its ``kind`` says."""
    path = Path(path)
    node = read(path)
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
