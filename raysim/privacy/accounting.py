"""Privacy accounting: a thin layer over Opacus's maintained accountants.

DP-FedAvg releases one Poisson-subsampled Gaussian mechanism per round: users
are sampled with rate q and the sum of their clipped updates gets noise of
``z`` times the clip norm. ``rdp`` is Opacus's ``RDPAccountant`` (Rényi DP
with the tighter conversion of Balle et al. 2020), ``prv`` its
``PRVAccountant`` (numerical composition of privacy loss random variables,
Gopi et al. 2021; close to the PLD bound). A run steps an accountant once per
round; :func:`epsilon` and :func:`noise_multiplier` plan a run with the same
accountant objects, so ``raysim privacy`` and a run's ``epsilon`` column agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from raysim.registry import Registry

MAX_NOISE_MULTIPLIER = 1024.0  # calibration gives up above: noise 10^3 x the clip norm drowns any real cohort
# RDP at very high noise peaks at Opacus's largest order: a looser, still valid bound; not the user's to fix.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


@dataclass(frozen=True)
class Accountant:
    """An Opacus accountant ``privacy.accountant`` can name, and the least ε it certifies at a δ (if any)."""

    factory: Callable[[], IAccountant]
    floor: Callable[[float], float] | None = None


def _rdp_floor(delta: float) -> float:
    """The RDP accountant's ε as z grows without bound: its conversion at Rényi divergence 0."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=np.zeros(len(orders)), delta=delta)
    return float(eps)


ACCOUNTANTS: Registry[Accountant] = Registry("accountant")
ACCOUNTANTS.register("rdp")(Accountant(factory=RDPAccountant, floor=_rdp_floor))
ACCOUNTANTS.register("prv")(Accountant(factory=PRVAccountant))


def make_accountant(name: str) -> IAccountant:
    """A fresh accountant by name (:data:`ACCOUNTANTS`)."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; expected {ACCOUNTANTS.choices()}")
    return ACCOUNTANTS[name].factory()


def spent(accountant: IAccountant, *, delta: float) -> float:
    """ε spent so far at ``delta``: 0 before any step, inf once a step had no noise."""
    if not accountant.history:
        return 0.0
    if any(z <= 0 for z, _, _ in accountant.history):
        return math.inf
    return float(accountant.get_epsilon(delta=delta))


def epsilon(*, noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
            accountant: str = "rdp") -> float:
    """ε after ``rounds`` rounds at noise multiplier z and sampling rate q.

    The history a run builds by stepping (z, q) ``rounds`` times.
    """
    acc = make_accountant(accountant)
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return spent(acc, delta=delta)


def noise_multiplier(
    *, target_epsilon: float, sample_rate: float, rounds: int, delta: float, accountant: str = "rdp"
) -> float:
    """The z whose ε after ``rounds`` rounds is at most the target and within 0.5 % of it.

    Doubling then bisection over :func:`epsilon`, the function runs report ε
    with. Raises ``ValueError`` when even z = ``MAX_NOISE_MULTIPLIER`` spends
    more, or the target lies below what the accountant can certify for any z.
    """
    def eps(z: float) -> float:
        return epsilon(noise_multiplier=z, sample_rate=sample_rate, rounds=rounds, delta=delta, accountant=accountant)

    floor = ACCOUNTANTS[accountant].floor
    if floor is not None and target_epsilon < floor(delta):
        raise ValueError(f"the {accountant} accountant certifies no ε below {floor(delta):.4g} at δ = {delta:g}")
    lo, hi = 0.0, 1.0
    while (eps_hi := eps(hi)) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"it needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}")
    while target_epsilon - eps_hi > 0.005 * target_epsilon:
        mid = (lo + hi) / 2
        if (eps_mid := eps(mid)) <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


def rounds_within(*, max_epsilon: float, noise_multiplier: float, sample_rate: float, rounds: int, delta: float,
                  accountant: str = "rdp") -> int:
    """The largest T ≤ ``rounds`` whose ε is at most ``max_epsilon`` (0 when one round exceeds it).

    ε grows with T, so a bisection over T finds it in log2(rounds) evaluations.
    """
    def eps(t: int) -> float:
        return epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, rounds=t, delta=delta,
                       accountant=accountant)

    if eps(rounds) <= max_epsilon:
        return rounds
    lo, hi = 0, rounds  # eps(lo) <= max (or lo = 0), eps(hi) > max
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= max_epsilon:
            lo = mid
        else:
            hi = mid
    return lo
