"""The policy protocol, what a policy is built with, and the name registry YAML files refer to."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from raysim.config import MethodsConfig
from raysim.emulation.costmodel import Limits, Measurement, budget_limits, device_costs
from raysim.io.checkpoint import State
from raysim.methods import full_config
from raysim.registry import Registry
from raysim.types import DeviceConfig, DeviceDraws, RoundState

if TYPE_CHECKING:
    from raysim.io.results import RoundResult


@dataclass(frozen=True)
class Prices:
    """Every device's cost under every config of a space: arrays of shape (devices, configs)."""

    total_s: np.ndarray
    peak_memory_bytes: np.ndarray
    bytes_up: np.ndarray
    bytes_down: np.ndarray
    fits: np.ndarray  # the device takes it: peak memory within its memory, and within every budget it states
    feasible: np.ndarray  # fits and finishes by the deadline

    def fallback(self) -> np.ndarray:
        """Per device, the cheapest config: the one that fits with the shortest time, else the smallest.

        Only for devices with no feasible config, which fail whatever they get.
        """
        time = np.where(self.fits, self.total_s, np.inf)
        cheapest_fit = np.argmin(time, axis=1)
        smallest = np.argmin(self.peak_memory_bytes, axis=1)
        return np.where(self.fits.any(axis=1), cheapest_fit, smallest)


@dataclass(frozen=True)
class CostOracle:
    """The cost model as a policy may consult it before anything trains."""

    measure: Callable[[DeviceConfig], Measurement]
    local_steps: int
    deadline_s: float | None
    server_flops_per_s: float = math.inf  # split devices' server (server.train_gflops)

    def limits(self, devices: DeviceDraws) -> Limits | None:
        """What the devices' budgets allow a round (None: no device states a budget)."""
        return budget_limits(devices, lambda: self.measure(full_config()), local_steps=self.local_steps)

    def price(self, devices: DeviceDraws, configs: list[DeviceConfig]) -> Prices:
        """Predicted time, memory and bytes of each device under each config; feasibility by memory, budgets and
        deadline."""
        columns = [device_costs(devices, [self.measure(c)] * len(devices), local_steps=self.local_steps,
                                server_flops_per_s=self.server_flops_per_s) for c in configs]
        limits = self.limits(devices)
        total = np.stack([c.total_s for c in columns], axis=1)
        fits = np.stack([c.fits(devices) if limits is None else c.fits(devices) & limits.allow(c) for c in columns],
                        axis=1)
        in_time = np.ones_like(fits) if self.deadline_s is None else total <= self.deadline_s
        return Prices(
            total_s=total,
            peak_memory_bytes=np.stack([c.peak_memory_bytes for c in columns], axis=1),
            bytes_up=np.stack([c.bytes_up for c in columns], axis=1),
            bytes_down=np.stack([c.bytes_down for c in columns], axis=1),
            fits=fits,
            feasible=fits & in_time,
        )


@dataclass(frozen=True)
class PolicyContext:
    """What every policy is built with: the method space, the cost oracle and the run's seed."""

    methods: MethodsConfig
    space: list[DeviceConfig]
    oracle: CostOracle
    seed: int
    rounds: int


class Policy(ABC):
    """Maps sampled devices and the round state to one config per device; may learn from each round's result."""

    # The run computes each update's utility (devices.parquet ``utility``) for this policy: it costs a
    # held-out gradient per actor and round, so only a policy that learns from it asks.
    wants_utility: bool = False

    @abstractmethod
    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]: ...

    def observe(self, result: RoundResult) -> None:  # noqa: B027 (a hook: policies that do not learn ignore it)
        """The round's row and device records, after its evaluation."""

    def checkpoint(self) -> State:
        """What the policy has learnt so far, for a run's checkpoint (nothing, unless it learns)."""
        return State()

    def restore(self, state: State) -> None:  # noqa: B027 (a hook, as above)
        """Continue from a checkpoint's state."""


PolicyFactory = Callable[..., Policy]
REGISTRY: Registry[PolicyFactory] = Registry("policy")  # a policy file's ``policy:`` names one
register = REGISTRY.register


def update_information(context: PolicyContext, configs: list[DeviceConfig] | None = None) -> np.ndarray:
    """Per config (of the space, unless ``configs`` are given), the update information a device sends back:
    measured trainable parameters x bits."""
    configs = context.space if configs is None else configs
    return np.array([context.oracle.measure(c).trainable_params * c.bits for c in configs], dtype=np.float64)
