"""Loading an experiment: defaults, then a YAML file, then ``key=value`` overrides, then a study's layers.

Unknown keys and wrong types are rejected by OmegaConf's structured merge; the error is turned into a
:class:`~raysim.errors.ConfigError` that names the file (or "override") and the dotted key, and a bad value is
reported against where it was last set. Stored configs (a run's ``config.yaml``, a checkpoint) are compared
here too: what cannot change results is left out, and keys added later take the defaults runs had before.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from raysim.config.schema import ExperimentConfig
from raysim.config.validate import validate
from raysim.errors import ConfigError
from raysim.io import shipped

QUICKSTART = shipped.folder("experiments") / "quickstart.yaml"


def load_mapping(path: str | Path, *, kind: str) -> DictConfig:
    """A YAML file that must hold a mapping (an experiment, a study, a policy), or one ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} file not found", file=str(path))
    try:
        data = OmegaConf.load(p)
    except Exception as err:  # YAML syntax errors come in many types
        raise ConfigError(f"cannot parse YAML: {str(err).splitlines()[0]}", file=str(path)) from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"a{'n' * (kind[0] in 'aeiou')} {kind} file must be a mapping of keys", file=str(path))
    return data


def _explain(err: OmegaConfBaseException, *, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or None
    if isinstance(err, ConfigKeyError):
        return ConfigError("unknown key" + _did_you_mean(err), file=source, field=key)
    msg = str(err).splitlines()[0]
    if "is not a subclass of" in msg:
        msg = "expected a mapping of keys"
    return ConfigError(msg, file=source, field=key)


def _did_you_mean(err: ConfigKeyError) -> str:
    """`` (did you mean cohort.deadline_s?)`` for a key close to one of its section's, else nothing."""
    section = err.object_type
    if not dataclasses.is_dataclass(section) or err.key is None:
        return ""
    close = difflib.get_close_matches(str(err.key), [f.name for f in dataclasses.fields(section)], n=1)
    prefix = (err.full_key or "").removesuffix(str(err.key))
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _merge(base: DictConfig, extra: Any, *, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except OmegaConfBaseException as err:
        raise _explain(err, source=source) from None


def load_experiment(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    layers: Sequence[tuple[str, Any]] = (),
) -> ExperimentConfig:
    """Defaults <- YAML file <- overrides <- ``layers``, validated; a plain ExperimentConfig.

    ``layers`` are (source, mapping) pairs merged in turn; errors in one name
    its source (``raysim compare`` layers a study's base and axis values).
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    setters: list[tuple[str, set[str]]] = []  # (source, the dotted keys it set), in merge order
    if path is not None:
        data = load_mapping(path, kind="experiment")
        cfg = _merge(cfg, data, source=str(path))
        setters.append((str(path), _dotted_keys(data)))
    for item in overrides or []:
        data = parse_override(item)
        cfg = _merge(cfg, data, source="override")
        setters.append(("override", _dotted_keys(data)))
    for layer_source, data in layers:
        cfg = _merge(cfg, data, source=layer_source)
        setters.append((layer_source, _dotted_keys(data)))
    experiment = OmegaConf.to_object(cfg)
    try:
        validate(experiment, source=setters[0][0] if setters else "config")
    except ConfigError as err:
        # name whoever set the bad value last: a file's value fixed by an override is the override's fault
        owner = next((src for src, keys in reversed(setters) if err.field and _sets(keys, err.field)), err.file)
        raise ConfigError(err.message, file=owner, field=err.field) from None
    return experiment


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """Every dotted key a mapping sets, sections included (``privacy``, ``privacy.clip_norm``)."""
    if not isinstance(data, (dict, DictConfig)):
        return set()
    keys = set()
    for key, value in (data.items_ex(resolve=False) if isinstance(data, DictConfig) else data.items()):
        dotted = f"{prefix}{key}"
        keys |= {dotted, *_dotted_keys(value, f"{dotted}.")}
    return keys


def _sets(keys: set[str], field_name: str) -> bool:
    """Whether ``keys`` set the value at ``field_name`` (``methods.bits[1]`` is set by ``methods.bits``)."""
    return field_name.split("[")[0] in keys


def parse_override(item: str) -> DictConfig:
    """``key=value`` as a nested mapping; a malformed one is a ConfigError."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", file="override")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as err:
        raise _explain(err, source="override") from None
    except yaml.YAMLError as err:  # the value is YAML; its errors span lines and point into a one-line string
        key, value = item.split("=", 1)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"cannot parse value {value!r}: {problem}", file="override", field=key) from None


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def frozen(value: Any) -> Any:
    """A config section (or any value in one) as a hashable key: dataclasses as (name, fields), lists as tuples."""
    if dataclasses.is_dataclass(value):
        return type(value).__name__, tuple((f.name, frozen(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    return value


# Keys that cannot change a run's results: where it runs and writes, how often it checkpoints, progress bars,
# experiment tracking, a study's labels.
NOT_RESULTS = ("ray", "progress", "output_dir", "checkpoint", "tracking", "study_axes")


def result_keys(config: dict) -> dict:
    """A resolved config (as a plain dict) less what cannot change its results."""
    return {k: v for k, v in config.items() if k not in NOT_RESULTS}


def result_config(cfg: ExperimentConfig) -> dict:
    return result_keys(OmegaConf.to_container(OmegaConf.structured(cfg)))


def with_defaults(config: dict, defaults: dict | None = None) -> dict:
    """A stored resolved config (a run's ``config.yaml`` or checkpoint) with every key it lacks set to today's
    default: a key added to raysim later defaults to what runs did before it existed, so an old run is still
    the same run (``raysim compare`` and ``--resume`` compare configs)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(ExperimentConfig())) if defaults is None else defaults
    filled = dict(config)
    for key, value in defaults.items():
        if key not in filled:
            filled[key] = value
        elif isinstance(value, dict) and isinstance(filled[key], dict) and key != "study_axes":
            filled[key] = with_defaults(filled[key], value)
    return filled


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two nested dicts (None: equal)."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            if (found := first_difference(x, y, f"{prefix}{key}.")) is not None:
                return found
        elif x != y:
            return f"{prefix}{key}"
    return None

