"""The policy protocol and the name registry YAML files refer to."""

from __future__ import annotations

from typing import Callable, Protocol

from raysim.types import DeviceConfig, DeviceDraws, RoundState


class Policy(Protocol):
    """Maps sampled devices and the round state to one config per device."""

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]: ...

    def observe(self, results: dict) -> None: ...


PolicyFactory = Callable[..., Policy]
REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def wrap(factory: PolicyFactory) -> PolicyFactory:
        REGISTRY[name] = factory
        return factory

    return wrap
