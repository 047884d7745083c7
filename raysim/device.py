"""The device worker: one long-lived process slot that emulates many devices in turn.

A worker holds the base model once. For each device it is handed, it loads the
round's global trainable state, trains for real on that device's data with
every random draw keyed by (seed, round, device id), runs the update through
the processor chain and adds it into a float64 partial sum. The round's
partial sum leaves the worker once, at ``end_round``; per-device records leave
as a few columns per work item. :mod:`raysim.pool` runs workers as Ray actors.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext

import numpy as np
import torch

from raysim import costmodel, rng
from raysim.aggregation.rules import PartialSum, Tensors
from raysim.config import ExperimentConfig
from raysim.data import FederatedDataset
from raysim.grouped import install_keyed_dropout, keyed, per_device_loss, stackable, stacked
from raysim.models import BaseModel, add_lora, instantiate, trainable_state
from raysim.processors import DeviceContext, UpdateProcessor, run_on_device
from raysim.types import DeviceConfig


def batch_indices(num_examples: int, *, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``steps`` batches drawn without replacement, reshuffling at each epoch."""
    need = steps * batch_size
    epochs = -(-need // num_examples)
    order = torch.cat([torch.randperm(num_examples, generator=generator) for _ in range(epochs)])
    return order[:need].view(steps, batch_size)


def state_nbytes(state: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class DeviceWorker:
    """Trains devices for the driver; wrapped as a Ray actor by the pool."""

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        base: BaseModel,
        dataset: FederatedDataset,
        num_threads: int,
        processors: list[UpdateProcessor] = (),
    ):
        torch.set_num_threads(num_threads)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.ray.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.dataset = dataset
        self.vocab_size = base.vocab_size
        model = instantiate(base)
        self.model = add_lora(model, rank=cfg.methods.lora_rank[0], methods=cfg.methods, seed=cfg.seed).to(self.device)
        self.params = trainable_state(self.model)
        # The adapted model itself: peft injected its layers in place, so calling it
        # directly skips the wrapper's per-call dispatch and trains the same weights.
        self.lm = self.model.get_base_model()
        install_keyed_dropout(self.lm)
        self.optimizer = torch.optim.AdamW(
            self.params.values(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True
        )
        tokens_per_device = cfg.train.batch_size * cfg.data.seq_len
        self.devices_per_pass = 1
        if stackable(self.model, list(self.params)):
            self.devices_per_pass = max(1, cfg.ray.tokens_per_pass // tokens_per_device)
        self.processors = list(processors)
        self._global: list[torch.Tensor] = []
        self._round = -1
        self._partial: PartialSum | None = None
        self._eval: torch.Tensor | None = None
        # Thousands of long-lived module and tensor objects: keep them out of every
        # cyclic-GC pass the per-device loop's garbage triggers.
        gc.freeze()

    def initial_state(self) -> Tensors:
        return {k: v.detach().cpu().clone() for k, v in self.params.items()}

    def measure(self, config: DeviceConfig) -> costmodel.Measurement:
        """Measured costs of one local step of ``config`` on this model."""
        g = rng.generator(self.cfg.seed, "measure")
        batch = torch.randint(0, self.vocab_size, (self.cfg.train.batch_size, self.cfg.data.seq_len), generator=g)
        size = state_nbytes(self.params)
        return costmodel.measure(self.model, batch=batch.to(self.device), bytes_down=size, bytes_up=size)

    def begin_round(self, state: Tensors, round: int) -> None:
        self._round = round
        self._global = [state[k].to(self.device) for k in self.params]
        self._partial = PartialSum.zeros_like(self.params)

    def train(self, device_ids: list[int], configs: list[DeviceConfig]) -> dict[str, np.ndarray]:
        """Train each device; return its records as columns.

        Consecutive devices with the same config train together, up to
        ``devices_per_pass`` at a time (see :mod:`raysim.grouped`).
        """
        losses = np.empty(len(device_ids))
        counts = np.empty(len(device_ids), dtype=np.int64)
        start = 0
        while start < len(device_ids):
            end = start + 1
            while end < len(device_ids) and end - start < self.devices_per_pass and configs[end] == configs[start]:
                end += 1
            losses[start:end], counts[start:end] = self._train_group(device_ids[start:end], configs[start])
            start = end
        return {"device_id": np.asarray(device_ids, dtype=np.int64), "train_loss": losses, "num_examples": counts}

    def end_round(self) -> PartialSum | None:
        partial, self._partial = self._partial, None
        if partial is None or partial.num_devices == 0:
            return None
        return partial.to("cpu")

    def evaluate(self, state: Tensors, *, shard: int, num_shards: int) -> np.ndarray:
        """Summed next-token loss, token count, top-1 and top-3 hits on a shard of held-out sequences."""
        if self._eval is None:
            self._eval = self.dataset.eval_examples()
        rows = self._eval[shard::num_shards]
        totals = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            torch._foreach_copy_(list(self.params.values()), [state[k].to(self.device) for k in self.params])
            self.model.eval()
            for batch in rows.split(self.cfg.eval.batch_size):
                batch = batch.to(self.device)
                logits = self.lm(input_ids=batch).logits[:, :-1].float()
                target = batch[:, 1:]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
                top3 = logits.topk(3, dim=-1).indices
                totals += torch.tensor([loss.item(), target.numel(), (top3[..., 0] == target).sum().item(),
                                        (top3 == target.unsqueeze(-1)).any(-1).sum().item()], dtype=torch.float64)
            self.model.train()
        return totals.numpy()

    def _train_group(self, device_ids: list[int], config: DeviceConfig) -> tuple[list[float], list[int]]:
        """Local training of devices that share ``config``; their updates go into the partial sum."""
        seed, round, k = self.cfg.seed, self._round, len(device_ids)
        data = [self.dataset.device_examples(d) for d in device_ids]
        batches = [
            batch_indices(len(x), steps=self.cfg.train.local_steps, batch_size=self.cfg.train.batch_size,
                          generator=rng.generator(seed, "batches", round, d))
            for d, x in zip(device_ids, data)
        ]
        # Model dropout draws from each device's own generator, whatever its group.
        generators = [torch.Generator(self.device).manual_seed(rng.torch_seed(seed, "train", round, d))
                      for d in device_ids]
        if k > 1:
            # One (devices, ...) stack per trainable tensor, each row starting from the global state.
            tensors = [torch.nn.Parameter(g.unsqueeze(0).repeat(k, *(1,) * g.dim())) for g in self._global]
            optimizer = torch.optim.AdamW(tensors, lr=self.cfg.train.lr, weight_decay=self.cfg.train.weight_decay,
                                          fused=True)
            weights = stacked(self.model, list(self.params), tensors)
        else:
            params = list(self.params.values())
            with torch.no_grad():
                torch._foreach_copy_(params, self._global)
            tensors = [p.unsqueeze(0) for p in params]  # views: row 0 is the trained model's tensor
            optimizer = self.optimizer
            optimizer.state.clear()
            weights = nullcontext()
        loss_sum = torch.zeros(k, device=self.device)
        with weights, keyed(generators):
            for step in range(self.cfg.train.local_steps):
                x = torch.cat([rows[b[step]] for rows, b in zip(data, batches)]).to(self.device)
                losses = per_device_loss(self.lm(input_ids=x).logits, x, devices=k)
                losses.sum().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += losses.detach()
        with torch.no_grad():
            for j, device_id in enumerate(device_ids):
                update = {name: t[j] - g for name, t, g in zip(self.params, tensors, self._global)}
                context = DeviceContext(seed=seed, round=round, device_id=device_id, config=config,
                                        num_examples=len(data[j]))
                update = run_on_device(self.processors, update, context=context)
                self._partial.add(update, weight=float(len(data[j])))
        return (loss_sum / self.cfg.train.local_steps).tolist(), [len(x) for x in data]
