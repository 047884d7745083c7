"""A pool of long-lived device actors: actors are slots, devices are data.

The pool knows nothing of training; it places work. Each round it hands the
global-state ref to every actor once, splits the devices to train into
chunks balanced by predicted compute, dispatches them with Ray's
``ActorPool`` (an idle actor takes the next chunk), then collects one partial
sum ref per actor for the aggregator.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import ray
from ray.util import ActorPool

from raysim.config import ExperimentConfig
from raysim.costmodel import Measurement
from raysim.device import DeviceWorker
from raysim.types import DeviceConfig


def default_num_actors(cfg: ExperimentConfig) -> int:
    """One actor per CPU share (and per GPU fraction when GPUs are asked for)."""
    resources = ray.available_resources()
    n = int(resources.get("CPU", 1) // cfg.ray.cpus_per_actor)
    if cfg.ray.gpus_per_actor > 0:
        n = min(n, int(resources.get("GPU", 0) // cfg.ray.gpus_per_actor))
    return max(1, n)


def balance(costs: np.ndarray, *, num_chunks: int) -> list[np.ndarray]:
    """Split positions into chunks of near-equal total cost (longest job first).

    Each chunk keeps its positions in ascending order.
    """
    num_chunks = max(1, min(num_chunks, len(costs)))
    heap = [(0.0, c) for c in range(num_chunks)]
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    for pos in np.argsort(-costs, kind="stable"):
        load, c = heapq.heappop(heap)
        chunks[c].append(int(pos))
        heapq.heappush(heap, (load + float(costs[pos]), c))
    return [np.sort(np.asarray(c, dtype=np.int64)) for c in chunks if c]


# Measurements are a pure function of the model, batch shape, method settings and config (FLOPs,
# activation and payload sizes do not depend on weights or seeds), so runs in one process (a study,
# train-policy) share them: measuring a 48-config space costs about 20 s on 2 cores.
_MEASURED: dict[tuple[str, DeviceConfig], Measurement] = {}


def measurement_key(cfg: ExperimentConfig) -> str:
    """Everything a measurement depends on besides the config itself."""
    return repr((cfg.model, cfg.data.seq_len, cfg.data.tokenizer, cfg.data.source, cfg.train.batch_size,
                 cfg.methods, cfg.ray.gpus_per_actor > 0))


class DevicePool:
    def __init__(self, *, cfg: ExperimentConfig, base: ray.ObjectRef, dataset: ray.ObjectRef,
                 num_actors: int | None = None):
        self.cfg = cfg
        n = num_actors or cfg.ray.num_actors or default_num_actors(cfg)
        actor_cls = ray.remote(DeviceWorker).options(num_cpus=cfg.ray.cpus_per_actor, num_gpus=cfg.ray.gpus_per_actor)
        threads = max(1, int(cfg.ray.cpus_per_actor))
        self.actors = [actor_cls.remote(cfg=cfg, base=base, dataset=dataset, num_threads=threads) for _ in range(n)]
        self._key = measurement_key(cfg)

    def __len__(self) -> int:
        return len(self.actors)

    def close(self) -> None:
        """End the actors (their CPUs return to Ray)."""
        for actor in self.actors:
            ray.kill(actor)

    def initial_state(self) -> ray.ObjectRef:
        return self.actors[0].initial_state.remote()

    def measure(self, config: DeviceConfig) -> Measurement:
        """Measured costs of ``config``, cached for the process's lifetime (:func:`measurement_key`)."""
        key = (self._key, config)
        if key not in _MEASURED:
            _MEASURED[key] = ray.get(self.actors[0].measure.remote(config))
        return _MEASURED[key]

    def train(
        self,
        state: ray.ObjectRef,
        *,
        round: int,
        device_ids: np.ndarray,
        configs: list[DeviceConfig],
        costs: np.ndarray,
        clip_norm: float | None = None,
        utility: bool = False,
    ) -> tuple[dict[str, np.ndarray], list[ray.ObjectRef]]:
        """Train ``device_ids``; return their records (id order) and partial-sum refs.

        ``clip_norm``: DP-FedAvg's per-device clip norm for this round (None: no clipping). ``utility``: each
        record carries its update's first-order held-out utility (``DeviceWorker._loss_gradient``), else NaN.
        """
        for actor in self.actors:
            actor.begin_round.remote(state, round, clip_norm, utility)
        chunks = balance(costs, num_chunks=len(self.actors) * self.cfg.ray.chunks_per_actor)
        work = [([int(device_ids[p]) for p in chunk], [configs[p] for p in chunk]) for chunk in chunks]
        results = list(ActorPool(self.actors).map_unordered(lambda a, w: a.train.remote(*w), work))
        partials = [actor.end_round.remote() for actor in self.actors]
        if not results:
            return {"device_id": np.empty(0, np.int64), "train_loss": np.empty(0), "num_examples": np.empty(0, np.int64),
                    "update_norm": np.empty(0), "utility": np.empty(0)}, partials
        records = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
        order = np.argsort(records["device_id"])
        return {k: v[order] for k, v in records.items()}, partials

    def evaluate(self, state: ray.ObjectRef) -> dict[str, float]:
        """Held-out loss per token, perplexity, top-1 and top-3 accuracy; one shard per actor."""
        n = len(self.actors)
        loss, tokens, top1, top3 = sum(ray.get([a.evaluate.remote(state, shard=i, num_shards=n)
                                               for i, a in enumerate(self.actors)]))
        return {"eval_loss": loss / tokens, "eval_perplexity": math.exp(loss / tokens),
                "eval_accuracy": top1 / tokens, "eval_top3_accuracy": top3 / tokens}
