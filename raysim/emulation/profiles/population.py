"""Device classes and populations: what a profile file describes, drawn lazily per device.

Device ``i``'s class and values are pure functions of ``(seed, i)`` through :mod:`raysim.rng`, so a population
of 10^6 devices stores nothing per device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raysim import rng
from raysim.emulation.profiles.availability import Availability
from raysim.emulation.profiles.distributions import NON_NEGATIVE, POSITIVE, PROBABILITY, Bound, Distribution, pick
from raysim.types import Budgets, DeviceDraws

FRACTION: Bound = (lambda x: 0 < x <= 1, "must be a fraction in (0, 1]")

# YAML field -> (DeviceDraws column, factor to SI, bound on its values)
FIELDS: dict[str, tuple[str, float, Bound]] = {
    "train_gflops": ("train_flops_per_s", 1e9, POSITIVE),
    "memory_gib": ("memory_bytes", float(2**30), POSITIVE),
    "uplink_mbps": ("uplink_bps", 1e6, POSITIVE),
    "downlink_mbps": ("downlink_bps", 1e6, POSITIVE),
    "rtt_ms": ("rtt_s", 1e-3, NON_NEGATIVE),
    "dropout": ("dropout_prob", 1.0, PROBABILITY),
}
# ``budgets:`` key -> (Budgets field, factor to SI, bound): what a device may spend on one round, each optional
BUDGETS: dict[str, tuple[str, float, Bound]] = {
    "memory_mib": ("memory_bytes", float(2**20), POSITIVE),
    "memory_fraction": ("memory_fraction", 1.0, FRACTION),
    "compute_s": ("compute_s", 1.0, POSITIVE),
    "compute_fraction": ("compute_fraction", 1.0, FRACTION),
    "upload_mib": ("upload_bytes", float(2**20), POSITIVE),
    "upload_fraction": ("upload_fraction", 1.0, FRACTION),
}
ALL = "all"  # a population's budgets for every device, beside those per class


@dataclass(frozen=True, kw_only=True)
class DeviceClass:
    """A kind of device: one distribution per profile field, units in the names."""

    name: str
    description: str
    train_gflops: Distribution
    memory_gib: Distribution
    uplink_mbps: Distribution
    downlink_mbps: Distribution
    rtt_ms: Distribution
    dropout: Distribution
    availability: Availability
    file: Path
    budgets: dict[str, Distribution] = field(default_factory=dict)  # BUDGETS key -> distribution


@dataclass(frozen=True, kw_only=True)
class Population:
    """A mixture of device classes; devices ``0..size-1`` are drawn on demand."""

    name: str
    description: str
    size: int
    clock_start_h: float
    classes: tuple[DeviceClass, ...]
    shares: tuple[float, ...]  # aligned with ``classes``, in file order
    file: Path
    budgets: dict[str, dict[str, Distribution]] = field(default_factory=dict)  # ALL or class name -> BUDGETS key -> ...

    def draw(self, ids: np.ndarray, *, seed: int) -> DeviceDraws:
        """Profiles of devices ``ids`` in SI units; each depends only on (seed, id)."""
        ids = self._checked(ids)
        which = self._class_index(ids, seed=seed)
        masks = [which == k for k in range(len(self.classes))]
        columns = {}
        for key, (column, factor, _) in FIELDS.items():
            values = np.empty(len(ids))
            for cls, mask in zip(self.classes, masks):
                values[mask] = getattr(cls, key).sample(seed=seed, field=key, ids=ids[mask]) * factor
            columns[column] = values
        names = np.array([cls.name for cls in self.classes], dtype=object)
        return DeviceDraws(device_id=ids, device_class=names[which], **columns,
                           budgets=self._budgets(ids, masks, seed=seed))

    def _budgets(self, ids: np.ndarray, masks: list[np.ndarray], *, seed: int) -> Budgets | None:
        """Each device's budgets: the tightest its class file and this population state (None: none states one)."""
        if not self.budgets and not any(cls.budgets for cls in self.classes):
            return None
        columns = {column: np.full(len(ids), np.inf) for column, _, _ in BUDGETS.values()}
        for cls, mask in zip(self.classes, masks):
            stated = [(f"budgets.{key}", key, dist) for key, dist in cls.budgets.items()]
            for scope in (ALL, cls.name):
                stated += [(f"population.budgets.{scope}.{key}", key, dist)
                           for key, dist in self.budgets.get(scope, {}).items()]
            for name, key, dist in stated:
                column, factor, _ = BUDGETS[key]
                values = dist.sample(seed=seed, field=name, ids=ids[mask]) * factor
                columns[column][mask] = np.minimum(columns[column][mask], values)
        return Budgets(**columns)

    def available(self, ids: np.ndarray, *, seed: int, round: int, sim_time_s: float) -> np.ndarray:
        """Whether each device is available in ``round`` at virtual time ``sim_time_s``."""
        ids = self._checked(ids)
        hour = (self.clock_start_h + sim_time_s / 3600.0) % 24.0
        p = np.array([cls.availability.probability(hour) for cls in self.classes])
        return rng.uniform(seed, "available", round, ids=ids) < p[self._class_index(ids, seed=seed)]

    def _class_index(self, ids: np.ndarray, *, seed: int) -> np.ndarray:
        return pick(rng.uniform(seed, "profile", "class", ids=ids), self.shares)

    def _checked(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError("device ids must be a 1-D array of integers")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"device ids must lie in [0, {self.size}) for population '{self.name}'")
        return ids


# ---- reading and validating -------------------------------------------------
