"""Update processors: what happens to each update on its device, and to their sum on the server.

The seam where privacy and compression plug in (as pfl-research's
postprocessors). A processor has a device hook, run on the actor in chain
order on every decoded update (in the aggregation space) before it joins the
unit's partial sum, and a server hook, run by the aggregator in reverse order
on the sum of all partial sums before it becomes the mean. Between rounds the
server half tells the device half what it needs (:meth:`UpdateProcessor.round_params`,
e.g. the clip norm adaptive clipping learnt). Hooks see frozen contexts. A new
mechanism is one class: central DP is :class:`raysim.privacy.central.CentralDP`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from raysim.aggregation.rules import PartialSum
from raysim.io.checkpoint import State
from raysim.types import DeviceConfig

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DeviceContext:
    seed: int
    round: int
    device_id: int
    config: DeviceConfig
    num_examples: int


@dataclass(frozen=True)
class DeviceUpdate:
    """One device's update on its way into the partial sum."""

    tensors: Tensors  # in the aggregation space; zero where the device held nothing
    weight: float  # its weight in the mean (FedAvg: its examples)
    held: Tensors | None  # name -> 0/1 mask of the elements the device held (None: all)
    norm: float  # L2 norm of the decoded update, before any processor
    counts: Mapping[str, float] = field(default_factory=dict)  # added up over devices with the partial sums


@dataclass(frozen=True)
class ServerContext:
    seed: int
    round: int
    num_devices: int
    support: dict[str, torch.Tensor] | None = None  # per state entry, what some config can change (None: all)


class UpdateProcessor:
    """A processor's hooks, and its server-side state for checkpoints; each does nothing unless overridden."""

    def round_params(self) -> object:
        """Server side, before a round: what the device side needs for it (sent with the round's state)."""
        return None

    def on_device(self, update: DeviceUpdate, *, context: DeviceContext, params: object) -> DeviceUpdate:
        return update

    def on_server(self, total: PartialSum, *, context: ServerContext) -> tuple[PartialSum, dict[str, float]]:
        """The round's sum (and the weights it will be divided by), transformed; and the round's stats."""
        return total, {}

    def checkpoint(self) -> State:
        """What the server side has learnt so far (a resumed run continues from it)."""
        return State()

    def restore(self, state: State) -> None:
        pass


def run_on_device(chain: Sequence[UpdateProcessor], update: DeviceUpdate, *, context: DeviceContext,
                  params: Sequence[object]) -> DeviceUpdate:
    for processor, p in zip(chain, params, strict=True):
        update = processor.on_device(update, context=context, params=p)
    return update


def run_on_server(chain: Sequence[UpdateProcessor], total: PartialSum, *,
                  context: ServerContext) -> tuple[PartialSum, dict[str, float]]:
    stats: dict[str, float] = {}
    for processor in reversed(chain):
        total, more = processor.on_server(total, context=context)
        stats |= more
    return total, stats
