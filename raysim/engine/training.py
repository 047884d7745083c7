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
from raysim.models import classifier
from raysim.models.fastops import device_losses
from raysim.models.grouped import keyed, stacked
from raysim.privacy.local import LocalDPSGD
from raysim.split.mechanisms import Mechanism
from raysim.split.protocol import Crossing, split_step


@dataclass(frozen=True)
class LocalData:
    """What each device of a group trains on, in the group's order."""

    examples: list[torch.Tensor]  # per device: its token sequences
    batches: list[torch.Tensor]  # per device: (steps, batch size) indices into its sequences
    generators: list[torch.Generator]  # per device: its model-dropout masks
    keep: torch.Tensor | None = None  # (vocab, 1) 0/1: the embedding rows a partial-embeddings device may change
    noise: list[torch.Generator] | None = None  # per device: its noise samples of a sampled output loss
    labels: list[torch.Tensor] | None = None  # data.task: classification: per device, its sequences' labels
    pad_id: int | None = None  # classification: the EOS whose first position the head reads


@dataclass(frozen=True)
class SplitTraining:
    """A split device's mechanism, and the starts of the server's further adapter sets (P³EFT)."""

    mechanism: Mechanism
    server_names: list[str]  # the trainable parameters the server holds, in order
    set_starts: list[list[torch.Tensor]]  # per further set, its starts of server_names


@dataclass(frozen=True)
class Trained:
    """What training a group gives back."""

    tensors: list[torch.Tensor]  # per trainable parameter, the trained values stacked over devices (row j: device j)
    losses: torch.Tensor  # per device, its mean loss over the steps
    crossings: list[Crossing | None]  # per device, what crossed its cut (None: not split)
    sets: list[list[torch.Tensor]] = ()  # a split device's further adapter sets: trained values of server_names


@dataclass(frozen=True)
class DPSGD:
    """A device's local DP-SGD: the submodel's Opacus wrapper and the device's keyed generators."""

    engine: LocalDPSGD
    batch_size: int
    batch_generator: torch.Generator
    noise_generator: torch.Generator


def train_group(sub: Submodel, starts: list[torch.Tensor], data: LocalData, *, steps: int, lr: float,
                weight_decay: float, dp: DPSGD | None = None, output: OutputLoss | None = None,
                chunked: bool = True, split: SplitTraining | None = None) -> Trained:
    """Train the group from ``starts`` (one tensor per trainable parameter of ``sub``), with the full softmax
    (chunk by chunk through the head unless ``chunked`` is off), the sampled ``output`` loss (each device's
    samples from its ``data.noise`` generator), or the classification loss where ``data.labels`` are given. A
    split device (one per group) trains through the split protocol (:mod:`raysim.split.protocol`)."""
    k = len(data.examples)
    if k > 1:
        tensors, optimizer, weights = _stacked(sub, starts, k=k, lr=lr, weight_decay=weight_decay)
    else:
        tensors, optimizer, weights = _single(sub, starts)
    device = starts[0].device
    loss_sum = torch.zeros(k, device=device)
    crossings = []
    sets = _sets(split, lr=lr, weight_decay=weight_decay)
    with weights, keyed(sub.dropout_keys, data.generators):
        if dp is not None:  # k == 1: DP-SGD on Poisson batches of the device's examples
            loss_sum += steps * dp.engine.train(data.examples[0], steps=steps, batch_size=dp.batch_size, device=device,
                                                batch_generator=dp.batch_generator, noise_generator=dp.noise_generator)
        else:
            for step in range(steps):
                x = torch.cat([rows[b[step]] for rows, b in zip(data.examples, data.batches)]).to(device)
                if split is not None:  # k == 1
                    y = data.labels[0][data.batches[0][step]]
                    done = split_step(sub.lm, sub.space.arch.blocks, x, y, cut=sub.structure.cut, pad_id=data.pad_id,
                                      mechanism=split.mechanism, sets=[dict(zip(split.server_names, params))
                                                                       for params, _ in sets])
                    crossings.append(Crossing(done.activations.float().cpu().numpy(),
                                              done.gradients.float().cpu().numpy(), y.numpy()))
                    losses = done.loss.view(1)
                    for _, set_optimizer in sets:
                        set_optimizer.step()
                        set_optimizer.zero_grad(set_to_none=True)
                else:
                    losses = _losses(sub, x, data, step=step, devices=k, output=output, chunked=chunked)
                    losses.sum().backward()
                if data.keep is not None:
                    sub.params[sub.space.embedding].grad.mul_(data.keep)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += losses.detach()
    per_device = [Crossing.concat(crossings)] if crossings else [None] * k
    return Trained(tensors=tensors, losses=loss_sum / steps, crossings=per_device,
                   sets=[[p.detach() for p in params] for params, _ in sets])


def _sets(split: SplitTraining | None, *, lr: float, weight_decay: float) -> list[tuple[list, torch.optim.Optimizer]]:
    """The server's further adapter sets as parameters, each with its AdamW (fresh every round, as the device's)."""
    out = []
    for starts in () if split is None else split.set_starts:
        params = [torch.nn.Parameter(t.clone()) for t in starts]
        out.append((params, torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)))
    return out


def _losses(sub: Submodel, x: torch.Tensor, data: LocalData, *, step: int, devices: int, output: OutputLoss | None,
            chunked: bool) -> torch.Tensor:
    """Each device's loss on its rows of ``x``: the classification loss, the sampled output loss or the softmax."""
    if data.labels is not None:
        y = torch.cat([labels[b[step]] for labels, b in zip(data.labels, data.batches)])
        return classifier.device_losses(sub.lm, x, y, pad_id=data.pad_id, devices=devices)
    if output is not None:
        return output.losses(sub.lm, x, devices=devices, samples=output.draw(data.noise))
    return device_losses(sub.lm, x, devices=devices, chunked=chunked)


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
