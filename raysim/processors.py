"""Update processors: per-device transforms of an update, undone or finished on the server.

The seam where compression and privacy plug in (as pfl-research's
postprocessors): each processor has a device hook, run on the actor right
after local training in chain order, and a server hook, run by the aggregator
on the combined update in reverse order. Hooks see frozen contexts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

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
class ServerContext:
    seed: int
    round: int
    num_devices: int


class UpdateProcessor(Protocol):
    def on_device(self, update: Tensors, *, context: DeviceContext) -> Tensors: ...

    def on_server(self, aggregate: Tensors, *, context: ServerContext) -> Tensors: ...


def run_on_device(chain: list[UpdateProcessor], update: Tensors, *, context: DeviceContext) -> Tensors:
    for processor in chain:
        update = processor.on_device(update, context=context)
    return update


def run_on_server(chain: list[UpdateProcessor], aggregate: Tensors, *, context: ServerContext) -> Tensors:
    for processor in reversed(chain):
        aggregate = processor.on_server(aggregate, context=context)
    return aggregate
