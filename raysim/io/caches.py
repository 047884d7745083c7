"""What runs in one process can share because it would come out the same, owned by whoever runs them.

Measurements (FLOPs, activation and payload sizes of a config on its real
submodel) do not depend on weights or seeds, and a built dataset depends only
on the data settings and the split's seed; measuring a 48-config space costs
about 20 s on 2 cores, tokenizing the shipped corpus about 3 s. A study or
``raysim train-policy`` makes one :class:`Caches` and hands it to each of its
runs; a lone run makes its own. Keys are frozen config sections
(:func:`raysim.config.frozen`) holding everything the value depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Caches:
    measurements: dict[Hashable, object] = field(default_factory=dict)
    datasets: dict[Hashable, object] = field(default_factory=dict)

    @staticmethod
    def get(store: dict[Hashable, T], key: Hashable, make: Callable[[], T]) -> T:
        if key not in store:
            store[key] = make()
        return store[key]
