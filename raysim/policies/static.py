"""Policies that do not learn."""

from __future__ import annotations

from dataclasses import replace

from raysim.config import MethodsConfig
from raysim.methods import default_config
from raysim.policies.base import register
from raysim.types import DeviceConfig, DeviceDraws, RoundState


@register("uniform")
class Uniform:
    """One config for every device (the baseline most papers use)."""

    def __init__(self, *, methods: MethodsConfig, config: dict | None = None):
        self.config: DeviceConfig = replace(default_config(methods), **(config or {}))

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        return [self.config] * len(devices)

    def observe(self, results: dict) -> None:
        pass
