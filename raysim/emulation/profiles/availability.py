"""Availability: the probability that a device of a class is there at an hour of the virtual day.

Each kind is a frozen dataclass registered by the name a profile file gives as ``availability.kind:``
(:data:`AVAILABILITY`); it reads its own keys and gives ``probability(hour)``. A new pattern is one class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from raysim.emulation.profiles.distributions import HOUR, PROBABILITY
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.emulation.profiles.reader import Node

AVAILABILITY: Registry[type[Availability]] = Registry("availability")  # ``availability.kind:`` names one


@AVAILABILITY.register("constant")
@dataclass(frozen=True, kw_only=True)
class Constant:
    """Available with the same probability at every hour."""

    keys: ClassVar[tuple[str, ...]] = ("p",)
    p: float
    tag: str
    source: str

    @classmethod
    def read(cls, node: Node, provenance: dict[str, str]) -> Constant:
        return cls(p=node.number("p", PROBABILITY), **provenance)

    def probability(self, hour: float) -> float:
        return self.p

    def describe(self) -> str:
        return f"constant {self.p:g}"


@AVAILABILITY.register("diurnal")
@dataclass(frozen=True, kw_only=True)
class Diurnal:
    """One probability by day, another at night; the night may wrap midnight."""

    keys: ClassVar[tuple[str, ...]] = ("day", "night", "night_start_h", "night_end_h")
    day: float
    night: float
    night_start_h: float
    night_end_h: float
    tag: str
    source: str

    @classmethod
    def read(cls, node: Node, provenance: dict[str, str]) -> Diurnal:
        return cls(day=node.number("day", PROBABILITY), night=node.number("night", PROBABILITY),
                   night_start_h=node.number("night_start_h", HOUR), night_end_h=node.number("night_end_h", HOUR),
                   **provenance)

    def probability(self, hour: float) -> float:
        start, end = self.night_start_h, self.night_end_h
        is_night = start <= hour < end if start <= end else (hour >= start or hour < end)
        return self.night if is_night else self.day

    def describe(self) -> str:
        return (f"diurnal {self.day:g} by day, {self.night:g} at night "
                f"({self.night_start_h:g}h-{self.night_end_h:g}h)")


Availability = Constant | Diurnal
