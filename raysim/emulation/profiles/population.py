"""Device classes and populations: what a profile file describes, drawn lazily per device.

Device ``i``'s class and values are pure functions of ``(seed, i)`` through :mod:`raysim.rng`, so a population
of 10^6 devices stores nothing per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysim import rng
from raysim.emulation.profiles.availability import Availability
from raysim.emulation.profiles.distributions import NON_NEGATIVE, POSITIVE, PROBABILITY, Bound, Distribution, pick
from raysim.types import DeviceDraws

# YAML field -> (DeviceDraws column, factor to SI, bound on its values)
FIELDS: dict[str, tuple[str, float, Bound]] = {
    "train_gflops": ("train_flops_per_s", 1e9, POSITIVE),
    "memory_gib": ("memory_bytes", float(2**30), POSITIVE),
    "uplink_mbps": ("uplink_bps", 1e6, POSITIVE),
    "downlink_mbps": ("downlink_bps", 1e6, POSITIVE),
    "rtt_ms": ("rtt_s", 1e-3, NON_NEGATIVE),
    "dropout": ("dropout_prob", 1.0, PROBABILITY),
}


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

    def draw(self, ids: np.ndarray, *, seed: int) -> DeviceDraws:
        """Profiles of devices ``ids`` in SI units; each depends only on (seed, id)."""
        ids = self._checked(ids)
        which = self._class_index(ids, seed=seed)
        masks = [which == k for k in range(len(self.classes))]
        columns = {}
        for field, (column, factor, _) in FIELDS.items():
            values = np.empty(len(ids))
            for cls, mask in zip(self.classes, masks):
                values[mask] = getattr(cls, field).sample(seed=seed, field=field, ids=ids[mask]) * factor
            columns[column] = values
        names = np.array([cls.name for cls in self.classes], dtype=object)
        return DeviceDraws(device_id=ids, device_class=names[which], **columns)

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
