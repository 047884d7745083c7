"""User-level central DP (DP-FedAvg, McMahan et al. 2018) as pure functions, and adaptive clipping.

Each device's update, in the aggregation space, is clipped to L2 norm C over
all its tensors jointly; the sum of clipped updates gets Gaussian noise of std
``z * C`` per coordinate, drawn from a generator keyed by (seed, round); the
noisy sum is divided by the expected cohort size q * N, a fixed denominator
that does not reveal how many devices took part. Clipping happens on the
device actors before their partial sums; since the sum is linear, that is
exactly clipping each update at the server.
"""

from __future__ import annotations

import math

import torch

from raysim import rng
from raysim.aggregation.rules import PartialSum, Tensors


def global_norm(update: Tensors) -> float:
    """The L2 norm of all tensors of ``update`` taken together (in float64)."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in update.values()))


def clip(update: Tensors, *, clip_norm: float) -> tuple[Tensors, float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (float64), and its norm before clipping."""
    norm = global_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.to(torch.float64) * scale for k, v in update.items()}, norm


def gaussian_noise(like: Tensors, *, std: float, seed: int, round: int) -> Tensors:
    """N(0, std^2) per coordinate, float64, keyed by (seed, round): every actor count draws the same noise."""
    g = rng.generator(seed, "central-dp-noise", round)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * std for k, v in like.items()}


def noisy_mean(total: PartialSum, *, noise_std: float, expected_devices: float, seed: int,
               round: int) -> tuple[Tensors, dict[str, float]]:
    """(sum of clipped updates + noise) / expected cohort size, and its signal-to-noise ratio.

    Every element gets the same fixed denominator, including where devices
    held different slices (per-element counts in ``total.weights``): dividing
    by how many devices held an element would reveal it.
    ``signal_to_noise`` is ||sum of clipped updates|| / ||noise added to it||
    (inf without noise): below 1 the aggregate is mostly noise.
    """
    noise = gaussian_noise(total.sums, std=noise_std, seed=seed, round=round)
    signal, noise_norm = global_norm(total.sums), global_norm(noise)
    mean = {k: (s.cpu() + noise[k]) / expected_devices for k, s in total.sums.items()}
    snr = signal / noise_norm if noise_norm > 0 else math.inf
    return mean, {"signal_to_noise": snr}


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


class AdaptiveClipNorm:
    """A clip norm that tracks a quantile of update norms (Andrew et al. 2021, geometric update).

    Each round the server learns how many devices were not clipped, with
    Gaussian noise of std ``count_std``, and moves C by
    ``exp(-learning_rate * (noisy fraction - target_quantile))``.
    """

    def __init__(self, *, clip_norm: float, target_quantile: float, learning_rate: float, count_std: float):
        self.clip_norm = clip_norm
        self.target_quantile = target_quantile
        self.learning_rate = learning_rate
        self.count_std = count_std

    def update(self, *, num_unclipped: int, expected_devices: float, seed: int, round: int) -> float:
        """Step C from this round's count of unclipped updates; return the new C."""
        g = rng.generator(seed, "adaptive-clip-count", round)
        noisy = (num_unclipped + self.count_std * float(torch.randn((), generator=g, dtype=torch.float64)))
        fraction = noisy / expected_devices
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm
