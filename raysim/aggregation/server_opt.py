"""Server optimizers: apply the aggregated update to the global state.

The aggregated update is the mean of ``local - global`` (a pseudo-gradient
with the sign of descent). FedAvg with server learning rate 1 sets the global
state to the average of the local states; FedAdam (Reddi et al., 2021,
"Adaptive Federated Optimization") keeps Adam moments of that update on the
server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from raysim.io.checkpoint import State
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import AggregationConfig

Tensors = dict[str, torch.Tensor]


class ServerOptimizer(Protocol):
    def step(self, state: Tensors, update: Tensors) -> Tensors: ...

    def checkpoint(self) -> State: ...

    def restore(self, state: State) -> None: ...


# aggregation.server_optimizer names one: a factory from the aggregation config
SERVER_OPTIMIZERS: Registry[Callable[[AggregationConfig], ServerOptimizer]] = Registry("server optimizer")


class FedAvg:
    def __init__(self, *, lr: float):
        self.lr = lr

    def step(self, state: Tensors, update: Tensors) -> Tensors:
        return {k: (v.double() + self.lr * update[k]).to(v.dtype) for k, v in state.items()}

    def checkpoint(self) -> State:
        return State()

    def restore(self, state: State) -> None:
        pass


class FedAdam:
    def __init__(self, *, lr: float, beta1: float, beta2: float, tau: float):
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Tensors = {}
        self.v: Tensors = {}

    def step(self, state: Tensors, update: Tensors) -> Tensors:
        out = {}
        for k, x in state.items():
            d = update[k]
            m = self.m.get(k, torch.zeros_like(d))
            v = self.v.get(k, torch.zeros_like(d))
            self.m[k] = m = self.beta1 * m + (1 - self.beta1) * d
            self.v[k] = v = self.beta2 * v + (1 - self.beta2) * d * d
            out[k] = (x.double() + self.lr * m / (v.sqrt() + self.tau)).to(x.dtype)
        return out

    def checkpoint(self) -> State:
        return State(tensors={**{f"m.{k}": t for k, t in self.m.items()}, **{f"v.{k}": t for k, t in self.v.items()}})

    def restore(self, state: State) -> None:
        self.m = {k[2:]: t for k, t in state.tensors.items() if k.startswith("m.")}
        self.v = {k[2:]: t for k, t in state.tensors.items() if k.startswith("v.")}


SERVER_OPTIMIZERS.register("fedavg")(lambda cfg: FedAvg(lr=cfg.server_lr))
SERVER_OPTIMIZERS.register("fedadam")(lambda cfg: FedAdam(lr=cfg.server_lr, beta1=cfg.beta1, beta2=cfg.beta2,
                                                          tau=cfg.tau))


def make_server_optimizer(cfg: AggregationConfig) -> ServerOptimizer:
    return SERVER_OPTIMIZERS[cfg.server_optimizer](cfg)
