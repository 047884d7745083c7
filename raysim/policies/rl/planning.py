"""The value of a round's configs, every device's counterfactuals, and planning on the network's proposal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raysim.emulation.clock import settle_rounds


@dataclass(frozen=True)
class Rewards:
    """Weights of the round's value: progress, time (per typical round), a device's traffic, its failure."""

    progress: float = 1.0
    time: float = 1.0
    bytes: float = 0.01
    failure: float = 0.1


@dataclass(frozen=True)
class Proposal:
    """One round's choices and what they are worth: arrays over the cohort (and over the configs)."""

    rows: np.ndarray  # devices with a feasible config: the ones the policy chose for
    x: torch.Tensor  # their network inputs, (rows, configs, features)
    mask: torch.Tensor  # their feasible configs, (rows, configs)
    choice: np.ndarray  # every device's config (space position)
    total_s: np.ndarray  # predicted finish time of every (device, config)
    fits: np.ndarray  # (device, config) fits in memory
    traffic: np.ndarray  # (device, config) bytes up and down over the largest any config costs
    target: int  # arrivals that close the round


def values(i: int, options: np.ndarray, configs: np.ndarray, proposal: Proposal, *, g: np.ndarray,
           present: np.ndarray, mean_duration: float, rewards: Rewards, deadline_s: float | None) -> np.ndarray:
    """Device i's Q for each of its ``options`` with the others' ``configs``: every alternative round settled
    at once by the clock's rule on the cost model (who is aggregated, when the round closes)."""
    n = np.arange(len(configs))
    alternatives = np.repeat(configs[None, :], len(options), axis=0)
    alternatives[:, i] = options
    aggregated, duration = settle_rounds(finish_s=proposal.total_s[n, alternatives],
                                         arrives=present & proposal.fits[n, alternatives],
                                         target=proposal.target, deadline_s=deadline_s)
    count = aggregated.sum(axis=1)
    progress = np.where(count > 0, (g[alternatives] * aggregated).sum(axis=1) / np.maximum(count, 1), 0.0)
    return (rewards.progress * progress - rewards.time * duration / mean_duration
            - rewards.bytes * proposal.traffic[i, options] - rewards.failure * ~aggregated[:, i])


def counterfactual_values(proposal: Proposal, *, g: np.ndarray, present: np.ndarray, mean_duration: float,
                          rewards: Rewards, deadline_s: float | None) -> np.ndarray:
    """Q(a', a_-i) for every chosen-for device i and config a' (shape (rows, configs)); -inf where infeasible."""
    out = np.full(proposal.mask.shape, -np.inf)
    mask = proposal.mask.numpy()
    for r, i in enumerate(proposal.rows):
        options = np.flatnonzero(mask[r])
        out[r, options] = values(i, options, proposal.choice, proposal, g=g, present=present,
                                 mean_duration=mean_duration, rewards=rewards, deadline_s=deadline_s)
    return out


def first_duration(proposal: Proposal, *, deadline_s: float | None) -> float:
    """The proposal's own round duration, every device present: a typical round's before there was one."""
    n = np.arange(len(proposal.choice))
    _, duration = settle_rounds(finish_s=proposal.total_s[n, proposal.choice][None],
                                arrives=proposal.fits[n, proposal.choice][None], target=proposal.target,
                                deadline_s=deadline_s)
    return float(duration[0]) or 1.0


def best_responses(proposal: Proposal, *, sweeps: int, device_id: np.ndarray, g: np.ndarray, mean_duration: float,
                   rewards: Rewards, deadline_s: float | None) -> np.ndarray:
    """The proposal improved by ``sweeps`` sweeps of best responses under Q.

    Each device in turn (by device id) switches to the feasible config with the highest Q given the others'
    configs, every device assumed present (who will be unavailable or drop out is not known before the
    round); a sweep that changes nothing ends the search.
    """
    present = np.ones(len(proposal.choice), dtype=bool)
    mask = proposal.mask.numpy()
    choice = proposal.choice.copy()
    order = sorted(range(len(proposal.rows)), key=lambda r: device_id[proposal.rows[r]])
    for _ in range(sweeps):
        moved = False
        for r in order:
            i = proposal.rows[r]
            options = np.flatnonzero(mask[r])
            q = values(i, options, choice, proposal, g=g, present=present, mean_duration=mean_duration,
                       rewards=rewards, deadline_s=deadline_s)
            if q.max() > q[options == choice[i]][0] + 1e-9:
                choice[i], moved = options[int(np.argmax(q))], True
        if not moved:
            break
    return choice
