"""Cohort sampling at virtual time t, in O(cohort) memory whatever the population size."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from raysim import rng
from raysim.registry import Registry

if TYPE_CHECKING:
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
    """Select the round's devices, as ``cohort.sampling`` names (:data:`SAMPLING`), from a generator keyed by
    (seed, round)."""
    gen = np.random.default_rng(rng.key(seed, "cohort", round))
    return SAMPLING[cfg.sampling](population, cfg, gen=gen, seed=seed, round=round, sim_time_s=sim_time_s)


Sampler = Callable[..., Cohort]
SAMPLING: Registry[Sampler] = Registry("cohort sampling")  # cohort.sampling names one


@SAMPLING.register("fixed")
def fixed(population: Availability, cfg: CohortConfig, *, gen: np.random.Generator, seed: int, round: int,
          sim_time_s: float) -> Cohort:
    """``ceil(size * over_selection)`` devices drawn uniformly among those available at ``sim_time_s`` (devices
    check in when eligible, as in production FL)."""
    n_pop = population.size
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


@SAMPLING.register("poisson")
def poisson(population: Availability, cfg: CohortConfig, *, gen: np.random.Generator, seed: int, round: int,
            sim_time_s: float) -> Cohort:
    """Every device selected independently with probability ``size / population`` regardless of availability,
    as DP-FedAvg's accounting assumes; unavailable ones are kept and marked."""
    n_pop = population.size
    count = int(gen.binomial(n_pop, min(1.0, cfg.size / n_pop)))
    ids = np.sort(gen.choice(n_pop, size=count, replace=False))
    available = population.available(ids, seed=seed, round=round, sim_time_s=sim_time_s)
    return Cohort(device_id=ids, available=available, target=count)
