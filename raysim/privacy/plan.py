"""A run's central-DP plan, fixed before any training: z, q, the clip norm and the rounds the budget allows.

Every privacy setting that depends on the population or on the accountant is
checked here, so a bad one fails with one clear message before the first
round: δ must be below 1 / population, a target ε must be reachable with some
z, a budget ε must allow at least one round, adaptive clipping's count noise
must leave the update a positive noise multiplier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from raysim.errors import ConfigError
from raysim.privacy import accounting

if TYPE_CHECKING:
    from raysim.config import PrivacyConfig


@dataclass(frozen=True)
class CentralPlan:
    noise_multiplier: float  # z: what the accountant is stepped with
    update_noise_multiplier: float  # z on the summed update (below z when adaptive clipping spends some)
    clip_norm: float  # the first round's clip norm
    sample_rate: float  # q = cohort.size / population (Poisson)
    expected_devices: float  # q * population: the fixed DP-FedAvg denominator
    delta: float
    accountant: str
    rounds: int  # rounds that run: all, or the last one within privacy.max_epsilon
    epsilon: float  # ε after those rounds
    count_std: float | None  # adaptive clipping's noise on the unclipped count; None: fixed clip norm


def update_noise_multiplier(noise_multiplier: float, *, count_std: float) -> float:
    """The noise multiplier left for the update when the clipped count takes its share of the budget.

    Andrew et al. 2021 (Theorem 1): releasing the count with noise std
    ``count_std`` and the update with multiplier z_Δ = (z^-2 - (2 count_std)^-2)^-1/2
    is as private as one Gaussian mechanism with multiplier z.
    """
    if noise_multiplier == 0:
        return 0.0
    rest = noise_multiplier ** -2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ValueError(f"count noise std {count_std} must exceed noise_multiplier / 2 = {noise_multiplier / 2}")
    return rest ** -0.5


def plan_central(cfg: PrivacyConfig, *, rounds: int, cohort_size: int, population_size: int) -> CentralPlan | None:
    """The plan for ``cfg``, or None when central DP is off (no ``privacy.clip_norm``)."""
    if cfg.clip_norm is None:
        return None
    if cfg.delta >= 1 / population_size:
        raise ConfigError(f"{cfg.delta:g} must be below 1 / population = {1 / population_size:g}",
                          field="privacy.delta")
    q = min(1.0, cohort_size / population_size)
    z = cfg.noise_multiplier
    common = dict(sample_rate=q, delta=cfg.delta, accountant=cfg.accountant)
    if cfg.target_epsilon is not None:
        try:
            z = accounting.noise_multiplier(target_epsilon=cfg.target_epsilon, rounds=rounds, **common)
        except ValueError as err:
            raise ConfigError(f"ε = {cfg.target_epsilon:g} is unreachable in {rounds} rounds at q = {q:g}, "
                              f"δ = {cfg.delta:g}: {err}", field="privacy.target_epsilon") from None
    budget = rounds
    if cfg.max_epsilon is not None:
        budget = accounting.rounds_within(max_epsilon=cfg.max_epsilon, noise_multiplier=z, rounds=rounds, **common)
        if budget == 0:
            first = accounting.epsilon(noise_multiplier=z, rounds=1, **common)
            raise ConfigError(f"one round at z = {z:g}, q = {q:g} already spends ε = {first:.4g} > {cfg.max_epsilon:g}",
                              field="privacy.max_epsilon")
    count_std = None
    z_update = z
    if cfg.adaptive_clipping.enabled:
        count_std = cfg.adaptive_clipping.count_std or q * population_size / 20
        try:
            z_update = update_noise_multiplier(z, count_std=count_std)
        except ValueError as err:
            raise ConfigError(f"{err}; raise it (default: expected cohort / 20) or cohort.size",
                              field="privacy.adaptive_clipping.count_std") from None
    return CentralPlan(
        noise_multiplier=z, update_noise_multiplier=z_update, clip_norm=cfg.clip_norm, sample_rate=q,
        expected_devices=q * population_size, delta=cfg.delta, accountant=cfg.accountant, rounds=budget,
        epsilon=accounting.epsilon(noise_multiplier=z, rounds=budget, **common), count_std=count_std,
    )
