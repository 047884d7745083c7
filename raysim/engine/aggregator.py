"""The aggregator: holds the global trainable state and applies each round's updates.

Run as a Ray actor on the driver's node. It receives the units' partial sums
as object refs (the driver never fetches the tensors), fetches them one at a
time and adds them in unit order (:mod:`raysim.engine.work`), so neither the memory
it needs nor the float64 rounding of the sum depends on the actors. The
processor chain's server side transforms the sum (central DP adds its noise
and its fixed denominator: :class:`raysim.privacy.central.CentralDP`), the
weighted mean turns it into the update, and the server optimizer steps. The
new state is returned as its own object so the driver can hand the ref to the
device actors without fetching it.
"""

from __future__ import annotations

import math

import ray
import torch

from raysim.aggregation.rules import PartialSum, Tensors, combine, weighted_mean
from raysim.aggregation.server_opt import make_server_optimizer
from raysim.config import AggregationConfig
from raysim.engine.processors import ServerContext, UpdateProcessor, run_on_server
from raysim.io.checkpoint import State, nest, sub
from raysim.methods.coordinates import Space, Support


class NonFiniteUpdate(ArithmeticError):
    """A round whose aggregate is inf or NaN: the aggregator keeps the state before it, the driver raises this
    and the run fails (a run never finishes on non-finite numbers)."""


def _first_bad(tensors: Tensors) -> str:
    """The first tensor holding inf or NaN, as 'name: k of n elements'; '' if all are finite."""
    for name, t in tensors.items():
        if not (finite := torch.isfinite(t)).all():
            return f"{name}: {int((~finite).sum())} of {t.numel()} elements"
    return ""


class Aggregator:
    def __init__(self, *, state: Tensors, cfg: AggregationConfig, seed: int,
                 processors: list[UpdateProcessor] = (), space: Space | None = None, truncation_rank: int = 0,
                 support: Support | None = None):
        # The aggregator takes no CPU slot from the device actors; with torch's default
        # thread pool its idle OpenMP threads would spin on their cores after every step.
        torch.set_num_threads(1)
        self.state = {k: v.clone() for k, v in state.items()}
        self.optimizer = make_server_optimizer(cfg)
        self.processors = list(processors)
        self.seed = seed
        self.space = space
        self.truncation_rank = truncation_rank
        self.support = support
        self.round = 0  # the last round aggregated

    def get_state(self) -> Tensors:
        return self.state

    def round_params(self) -> list[object]:
        """What each processor's device side needs for the next round."""
        return [p.round_params() for p in self.processors]

    def aggregate(self, round: int, partials: list[PartialSum | ray.ObjectRef]) -> tuple[Tensors, dict]:
        """One server step over the units' partial sums (in unit order); returns (new state, stats).

        Where no element has any weight after the processors (no device came and
        none of them released anything), the state and the optimizer stay as they
        are. Stats hold the processors' stats; the next round's parameters are :meth:`round_params`.
        """
        self.round = round
        fetched = (ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in partials)
        total = combine(fetched) if partials else PartialSum.zeros_like(self.state)
        support = None if self.support is None else self.support.masks(self.state, round=round)
        total, stats = run_on_server(self.processors, total, context=ServerContext(
            seed=self.seed, round=round, num_devices=total.num_devices, support=support))
        update_norm = 0.0
        if any(bool((w > 0).any()) for w in total.weights.values()):
            update = weighted_mean(total)
            update_norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
            failure = f"the aggregated update is not finite ({bad})" if (bad := _first_bad(update)) else ""
            if not failure:
                state = self.optimizer.step(self.state, update)
                if bad := _first_bad(state):
                    failure = f"the server step made the global state non-finite ({bad})"
            if failure:  # the state stays that of the round before; the driver fails the run (NonFiniteUpdate)
                return self.state, {"non_finite": f"round {round}: {failure}"}
            self.state = state
        return self.state, {**stats, "update_norm": update_norm, "num_aggregated": total.num_devices,
                            **self._truncation()}

    def checkpoint(self, round: int) -> State | None:
        """The state after ``round`` (global state, server optimizer, processors), or None if a later round was
        aggregated since (its result was not recorded: the checkpoint would not match the files)."""
        if round != self.round:
            return None
        parts = {"optimizer": self.optimizer.checkpoint(), "state": State(tensors=dict(self.state)),
                 **{f"processor{i}": p.checkpoint() for i, p in enumerate(self.processors)}}
        return nest(parts)

    def restore(self, state: State, *, round: int) -> None:
        self.state = {k: v.clone() for k, v in sub(state, "state").tensors.items()}
        self.optimizer.restore(sub(state, "optimizer"))
        for i, p in enumerate(self.processors):
            p.restore(sub(state, f"processor{i}"))
        self.round = round

    def _truncation(self) -> dict[str, float]:
        """How much of the new state the lowest-rank LoRA device cannot start from."""
        if self.space is None or self.truncation_rank == 0:
            return {"lora_truncation_error": math.nan}
        return {"lora_truncation_error": self.space.truncation_error(self.state, rank=self.truncation_rank)}
