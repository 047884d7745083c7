"""Local training of one group of devices on their submodel, with explicit inputs.

Three ways a pass goes, chosen by the group: several devices of one LoRA-only
config train *stacked* (each trainable weight gets a leading device
dimension, :mod:`raysim.models.grouped`, one fused AdamW over the stacks); one
device trains on the submodel's own tensors and optimizer; one device under
local DP-SGD trains through Opacus (:mod:`raysim.privacy.local`). Model
dropout draws from each device's own generator in every case.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from raysim.methods.output_loss import OutputLoss
from raysim.methods.submodel import Submodel
from raysim.models.fastops import device_losses
from raysim.models.grouped import keyed, stacked
from raysim.privacy.local import LocalDPSGD


@dataclass(frozen=True)
class LocalData:
    """What each device of a group trains on, in the group's order."""

    examples: list[torch.Tensor]  # per device: its token sequences
    batches: list[torch.Tensor]  # per device: (steps, batch size) indices into its sequences
    generators: list[torch.Generator]  # per device: its model-dropout masks
    keep: torch.Tensor | None = None  # (vocab, 1) 0/1: the embedding rows a partial-embeddings device may change
    noise: list[torch.Generator] | None = None  # per device: its noise samples of a sampled output loss


@dataclass(frozen=True)
class DPSGD:
    """A device's local DP-SGD: the submodel's Opacus wrapper and the device's keyed generators."""

    engine: LocalDPSGD
    batch_size: int
    batch_generator: torch.Generator
    noise_generator: torch.Generator


def train_group(sub: Submodel, starts: list[torch.Tensor], data: LocalData, *, steps: int, lr: float,
                weight_decay: float, dp: DPSGD | None = None, output: OutputLoss | None = None,
                chunked: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Train the group from ``starts`` (one tensor per trainable parameter of ``sub``), with the full softmax
    (chunk by chunk through the head unless ``chunked`` is off) or the sampled ``output`` loss (each device's
    samples from its ``data.noise`` generator).

    Returns, per trainable parameter, the trained values stacked over devices
    (row j: device j), and each device's mean loss over the steps.
    """
    k = len(data.examples)
    if k > 1:
        tensors, optimizer, weights = _stacked(sub, starts, k=k, lr=lr, weight_decay=weight_decay)
    else:
        tensors, optimizer, weights = _single(sub, starts)
    device = starts[0].device
    loss_sum = torch.zeros(k, device=device)
    with weights, keyed(sub.dropout_keys, data.generators):
        if dp is not None:  # k == 1: DP-SGD on Poisson batches of the device's examples
            loss_sum += steps * dp.engine.train(data.examples[0], steps=steps, batch_size=dp.batch_size, device=device,
                                                batch_generator=dp.batch_generator, noise_generator=dp.noise_generator)
        else:
            for step in range(steps):
                x = torch.cat([rows[b[step]] for rows, b in zip(data.examples, data.batches)]).to(device)
                if output is None:
                    losses = device_losses(sub.lm, x, devices=k, chunked=chunked)
                else:
                    losses = output.losses(sub.lm, x, devices=k, samples=output.draw(data.noise))
                losses.sum().backward()
                if data.keep is not None:
                    sub.params[sub.space.embedding].grad.mul_(data.keep)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += losses.detach()
    return tensors, loss_sum / steps


def _stacked(sub: Submodel, starts: list[torch.Tensor], *, k: int, lr: float,
             weight_decay: float) -> tuple[list[torch.Tensor], torch.optim.Optimizer, AbstractContextManager]:
    """One (devices, ...) stack per trainable tensor, each row starting from the device's initial state."""
    tensors = [torch.nn.Parameter(t.unsqueeze(0).repeat(k, *(1,) * t.dim())) for t in starts]
    optimizer = torch.optim.AdamW(tensors, lr=lr, weight_decay=weight_decay, fused=True)
    return tensors, optimizer, stacked(sub.lm, list(sub.params), tensors)


def _single(sub: Submodel, starts: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.optim.Optimizer,
                                                                AbstractContextManager]:
    """The submodel's own tensors, loaded with ``starts``, and its optimizer with fresh state."""
    params = list(sub.params.values())
    with torch.no_grad():
        torch._foreach_copy_(params, starts)
    sub.optimizer.state.clear()
    return [p.unsqueeze(0) for p in params], sub.optimizer, nullcontext()  # views: row 0 is the model's tensor
