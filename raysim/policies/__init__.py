"""Policies: who trains what. ``load_policy`` reads a YAML file from ``policies/``."""

from __future__ import annotations

import inspect
from pathlib import Path

from omegaconf import OmegaConf

from raysim.config import REPO_ROOT, MethodsConfig
from raysim.errors import ConfigError
from raysim.policies import static  # noqa: F401  (registers the shipped policies)
from raysim.policies.base import REGISTRY, Policy

POLICY_DIRS = (Path("policies"), REPO_ROOT / "policies")


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


def load_policy(name_or_path: str, *, methods: MethodsConfig) -> Policy:
    """Build the policy a YAML file names (``policy: NAME``, ``params: {...}``)."""
    path = resolve_policy_file(name_or_path)
    try:
        spec = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as err:
        raise ConfigError(f"cannot parse YAML: {str(err).splitlines()[0]}", file=str(path)) from None
    if not isinstance(spec, dict) or "policy" not in spec:
        raise ConfigError("missing field", file=str(path), field="policy")
    unknown = set(spec) - {"policy", "params", "description"}
    if unknown:
        raise ConfigError("unknown key", file=str(path), field=sorted(unknown)[0])
    factory = REGISTRY.get(spec["policy"])
    if factory is None:
        raise ConfigError(f"unknown policy {spec['policy']!r} (known: {', '.join(sorted(REGISTRY))})",
                          file=str(path), field="policy")
    params = spec.get("params") or {}
    accepted = set(inspect.signature(factory).parameters) - {"methods"}
    for key in params:
        if key not in accepted:
            raise ConfigError(f"unknown parameter (accepted: {', '.join(sorted(accepted))})",
                              file=str(path), field=f"params.{key}")
    try:
        return factory(methods=methods, **params)
    except TypeError as err:
        raise ConfigError(str(err), file=str(path), field="params") from None
