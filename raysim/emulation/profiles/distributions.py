"""Profile distributions: how one field of a device class (compute, memory, bandwidth, ...) varies over devices.

Each is a frozen dataclass registered by the name a profile file gives as ``dist:`` (:data:`DISTRIBUTIONS`); it
reads its own keys from the file, samples device ``i``'s value from (seed, field, i) through :mod:`raysim.rng`,
and describes itself for ``raysim profiles show``. A new distribution is one class here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from raysim import rng
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.emulation.profiles.reader import Node

Bound = tuple[Callable[[float], bool], str]
POSITIVE: Bound = (lambda x: x > 0, "must be > 0")
NON_NEGATIVE: Bound = (lambda x: x >= 0, "must be >= 0")
PROBABILITY: Bound = (lambda x: 0 <= x <= 1, "must be a probability in [0, 1]")
HOUR: Bound = (lambda x: 0 <= x < 24, "must be an hour in [0, 24)")

DISTRIBUTIONS: Registry[type[Distribution]] = Registry("distribution")  # a field's ``dist:`` names one


def pick(u: np.ndarray, weights: tuple[float, ...]) -> np.ndarray:
    """Index of the weight whose cumulative interval holds each uniform draw."""
    cdf = np.cumsum(weights)
    return np.searchsorted(cdf / cdf[-1], u, side="right")


@DISTRIBUTIONS.register("fixed")
@dataclass(frozen=True, kw_only=True)
class Fixed:
    """The same value for every device."""

    keys: ClassVar[tuple[str, ...]] = ("value",)
    value: float
    tag: str
    source: str

    @classmethod
    def read(cls, node: Node, bound: Bound, provenance: dict[str, str]) -> Fixed:
        return cls(value=node.number("value", bound), **provenance)

    @property
    def median(self) -> float:
        return self.value

    def sample(self, *, seed: int, field: str, ids: np.ndarray) -> np.ndarray:
        return np.full(len(ids), self.value)

    def describe(self) -> str:
        return f"fixed {self.value:g}"


@DISTRIBUTIONS.register("lognormal")
@dataclass(frozen=True, kw_only=True)
class LogNormal:
    """``median * exp(sigma * N(0, 1))``: FedScale's spread for device capacities."""

    keys: ClassVar[tuple[str, ...]] = ("median", "sigma")
    median: float
    sigma: float
    tag: str
    source: str

    @classmethod
    def read(cls, node: Node, bound: Bound, provenance: dict[str, str]) -> LogNormal:
        if bound is PROBABILITY:
            raise node.error("dist", "a probability cannot be lognormal; use fixed or choice")
        return cls(median=node.number("median", bound), sigma=node.number("sigma", NON_NEGATIVE), **provenance)

    def sample(self, *, seed: int, field: str, ids: np.ndarray) -> np.ndarray:
        return self.median * np.exp(self.sigma * rng.normal(seed, "profile", field, ids=ids))

    def describe(self) -> str:
        return f"lognormal median {self.median:g}, sigma {self.sigma:g}"


@DISTRIBUTIONS.register("choice")
@dataclass(frozen=True, kw_only=True)
class Choice:
    """One of ``values`` with probabilities proportional to ``weights``."""

    keys: ClassVar[tuple[str, ...]] = ("values", "weights")
    values: tuple[float, ...]
    weights: tuple[float, ...]
    tag: str
    source: str

    @classmethod
    def read(cls, node: Node, bound: Bound, provenance: dict[str, str]) -> Choice:
        values, weights = node.numbers("values", bound), node.numbers("weights", NON_NEGATIVE)
        if len(weights) != len(values):
            raise node.error("weights", f"needs one weight per value ({len(values)}), got {len(weights)}")
        if sum(weights) <= 0:
            raise node.error("weights", "must not all be zero")
        return cls(values=values, weights=weights, **provenance)

    @property
    def median(self) -> float:
        order = np.argsort(self.values)
        cdf = np.cumsum(np.asarray(self.weights)[order])
        return float(np.asarray(self.values)[order][np.searchsorted(cdf / cdf[-1], 0.5)])

    def sample(self, *, seed: int, field: str, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.values)[pick(rng.uniform(seed, "profile", field, ids=ids), self.weights)]

    def describe(self) -> str:
        pairs = ", ".join(f"{v:g}: {w:g}" for v, w in zip(self.values, self.weights))
        return f"choice {{{pairs}}}"


Distribution = Fixed | LogNormal | Choice
