"""Policies that do not learn: uniform, tiered, greedy_fit, random."""

from __future__ import annotations

import dataclasses

import numpy as np

from raysim import rng
from raysim.errors import ConfigError
from raysim.methods import default_config
from raysim.methods.base import canonical
from raysim.policies.base import Policy, PolicyContext, register, update_information
from raysim.types import DeviceConfig, DeviceDraws, RoundState


def config_from_params(values: dict | None, *, context: PolicyContext, field: str) -> DeviceConfig:
    """The default config with ``values`` replaced; it must lie in the method space."""
    names = {f.name for f in dataclasses.fields(DeviceConfig)}
    for key in values or {}:
        if key not in names:
            raise ConfigError(f"unknown config field (accepted: {', '.join(sorted(names))})",
                              field=f"{field}.{key}")
    config = canonical(dataclasses.replace(default_config(context.methods), **(values or {})))
    if config not in context.space:
        raise ConfigError(f"{config} is outside the experiment's method space (methods.*)", field=field)
    return config


def richness_order(context: PolicyContext) -> np.ndarray:
    """Positions in the method space, richest first.

    Richest = the most update information a device sends back: measured
    trainable parameters times bits per value. Ties keep method-space order, so
    the values listed first in ``methods.*`` are preferred.
    """
    info = update_information(context)
    return np.array(sorted(range(len(info)), key=lambda j: (-info[j], j)), dtype=np.int64)


@register("uniform")
class Uniform(Policy):
    """One config for every device (the baseline most papers use)."""

    def __init__(self, *, context: PolicyContext, config: dict | None = None):
        self.config = config_from_params(config, context=context, field="params.config")

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        return [self.config] * len(devices)


@register("tiered")
class Tiered(Policy):
    """A config per device class; classes not listed get ``default`` (the space's default config)."""

    def __init__(self, *, context: PolicyContext, classes: dict[str, dict], default: dict | None = None):
        self.by_class = {name: config_from_params(values, context=context, field=f"params.classes.{name}")
                         for name, values in classes.items()}
        self.default = config_from_params(default, context=context, field="params.default")

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        return [self.by_class.get(str(c), self.default) for c in devices.device_class]


@register("greedy_fit")
class GreedyFit(Policy):
    """Per device, the richest config (:func:`richness_order`) that fits its memory and the deadline.

    A device with no feasible config gets the cheapest one (it fails whatever it gets).
    """

    def __init__(self, *, context: PolicyContext):
        self.context = context
        self.order = richness_order(context)

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        prices = self.context.oracle.price(devices, self.context.space)
        feasible = prices.feasible[:, self.order]
        choice = np.where(feasible.any(axis=1), self.order[np.argmax(feasible, axis=1)], prices.fallback())
        return [self.context.space[j] for j in choice]


@register("random")
class Random(Policy):
    """Uniform over each device's feasible configs, keyed by (seed, round, device id)."""

    def __init__(self, *, context: PolicyContext):
        self.context = context

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        prices = self.context.oracle.price(devices, self.context.space)
        u = rng.uniform(self.context.seed, "policy-random", state.round, ids=devices.device_id)
        fallback = prices.fallback()
        configs = []
        for i, row in enumerate(prices.feasible):
            options = np.flatnonzero(row)
            j = options[int(u[i] * len(options))] if len(options) else fallback[i]
            configs.append(self.context.space[j])
        return configs
