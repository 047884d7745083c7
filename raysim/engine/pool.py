"""A pool of long-lived device actors: actors are slots, devices are data.

The pool knows nothing of training; it places work. Its actors are reserved
as one placement group (:func:`raysim.cluster.reserve`), so a request the
cluster cannot hold fails in bounded time instead of hanging. Each round it
plans the round's units of work from the cohort alone (:mod:`raysim.engine.work`),
gives each idle actor the next unit with a ref to the round's state, and
returns one partial-sum ref per unit, in unit order, for the aggregator.
Which actor computed a unit changes nothing in its result, so a unit lost
with its actor or node is computed again elsewhere, and the round comes out
the same (:mod:`raysim.engine.dispatch`); a lost actor is replaced by a new one, up
to ``ray.max_retries`` times per actor.
"""

from __future__ import annotations

import math

import numpy as np
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raysim import cluster
from raysim.aggregation.rules import Tensors
from raysim.config import ExperimentConfig, frozen
from raysim.emulation.costmodel import Measurement
from raysim.engine import work
from raysim.engine.device import DeviceWorker, RoundInputs
from raysim.engine.dispatch import Actors, dispatch
from raysim.engine.processors import UpdateProcessor
from raysim.engine.records import DeviceRecords
from raysim.io.caches import Caches
from raysim.types import DeviceConfig

# Units queued on one actor at a time: the next one is there when the current one ends.
IN_FLIGHT_PER_ACTOR = 2

def measurement_key(cfg: ExperimentConfig) -> tuple:
    """Everything a measurement depends on besides the config itself (no weights, no seeds; not where it runs:
    measurements are taken on the CPU)."""
    return frozen((cfg.model, cfg.data.seq_len, cfg.data.tokenizer, cfg.data.source, cfg.train.batch_size,
                   cfg.methods, cfg.aggregation.lora, cfg.privacy.local.enabled, cfg.costs))


def threads_per_actor(cfg: ExperimentConfig) -> int:
    """torch threads of every device actor: one per whole CPU it owns (at least one).

    The same for every actor of a run, so a unit's float rounding does not depend on where it runs.
    """
    return max(1, int(cfg.ray.cpus_per_actor))


