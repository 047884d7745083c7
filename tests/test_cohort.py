"""Cohort sampling: who is selected at virtual time t, keyed by (seed, round), in O(cohort) work."""

import math
from dataclasses import dataclass

import numpy as np
import pytest

from raysim import rng
from raysim.config import CohortConfig
from raysim.emulation.cohort import sample_cohort
from raysim.emulation.profiles import load_population


@dataclass(frozen=True)
class KeyedAvailability:
    """Each device available with probability ``p`` per round, keyed like a population's availability."""

    size: int
    p: float

    def available(self, ids, *, seed, round, sim_time_s):
        return rng.uniform(seed, "available", round, ids=ids) < self.p


def test_fixed_cohorts_select_ceil_size_times_over_selection_available_devices_in_id_order():
    population = load_population("gboard", size=100_000)
    cohort = sample_cohort(population, CohortConfig(size=16, over_selection=1.3), seed=0, round=1, sim_time_s=0.0)
    assert len(cohort.device_id) == math.ceil(16 * 1.3) and cohort.target == 16
    assert np.all(np.diff(cohort.device_id) > 0) and cohort.available.all()
    assert population.available(cohort.device_id, seed=0, round=1, sim_time_s=0.0).all()


def test_a_cohort_is_a_function_of_seed_and_round():
    population = KeyedAvailability(size=10_000, p=0.5)
    cfg = CohortConfig(size=20)
    first = sample_cohort(population, cfg, seed=3, round=7, sim_time_s=0.0).device_id
    assert np.array_equal(first, sample_cohort(population, cfg, seed=3, round=7, sim_time_s=0.0).device_id)
    assert not np.array_equal(first, sample_cohort(population, cfg, seed=3, round=8, sim_time_s=0.0).device_id)
    assert not np.array_equal(first, sample_cohort(population, cfg, seed=4, round=7, sim_time_s=0.0).device_id)


def test_fixed_cohorts_keep_drawing_when_few_devices_are_available():
    cohort = sample_cohort(KeyedAvailability(size=100_000, p=0.01), CohortConfig(size=50), seed=0, round=1,
                           sim_time_s=0.0)
    assert len(cohort.device_id) == 50


def test_a_fixed_cohort_larger_than_the_available_devices_takes_them_all():
    population = KeyedAvailability(size=200, p=0.5)
    cohort = sample_cohort(population, CohortConfig(size=500), seed=0, round=1, sim_time_s=0.0)
    available = population.available(np.arange(200), seed=0, round=1, sim_time_s=0.0)
    assert cohort.device_id.tolist() == np.flatnonzero(available).tolist()


def test_poisson_cohorts_select_each_device_with_probability_size_over_population():
    """Mean count over 400 rounds: within 5 standard errors of q N (Binomial(N, q) per round)."""
    population = KeyedAvailability(size=50_000, p=0.3)
    cfg = CohortConfig(size=100, sampling="poisson")
    counts = [len(sample_cohort(population, cfg, seed=0, round=r, sim_time_s=0.0).device_id) for r in range(400)]
    q = 100 / 50_000
    assert np.mean(counts) == pytest.approx(100, abs=5 * math.sqrt(50_000 * q * (1 - q) / 400))


def test_poisson_cohorts_keep_unavailable_devices_and_mark_them():
    population = KeyedAvailability(size=50_000, p=0.3)
    cohort = sample_cohort(population, CohortConfig(size=500, sampling="poisson"), seed=0, round=2, sim_time_s=0.0)
    assert cohort.target == len(cohort.device_id)  # the accounting's q does not depend on availability
    assert 0.2 < cohort.available.mean() < 0.4
    assert np.array_equal(cohort.available, population.available(cohort.device_id, seed=0, round=2, sim_time_s=0.0))


def test_sampling_costs_the_cohort_not_the_population():
    cohort = sample_cohort(KeyedAvailability(size=10**12, p=0.5), CohortConfig(size=1000), seed=0, round=1,
                           sim_time_s=0.0)
    assert len(cohort.device_id) == 1000 and cohort.device_id.max() < 10**12
