"""Policies: who trains what.

``read_policy`` reads and checks a YAML file from ``policies/`` (``policy:
NAME``, ``params: {...}``) before a run starts; ``build_policy`` builds it once
the run can price configs (:class:`PolicyContext`).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from raysim.config import load_mapping
from raysim.errors import ConfigError
from raysim.io import shipped
from raysim.policies import budget, rl, static  # noqa: F401  (registers the shipped policies)
from raysim.policies.base import REGISTRY, CostOracle, Policy, PolicyContext, Prices

__all__ = ["CostOracle", "Policy", "PolicyContext", "PolicySpec", "Prices", "build_policy", "policy_identity",
           "read_policy"]

SHIPPED_POLICIES = shipped.folder("policies")
POLICY_DIRS = (Path("policies"), SHIPPED_POLICIES)  # the first relative: the working directory's


@dataclass(frozen=True)
class PolicySpec:
    """A policy file, read and checked: the registered name and its parameters."""

    name: str
    path: str
    params: dict = field(default_factory=dict)


def resolve_policy_file(name_or_path: str) -> Path:
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError("policy file not found", file=name_or_path, field="policy")
        return path
    for folder in POLICY_DIRS:
        path = folder / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    known = sorted({p.stem for d in POLICY_DIRS if d.is_dir() for p in d.glob("*.yaml")})
    raise ConfigError(f"no policy named {name_or_path!r} (known: {', '.join(known)})", field="policy")


def read_policy(name_or_path: str) -> PolicySpec:
    """Read a policy file and check its name and parameter names against the registry."""
    path = resolve_policy_file(name_or_path)
    spec = OmegaConf.to_container(load_mapping(path, kind="policy"))
    if "policy" not in spec:
        raise ConfigError("missing field", file=str(path), field="policy")
    unknown = set(spec) - {"policy", "params", "description"}
    if unknown:
        raise ConfigError("unknown key", file=str(path), field=sorted(unknown)[0])
    factory = REGISTRY.get(spec["policy"])
    if factory is None:
        raise ConfigError(f"unknown policy {spec['policy']!r} (known: {', '.join(sorted(REGISTRY))})",
                          file=str(path), field="policy")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError("expected a mapping of parameters", file=str(path), field="params")
    accepted = set(inspect.signature(factory).parameters) - {"context"}
    for key in params:
        if key not in accepted:
            raise ConfigError(f"unknown parameter (accepted: {', '.join(sorted(accepted))})",
                              file=str(path), field=f"params.{key}")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"must be finite (got {value})", file=str(path), field=f"params.{key}")
    checkpoint = params.get("checkpoint")
    if isinstance(checkpoint, str) and not Path(checkpoint).is_absolute() and (path.parent / checkpoint).is_file():
        params = {**params, "checkpoint": str((path.parent / checkpoint).resolve())}  # next to the policy file
    return PolicySpec(name=spec["policy"], path=str(path), params=params)


def policy_identity(spec: PolicySpec) -> dict:
    """What decides a policy's behaviour: its name, parameters and any checkpoint's content hash.

    Stored in ``summary.json``; a resumed study reruns a run whose policy file changed since.
    """
    params = dict(spec.params)
    checkpoint = params.get("checkpoint")
    if isinstance(checkpoint, str) and Path(checkpoint).is_file():
        params["checkpoint"] = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:16]
    return {"name": spec.name, "params": params}


def build_policy(spec: PolicySpec, *, context: PolicyContext) -> Policy:
    """The policy ``spec`` names, built for one run."""
    try:
        return REGISTRY[spec.name](context=context, **spec.params)
    except TypeError as err:
        raise ConfigError(str(err), file=spec.path, field="params") from None
    except ConfigError as err:
        raise ConfigError(err.message, file=spec.path, field=err.field) from None
