"""User-level central DP (DP-FedAvg, McMahan et al. 2018): pure functions, adaptive clipping, and the processor.

Each device's update, in the aggregation space, is clipped to L2 norm C over
all its tensors jointly; the sum of clipped updates gets Gaussian noise of std
``z * C`` per coordinate, drawn from a generator keyed by (seed, round); the
noisy sum is divided by the expected cohort size q * N, a fixed denominator
that does not reveal how many devices took part. Clipping happens on the
device actors before their partial sums; since the sum is linear, that is
exactly clipping each update at the server. Only the coordinates some config
of the method space can change (the support) get noise, and only they are
released: off the support the aggregate is exactly zero whatever the devices
sent, and what they sent there is reported (``off_support_norm``; the run
fails unless it is 0). :class:`CentralDP` is the whole mechanism as one update
processor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from raysim import rng
from raysim.aggregation.rules import PartialSum, Tensors, global_norm
from raysim.engine.processors import DeviceContext, DeviceUpdate, ServerContext, UpdateProcessor
from raysim.io.checkpoint import State
from raysim.privacy import accounting

if TYPE_CHECKING:
    from raysim.privacy.plan import CentralPlan


def clip(update: Tensors, *, clip_norm: float, norm: float | None = None) -> tuple[Tensors, float]:
    """``update`` scaled to L2 norm at most ``clip_norm`` (float64), and its norm before clipping
    (``norm``, when it is known already)."""
    norm = global_norm(update) if norm is None else norm
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.to(torch.float64) * scale for k, v in update.items()}, norm


def gaussian_noise(like: Tensors, *, std: float, seed: int, round: int) -> Tensors:
    """N(0, std^2) per coordinate, float64, keyed by (seed, round): every actor count draws the same noise."""
    g = rng.generator(seed, "central-dp-noise", round)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * std for k, v in like.items()}


def off_support_norm(sums: Tensors, support: Tensors | None) -> float:
    """The L2 norm of ``sums`` outside ``support``: what devices sent where no config of the method space can
    change anything. 0.0 unless a method's map-back and its support disagree (NaN or inf if what they sent
    there was not finite)."""
    if support is None:
        return 0.0
    return global_norm({k: s[~support[k].to(s.device)] for k, s in sums.items()})


def noisy_sum(total: PartialSum, *, noise_std: float, expected_devices: float, seed: int,
              round: int, support: Tensors | None = None) -> tuple[PartialSum, float]:
    """The sum of clipped updates plus noise, to be divided by the expected cohort size; and its
    signal-to-noise ratio.

    Every element gets the same fixed denominator (the weights become
    ``expected_devices``), including where devices held different slices
    (per-element counts in ``total.weights``): dividing by how many devices
    held an element would reveal it. ``signal_to_noise`` is ||sum of clipped
    updates|| / ||noise added to it|| (inf without noise): below 1 the
    aggregate is mostly noise.

    ``support`` (per entry, a bool mask) is what is released: the coordinates some device could change,
    which get the noise. Off it the result is exactly zero, whatever the devices sent, so the state keeps its
    value there and nothing un-noised leaves the server (:func:`off_support_norm` measures what was
    discarded). The draws are the same either way (drawn in full, then masked), so a full support gives the
    unmasked noise exactly.
    """
    noise = gaussian_noise(total.sums, std=noise_std, seed=seed, round=round)
    sums = {k: s.cpu() for k, s in total.sums.items()}
    if support is not None:
        noise = {k: n * support[k] for k, n in noise.items()}
        sums = {k: torch.where(support[k], s, torch.zeros((), dtype=s.dtype)) for k, s in sums.items()}
    signal, noise_norm = global_norm(sums), global_norm(noise)
    denominator = torch.tensor(expected_devices, dtype=torch.float64)
    noisy = replace(total, sums={k: s + noise[k] for k, s in sums.items()}, weights={k: denominator for k in sums})
    return noisy, signal / noise_norm if noise_norm > 0 else math.inf


@dataclass(frozen=True)
class AdaptiveClipping:
    """How the clip norm tracks a quantile of update norms (Andrew et al. 2021, geometric update).

    Each round the server learns how many devices were not clipped, with
    Gaussian noise of std ``count_std``, and moves C by
    ``exp(-learning_rate * (noisy fraction - target_quantile))``.
    """

    target_quantile: float
    learning_rate: float
    count_std: float

    def step(self, clip_norm: float, *, num_unclipped: int, expected_devices: float, seed: int, round: int) -> float:
        """The next round's C, from this round's C and its count of unclipped updates."""
        g = rng.generator(seed, "adaptive-clip-count", round)
        noisy = (num_unclipped + self.count_std * float(torch.randn((), generator=g, dtype=torch.float64)))
        fraction = noisy / expected_devices
        return clip_norm * math.exp(-self.learning_rate * (fraction - self.target_quantile))


class CentralDP(UpdateProcessor):
    """DP-FedAvg in one processor: the device side clips (and counts who was not clipped); the server side adds
    the keyed noise, sets the fixed denominator, steps adaptive clipping and the accountant, and reports the
    round's clip norm, noise, signal-to-noise and ε."""

    def __init__(self, *, plan: CentralPlan, adaptive: AdaptiveClipping | None):
        self.plan = plan
        self.adaptive = adaptive
        self.clip_norm = plan.clip_norm  # the round's: the one copy (the actors get it with the round's state)
        self.accountant = accounting.make_accountant(plan.accountant)

    def round_params(self) -> float:
        return self.clip_norm

    def on_device(self, update: DeviceUpdate, *, context: DeviceContext, params: float) -> DeviceUpdate:
        """Clipped to the round's clip norm after decoding and mapping back (whatever the method or bit-width) and
        before it meets any other device's: the clip bounds exactly what the noise is calibrated for. Weight 1."""
        clipped, _ = clip(update.tensors, clip_norm=params, norm=update.norm)
        counts = {**update.counts, "unclipped": float(update.norm <= params)}
        return replace(update, tensors=clipped, weight=1.0, counts=counts)

    def on_server(self, total: PartialSum, *, context: ServerContext) -> tuple[PartialSum, dict[str, float]]:
        """Noise released every round, even over an empty sum, as the accountant assumes; only the support is
        released, and what devices sent off it is reported (``off_support_norm``: the run fails unless 0)."""
        plan = self.plan
        noise_std = plan.update_noise_multiplier * self.clip_norm
        noisy, snr = noisy_sum(total, noise_std=noise_std, expected_devices=plan.expected_devices, seed=context.seed,
                               round=context.round, support=context.support)
        noised = (sum(int(m.sum()) for m in context.support.values()) if context.support is not None
                  else sum(s.numel() for s in total.sums.values()))
        stats = {"clip_norm": self.clip_norm, "noise_std": noise_std, "signal_to_noise": snr, "noised_dims": noised,
                 "off_support_norm": off_support_norm(total.sums, context.support)}
        if self.adaptive is not None:
            self.clip_norm = self.adaptive.step(self.clip_norm, num_unclipped=int(total.counts.get("unclipped", 0)),
                                                expected_devices=plan.expected_devices, seed=context.seed,
                                                round=context.round)
        self.accountant.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate)
        return noisy, stats | {"epsilon": accounting.spent(self.accountant, delta=plan.delta), "delta": plan.delta}

    def checkpoint(self) -> State:
        return State(meta={"clip_norm": self.clip_norm, "history": [list(h) for h in self.accountant.history]})

    def restore(self, state: State) -> None:
        self.clip_norm = state.meta["clip_norm"]
        self.accountant.history = [tuple(h) for h in state.meta["history"]]
