"""Cohort sampling at virtual time t, in O(cohort) memory whatever the population size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from raysim import rng
from raysim.config import CohortConfig


class Availability(Protocol):
    size: int

    def available(self, ids: np.ndarray, *, seed: int, round: int, sim_time_s: float) -> np.ndarray: ...


@dataclass(frozen=True)
class Cohort:
    device_id: np.ndarray  # sorted ascending: devices are visited in id order
    available: np.ndarray  # bool, per device
    target: int  # updates that close the round


def sample_cohort(population: Availability, cfg: CohortConfig, *, seed: int, round: int, sim_time_s: float) -> Cohort:
    """Select the round's devices.

    ``fixed``: ``ceil(size * over_selection)`` devices drawn uniformly among
    those available at ``sim_time_s`` (devices check in when eligible, as in
    production FL). ``poisson``: every device is selected independently with
    probability ``size / population`` regardless of availability, as
    DP-FedAvg's accounting assumes; unavailable ones are kept and marked.
    """
    n_pop = population.size
    gen = np.random.default_rng(rng.key(seed, "cohort", round))
    if cfg.sampling == "poisson":
        count = int(gen.binomial(n_pop, min(1.0, cfg.size / n_pop)))
        ids = np.sort(gen.choice(n_pop, size=count, replace=False))
        available = population.available(ids, seed=seed, round=round, sim_time_s=sim_time_s)
        return Cohort(device_id=ids, available=available, target=count)
    wanted = min(n_pop, math.ceil(cfg.size * cfg.over_selection))
    k = wanted
    while True:
        candidates = gen.choice(n_pop, size=min(n_pop, k), replace=False)
        ok = population.available(candidates, seed=seed, round=round, sim_time_s=sim_time_s)
        chosen = candidates[ok][:wanted]
        if len(chosen) == wanted or k >= n_pop:
            break
        k *= 4
    ids = np.sort(chosen)
    return Cohort(device_id=ids, available=np.ones(len(ids), dtype=bool), target=cfg.size)
