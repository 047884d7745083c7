"""The adapter family per device: what a device trains in the projections of its trained blocks.

``methods.adapter`` lists families by name; :data:`FAMILIES` maps each name to
the module that implements it (an :class:`raysim.methods.family.AdapterFamily`
named ``FAMILY`` there), imported on first use so that the config schema needs
neither torch nor peft. A family that does not use ``methods.lora_rank`` gives
its devices no rank (``None``; ``-1`` in ``devices.parquet``).

Families compose in the global model in :data:`FAMILIES` order: each family's
state applies around the ones before it (LoRA adds to a weight, (IA)³ then
rescales it), whichever family a device trains.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysim.methods.base import Method, register
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig, MethodsConfig
    from raysim.methods.family import AdapterFamily


@dataclass(frozen=True)
class Family:
    """Where a family is implemented, and whether ``methods.lora_rank`` applies to it."""

    module: str
    ranked: bool
    private: bool  # local DP-SGD can train it (Opacus knows its layers)


FAMILIES: Registry[Family] = Registry("adapter family")  # methods.adapter names one
FAMILIES.register("lora")(Family("raysim.methods.lora_family", ranked=True, private=True))
FAMILIES.register("ia3")(Family("raysim.methods.ia3", ranked=False, private=False))


def family(name: str) -> AdapterFamily:
    """The implementation of the family ``name``."""
    return importlib.import_module(FAMILIES[name].module).FAMILY


@register
class Adapter(Method):
    """The adapter family a device trains."""

    key = "adapter"
    type = str
    default = "lora"
    dtype = pa.string()

    def check(self, value: str, cfg: ExperimentConfig) -> str | None:
        return None if value in FAMILIES else f"must be {FAMILIES.choices()}"

    def check_all(self, values: list, cfg: ExperimentConfig) -> tuple[str, str] | None:
        if cfg.privacy.local.enabled and not all(FAMILIES[v].private for v in values):
            private = " or ".join(name for name, f in FAMILIES.items() if f.private)
            return f"methods.{self.key}", f"local DP-SGD trains {private} adapters only (privacy.local.enabled)"
        return None

    def shape(self, value: str, structure: dict, space: Any) -> None:
        structure["adapter"] = value


def listed(methods: MethodsConfig) -> tuple[str, ...]:
    """The families ``methods.adapter`` lists, in the order their states compose (:data:`FAMILIES` order)."""
    return tuple(name for name in FAMILIES if name in methods.adapter)
