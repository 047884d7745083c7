"""One split training step, run as the device and the server would run it, and what crossed the cut.

The device runs its embedding and the blocks below the cut; the activations at the cut go up. The server runs
its blocks from a copy of them (detached: a new leaf), and sends down its output at each sequence's classified
position (the device tells it where: lengths, not labels). The device applies its head and loss and sends up
the gradient of that output; the server back-propagates it through its blocks (its adapters' gradients) to the
cut and sends the gradient there down, which the device back-propagates through its own blocks, when it trains
something below the cut. Every tensor that crosses is a real tensor of the step, so with no mechanism the
gradients, and the update, are those of the unsplit model (``tests/test_split.py``). The server's adapters of a
device are its own copy, trained with the device's steps (SplitFed's server side); the round's update holds
both halves, and the aggregator averages them as any update.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysim.models import classifier


@dataclass(frozen=True)
class Crossing:
    """Per example, what the server saw of it in one round: its own output at the classified position (sent
    down) and that output's gradient (sent up), with the example's label (the attacks' ground truth)."""

    activations: np.ndarray  # float32 (examples, d)
    gradients: np.ndarray  # float32 (examples, d)
    labels: np.ndarray  # int64 (examples,)

    @staticmethod
    def concat(parts: list[Crossing]) -> Crossing:
        return Crossing(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("activations", "gradients",
                                                                                    "labels")))


@dataclass(frozen=True)
class WireBytes:
    """Bytes one step sends each way, at the tensors' dtypes (two round trips: forward, backward)."""

    up: int
    down: int


def wire_bytes(*, cut_activation: torch.Tensor, server_output: torch.Tensor, gradient_down: bool) -> WireBytes:
    """Up: the activations at the cut and the gradient of the server's output; down: the server's output and,
    when the device trains below the cut, the gradient at the cut."""
    a = cut_activation.numel() * cut_activation.element_size()
    o = server_output.numel() * server_output.element_size()
    return WireBytes(up=a + o, down=o + (a if gradient_down else 0))


class _Cut:
    """A forward pre-hook on the server's first block: the device's activations there become a new leaf, and
    the server's part of the forward pass begins (``server``, entered on ``stack``)."""

    def __init__(self, server: Callable[[], AbstractContextManager], stack: ExitStack):
        self.device: torch.Tensor | None = None  # the device's activations (its graph ends here)
        self.server: torch.Tensor | None = None  # the server's copy (its graph starts here)
        self._enter, self._stack = server, stack

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            h, args = args[0], args[1:]
        else:
            h = kwargs.pop("hidden_states")
        self.device = h
        self.server = h.detach().requires_grad_(h.requires_grad)
        self._stack.enter_context(self._enter())
        return (self.server, *args), kwargs


def split_step(model: nn.Module, blocks: nn.ModuleList, tokens: torch.Tensor, labels: torch.Tensor, *, cut: int,
               pad_id: int, server: Callable[[], AbstractContextManager] = nullcontext,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, WireBytes]:
    """One forward and backward of a split device: gradients land in the model's parameters as unsplit training
    puts them there. Returns the loss, the server's output and its gradient (what crossed, per example) and the
    step's wire bytes. ``server()`` is entered around each part the server computes (the cost model's meters)."""
    with ExitStack() as stack:
        hook = _Cut(server, stack)
        handle = blocks[cut].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            hidden = model.base_model(input_ids=tokens).last_hidden_state  # device below the cut, server above
        finally:
            handle.remove()
        output = classifier.pooled(hidden, classifier.positions(tokens, pad_id))  # server: its output, sent down
    received = output.detach().requires_grad_(True)  # device
    loss = F.cross_entropy(getattr(model, classifier.HEAD)(received).float(), labels.to(tokens.device))
    loss.backward()  # device: the head's gradient, and the output's, sent up
    with server():
        output.backward(received.grad)  # server: its adapters' gradients, and the cut's, sent down
    below = hook.device.requires_grad
    if below:
        hook.device.backward(hook.server.grad)  # device: its blocks' gradients
    sent = wire_bytes(cut_activation=hook.server, server_output=output, gradient_down=below)
    return loss.detach(), received.detach(), received.grad.detach(), sent


def device_parameters(model: nn.Module, blocks: str, cut: int) -> list[nn.Parameter]:
    """The weights a split device holds: the body's modules before its blocks (the embeddings), the blocks
    below the cut, and the head. The server holds the rest of the body (blocks from the cut, the final norm)."""
    body, held = model.base_model, []
    block_list = model.get_submodule(blocks)
    for child in body.children():
        if child is block_list:
            break
        held += list(child.parameters())
    for block in list(block_list)[:cut]:
        held += list(block.parameters())
    return held + list(getattr(model, classifier.HEAD).parameters())
