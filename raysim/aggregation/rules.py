"""Aggregation rules as pure functions over partial sums.

A :class:`PartialSum` is what an actor returns for the devices of one unit of
work: float64 sums of weighted updates and the summed weights that went
into each element. Weights broadcast against the update, so a scalar weight
(every device holds the whole tensor) and a per-element count (devices hold
different slices) are the same code path. Partial sums are added in a fixed
order (:func:`combine`), so the result is the same bits however the work was
spread over actors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]


def global_norm(update: Tensors) -> float:
    """The L2 norm of all tensors of ``update`` taken together (in float64)."""
    return math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in update.values()))


@dataclass
class PartialSum:
    sums: Tensors  # name -> float64 sum of weight * update
    weights: Tensors  # name -> float64 summed weight, broadcastable to sums[name]
    num_devices: int = 0
    counts: dict[str, float] = field(default_factory=dict)  # per-device side counts, summed (update processors')

    @classmethod
    def zeros_like(cls, state: Tensors) -> PartialSum:
        return cls(
            sums={k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()},
            weights={k: torch.zeros((), dtype=torch.float64, device=v.device) for k, v in state.items()},
        )

    def add(self, update: Tensors, *, weight: float, held: Tensors | None = None,
            counts: Mapping[str, float] | None = None) -> None:
        """Accumulate one device's update with a scalar weight.

        ``held`` maps a name to the 0/1 mask (broadcastable) of the elements the
        device held; the update is zero elsewhere. Tensors missing from
        ``update`` were not held at all. ``counts`` are added to the sum's.
        """
        for name, delta in update.items():
            self.sums[name].add_(delta.to(torch.float64), alpha=weight)
            mask = None if held is None else held.get(name)
            if mask is None:
                self.weights[name].add_(weight)
            else:
                self.weights[name] = self.weights[name] + weight * mask
        self.num_devices += 1
        _add_counts(self.counts, counts or {})

    def to(self, device: str) -> PartialSum:
        return PartialSum(
            sums={k: v.to(device) for k, v in self.sums.items()},
            weights={k: v.to(device) for k, v in self.weights.items()},
            num_devices=self.num_devices,
            counts=dict(self.counts),
        )


def _add_counts(into: dict[str, float], more: Mapping[str, float]) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0.0) + value


def combine(partials: Iterable[PartialSum]) -> PartialSum:
    """The sum of partial sums, added one at a time in the order given (float64 addition is not associative:
    a fixed order gives the same bits every time). Sums without devices are skipped."""
    total = None
    for p in partials:
        if p is None or p.num_devices == 0:
            continue
        if total is None:
            total = PartialSum(sums={k: v.clone() for k, v in p.sums.items()},
                               weights={k: v.clone() for k, v in p.weights.items()}, num_devices=p.num_devices,
                               counts=dict(p.counts))
            continue
        for name in total.sums:
            total.sums[name] += p.sums[name]
            total.weights[name] = total.weights[name] + p.weights[name]
        total.num_devices += p.num_devices
        _add_counts(total.counts, p.counts)
    if total is None:
        raise ValueError("no updates to combine")
    return total


def weighted_mean(total: PartialSum) -> Tensors:
    """FedAvg: sum(w_k * delta_k) / sum(w_k) per element; 0 where nobody contributed.

    A zero mean leaves the global value as it was: elements that no device
    held keep their value.
    """
    out = {}
    for name, s in total.sums.items():
        w = total.weights[name].expand_as(s)
        out[name] = torch.where(w > 0, s / w.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    return out
