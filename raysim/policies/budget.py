"""budget_fit: per device, the most trainable capacity its budgets allow (CAFF, Pfeiffer et al. 2024).

Pfeiffer, Aboelenien Ahmed, Khalili, Henkel (arXiv 2411.07826): each device fine-tunes as many layers as its
memory and compute constraints allow and freezes the rest; the server averages each layer over the devices that
trained it. Here the constraints are the budgets a device's profile states (``budgets:``, priced by the cost
model on the real submodels) and the family of configs to choose from is declared in the policy file.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from raysim.errors import ConfigError
from raysim.policies.base import Policy, PolicyContext, register, update_information
from raysim.types import DeviceConfig, DeviceDraws, RoundState


def matches(config: DeviceConfig, entry: dict) -> bool:
    """Whether ``config`` takes, on every field ``entry`` names, its value or one of its listed values."""
    return all(getattr(config, key) in (values if isinstance(values, list) else [values])
               for key, values in entry.items())


def family_members(family: list[dict] | None, context: PolicyContext) -> np.ndarray:
    """Positions in the method space of the configs in ``family`` (None: all of them); one error per bad entry."""
    if family is None:
        return np.arange(len(context.space))
    if not isinstance(family, list) or not family:
        raise ConfigError("expected a non-empty list of config field mappings", field="params.family")
    names = {f.name for f in dataclasses.fields(DeviceConfig)}
    for i, entry in enumerate(family):
        if not isinstance(entry, dict) or not entry:
            raise ConfigError("expected a mapping of config fields to a value or a list of values",
                              field=f"params.family[{i}]")
        for key in entry:
            if key not in names:
                raise ConfigError(f"unknown config field (accepted: {', '.join(sorted(names))})",
                                  field=f"params.family[{i}].{key}")
        if not any(matches(c, entry) for c in context.space):
            raise ConfigError("matches no config of the experiment's method space (methods.*)",
                              field=f"params.family[{i}]")
    return np.array([j for j, c in enumerate(context.space) if any(matches(c, e) for e in family)], dtype=np.int64)


@register("budget_fit")
class BudgetFit(Policy):
    """Per device, the config of the family with the most trainable parameters that it takes (peak memory within
    its memory and every budget it states: memory, compute time, upload) and that finishes by the deadline.

    ``family``: which configs of the method space it chooses from, as a list of mappings from config fields to a
    value or a list of values (a config is in the family when it matches one mapping on every field that mapping
    names; omitted: the whole space). Ties in trainable parameters go to the more update information (bits),
    then to method-space order. A device no config of the family fits is left out: it is given the config that
    comes closest (the quickest that fits, else the one with the least memory) and takes no part, counted in
    ``n_over_budget`` (``n_oom`` where its memory, not a budget, falls short).
    """

    def __init__(self, *, context: PolicyContext, family: list[dict] | None = None):
        self.context = context
        members = [context.space[j] for j in family_members(family, context)]  # measured alone: not the whole space
        trainable = [context.oracle.measure(c).trainable_params for c in members]
        information = update_information(context, members)
        order = sorted(range(len(members)), key=lambda i: (-trainable[i], -information[i], i))
        self.configs = [members[i] for i in order]  # the family, most capacity first

    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        prices = self.context.oracle.price(devices, self.configs)
        first = np.argmax(prices.feasible, axis=1)  # the first feasible one: the most capacity
        choice = np.where(prices.feasible.any(axis=1), first, prices.fallback())
        return [self.configs[i] for i in choice]
