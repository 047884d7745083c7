"""Cost model: what one device's round costs in time, memory and bytes.

Two halves. :func:`measure` runs once per distinct (model, config) on the real
(sub)model: training FLOPs come from ``torch.utils.flop_counter`` and
activation memory from the tensors autograd actually saves for backward, so
every method that changes the model (fewer trainable layers, a pruned width)
changes its costs without a formula to keep in sync. :func:`device_costs`
turns those measurements and a cohort's profile draws into seconds and bytes
with array arithmetic; nothing is slept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from raysim.types import DeviceDraws

ADAM_STATE_BYTES_PER_PARAM = 8  # two fp32 moments
GRAD_BYTES_PER_PARAM = 4


@dataclass(frozen=True)
class Measurement:
    """Costs of one local training step of one config, measured on its model."""

    flops_per_step: float  # forward + backward, one batch
    activation_bytes: int  # distinct storages saved for backward (no weights)
    param_bytes: int  # every weight the device holds, at its dtype
    trainable_params: int
    bytes_down: int  # the state a device downloads
    bytes_up: int  # the encoded update a device uploads

    @property
    def peak_memory_bytes(self) -> int:
        per_param = GRAD_BYTES_PER_PARAM + ADAM_STATE_BYTES_PER_PARAM
        return self.param_bytes + self.trainable_params * per_param + self.activation_bytes


def measure(model: torch.nn.Module, *, batch: torch.Tensor, bytes_down: int, bytes_up: int,
            loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Measurement:
    """Run one forward/backward on ``batch`` and count FLOPs and saved bytes.

    ``loss(model, batch)``: the training loss the device computes (a sampled output loss); None: the
    model's own causal-LM loss (the full softmax).

    Leaves parameters untouched and gradients cleared.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            value = model(input_ids=batch, labels=batch).loss if loss is None else loss(model, batch)
        value.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = None
    return Measurement(
        flops_per_step=float(counter.get_total_flops()),
        activation_bytes=sum(saved.values()),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in trainable),
        bytes_down=bytes_down,
        bytes_up=bytes_up,
    )


@dataclass(frozen=True)
class DeviceCosts:
    """Per-device costs of one round, one array entry per device."""

    flops: np.ndarray  # training FLOPs of the round's local steps
    compute_s: np.ndarray
    download_s: np.ndarray
    upload_s: np.ndarray
    peak_memory_bytes: np.ndarray
    bytes_down: np.ndarray
    bytes_up: np.ndarray

    @property
    def total_s(self) -> np.ndarray:
        return self.download_s + self.compute_s + self.upload_s

    def fits(self, draws: DeviceDraws) -> np.ndarray:
        return self.peak_memory_bytes <= draws.memory_bytes


def device_costs(draws: DeviceDraws, measurements: list[Measurement], *, local_steps: int) -> DeviceCosts:
    """Seconds and bytes for each device given its config's measurement.

    A transfer costs one round-trip latency plus its bits over the link:
    ``download_s = rtt + 8 * bytes_down / downlink_bps``, likewise up.
    """
    flops = np.array([m.flops_per_step for m in measurements]) * local_steps
    down = np.array([m.bytes_down for m in measurements], dtype=np.int64)
    up = np.array([m.bytes_up for m in measurements], dtype=np.int64)
    return DeviceCosts(
        flops=flops,
        compute_s=flops / draws.train_flops_per_s,
        download_s=draws.rtt_s + 8.0 * down / draws.downlink_bps,
        upload_s=draws.rtt_s + 8.0 * up / draws.uplink_bps,
        peak_memory_bytes=np.array([m.peak_memory_bytes for m in measurements], dtype=np.int64),
        bytes_down=down,
        bytes_up=up,
    )