class DevicePool:
    def __init__(self, *, cfg: ExperimentConfig, base: ray.ObjectRef, dataset: ray.ObjectRef,
                 processors: list[UpdateProcessor] = (), num_actors: int | None = None, caches: Caches | None = None):
        self.cfg = cfg
        self.caches = caches or Caches()
        n = num_actors or cfg.ray.num_actors or cluster.actors_that_fit(
            cpus_per_actor=cfg.ray.cpus_per_actor, gpus_per_actor=cfg.ray.gpus_per_actor)
        self.group = cluster.reserve(num_actors=n, cpus_per_actor=cfg.ray.cpus_per_actor,
                                     gpus_per_actor=cfg.ray.gpus_per_actor, timeout_s=cfg.ray.placement_timeout_s)
        actor_cls = ray.remote(DeviceWorker)
        spawn = lambda i: actor_cls.options(  # noqa: E731  (actor i, in bundle i; again if it is lost)
            num_cpus=cfg.ray.cpus_per_actor, num_gpus=cfg.ray.gpus_per_actor,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=self.group,
                                                                 placement_group_bundle_index=i),
        ).remote(cfg=cfg, base=base, dataset=dataset, num_threads=threads_per_actor(cfg), processors=processors)
        self.actors = Actors(spawn, n, max_retries=cfg.ray.max_retries,
                             wait_s=cluster.placement_timeout_s(cfg.ray.placement_timeout_s))
        self._key = measurement_key(cfg)
        self._limits: dict[DeviceConfig, int] = {}
        self._eval_batches: int | None = None

    def __len__(self) -> int:
        return len(self.actors)

    def nodes(self) -> list[str]:
        """The node id of each actor."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def _map(self, items: list, call, *, what: str, in_flight: int = 1) -> list[tuple[object, tuple]]:
        return dispatch(self.actors, items, call, in_flight=in_flight, what=what)

    def _ask(self, method: str, *args) -> object:
        """One answer from any live actor (``measure``, ``pass_limit``, ...)."""
        [(value, _)] = self._map([args], lambda a, item: (getattr(a, method).remote(*item),), what=method)
        return value

    def close(self) -> None:
        """End the actors and release their reservation (their CPUs return to Ray)."""
        for actor in self.actors:
            ray.kill(actor)
        ray.util.remove_placement_group(self.group)

    def initial_state(self) -> Tensors:
        return self._ask("initial_state")

    def measure(self, config: DeviceConfig) -> Measurement:
        """Measured costs of ``config``, once per ``caches`` (:func:`measurement_key`)."""
        return Caches.get(self.caches.measurements, (self._key, config), lambda: self._ask("measure", config))

    def pass_limit(self, config: DeviceConfig) -> int:
        """Devices of ``config`` that may share one pass (``DeviceWorker.pass_limit``), asked once per config."""
        if config not in self._limits:
            self._limits[config] = self._ask("pass_limit", config)
        return self._limits[config]

    def train(
        self,
        state: ray.ObjectRef,
        *,
        round: int,
        device_ids: np.ndarray,
        configs: list[DeviceConfig],
        flops: np.ndarray,
        params: ray.ObjectRef | list[object] | None = None,
        utility: bool = False,
    ) -> tuple[DeviceRecords, list[ray.ObjectRef]]:
        """Train ``device_ids``; return their records (id order) and one partial-sum ref per unit, in unit order.

        ``flops``: each device's predicted training FLOPs (balances the units). ``params``: the update
        processors' round parameters, as a ref to ``Aggregator.round_params``'s result: the actors fetch them
        from the aggregator with the state, and the driver holds no copy. ``utility``: each record carries its update's
        first-order held-out utility (:class:`raysim.engine.evaluation.Utility`), else NaN.
        """
        units = work.plan(device_ids, configs, flops, pass_limit=self.pass_limit, max_units=self.cfg.ray.work_units)
        if not units:
            return DeviceRecords.concat([]), []
        inputs = RoundInputs(state=state, round=round, params=params, utility=utility)
        done = self._map(units, lambda a, unit: tuple(a.train.remote(unit, inputs)),
                         what=f"round {round}", in_flight=IN_FLIGHT_PER_ACTOR)
        return DeviceRecords.concat([records for records, _ in done]).by_device_id(), [refs[0] for _, refs in done]

    def evaluate(self, state: ray.ObjectRef) -> dict[str, float]:
        """Held-out loss per token, perplexity, top-1 and top-3 accuracy.

        Each actor evaluates every n-th batch; the per-batch sums are added in batch order.
        """
        if self._eval_batches is None:
            self._eval_batches = self._ask("num_eval_batches")
        n = len(self.actors)
        shards = [list(range(i, self._eval_batches, n)) for i in range(n)]
        done = self._map(shards, lambda a, batches: (a.evaluate.remote(state, batches),), what="evaluation")
        per_batch = None
        for batches, (totals, _) in zip(shards, done):
            if per_batch is None:  # four columns per model evaluated (HeldOut.evaluate)
                per_batch = np.zeros((self._eval_batches, totals.shape[1]), dtype=np.float64)
            per_batch[batches] = totals
        sums = per_batch.sum(axis=0)
        loss, tokens, top1, top3 = sums[:4]
        metrics = {"eval_loss": loss / tokens, "eval_perplexity": math.exp(loss / tokens),
                   "eval_accuracy": top1 / tokens, "eval_top3_accuracy": top3 / tokens}
        if len(sums) > 4:  # the emulator alone
            metrics |= {"emulator_eval_loss": sums[4] / sums[5], "emulator_eval_accuracy": sums[6] / sums[5]}
        return metrics
