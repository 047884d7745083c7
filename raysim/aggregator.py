"""The aggregator: holds the global trainable state and applies each round's updates.

Run as a Ray actor on the driver's node. It receives the units' partial sums
as object refs (the driver never fetches the tensors), fetches them one at a
time and adds them in unit order (:mod:`raysim.work`), so neither the memory
it needs nor the float64 rounding of the sum depends on the actors; then it
combines them with a pure rule,
finishes the processor chain's server side, and takes a server-optimizer
step. Under DP-FedAvg the rule is the noisy mean over the expected cohort
(:mod:`raysim.privacy.central`): the actors clipped each update already, the
noise is added here, once. The new state is returned as its own object so the driver can hand the
ref to the device actors without fetching it.
"""

from __future__ import annotations

import math

import ray
import torch

from raysim.aggregation.rules import PartialSum, Tensors, combine, weighted_mean
from raysim.aggregation.server_opt import make_server_optimizer
from raysim.config import AggregationConfig
from raysim.methods.submodel import Space
from raysim.privacy.central import AdaptiveClipNorm, noisy_mean
from raysim.privacy.plan import CentralPlan
from raysim.processors import ServerContext, UpdateProcessor, run_on_server


class Aggregator:
    def __init__(self, *, state: Tensors, cfg: AggregationConfig, seed: int, processors: list[UpdateProcessor] = (),
                 space: Space | None = None, truncation_rank: int = 0, privacy: CentralPlan | None = None,
                 adaptive: AdaptiveClipNorm | None = None):
        # The aggregator takes no CPU slot from the device actors; with torch's default
        # thread pool its idle OpenMP threads would spin on their cores after every step.
        torch.set_num_threads(1)
        self.state = {k: v.clone() for k, v in state.items()}
        self.optimizer = make_server_optimizer(cfg)
        self.processors = list(processors)
        self.seed = seed
        self.space = space
        self.truncation_rank = truncation_rank
        self.privacy = privacy
        self.adaptive = adaptive
        self.clip_norm = privacy.clip_norm if privacy else None

    def get_state(self) -> Tensors:
        return self.state

    def aggregate(self, round: int, partials: list[PartialSum | ray.ObjectRef],
                  num_unclipped: int = 0) -> tuple[Tensors, dict[str, float]]:
        """One server step over the units' partial sums (in unit order); returns (new state, stats).

        Without DP the state stays when no update came; with DP the noise is
        released every round, even over an empty sum, as the accountant assumes.
        ``num_unclipped`` (devices whose update norm was within the clip norm)
        feeds adaptive clipping. Stats give the round's ``clip_norm`` and the next one's.
        """
        stats = {"noise_std": 0.0, "signal_to_noise": math.inf, "clip_norm": self.clip_norm}
        if not partials and self.privacy is None:
            return self.state, {"update_norm": 0.0, "num_aggregated": 0, **stats, "next_clip_norm": self.clip_norm,
                                **self._truncation()}
        fetched = (ray.get(p) if isinstance(p, ray.ObjectRef) else p for p in partials)
        total = combine(fetched) if partials else PartialSum.zeros_like(self.state)
        if self.privacy is None:
            update = weighted_mean(total)
        else:
            stats["noise_std"] = self.privacy.update_noise_multiplier * self.clip_norm
            update, noise_stats = noisy_mean(total, noise_std=stats["noise_std"], seed=self.seed, round=round,
                                             expected_devices=self.privacy.expected_devices)
            stats |= noise_stats
            if self.adaptive is not None:
                self.clip_norm = self.adaptive.update(num_unclipped=num_unclipped,
                                                      expected_devices=self.privacy.expected_devices,
                                                      seed=self.seed, round=round)
        update = run_on_server(
            self.processors, update, context=ServerContext(seed=self.seed, round=round, num_devices=total.num_devices)
        )
        self.state = self.optimizer.step(self.state, update)
        norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()))
        return self.state, {"update_norm": norm, "num_aggregated": total.num_devices, **stats,
                            "next_clip_norm": self.clip_norm, **self._truncation()}

    def _truncation(self) -> dict[str, float]:
        """How much of the new state the lowest-rank LoRA device cannot start from."""
        if self.space is None or self.truncation_rank == 0:
            return {"lora_truncation_error": math.nan}
        return {"lora_truncation_error": self.space.truncation_error(self.state, rank=self.truncation_rank)}
