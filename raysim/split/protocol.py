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

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from raysim.models import classifier

if TYPE_CHECKING:
    from raysim.split.mechanisms import Mechanism


@dataclass(frozen=True)
class Crossing:
    """Per example, what the server saw of it in one round: per adapter set, its own output at the classified
    position (sent down) and that output's gradient (sent up), with the example's label (the attacks' ground
    truth)."""

    activations: np.ndarray  # float32 (sets, examples, d)
    gradients: np.ndarray  # float32 (sets, examples, d)
    labels: np.ndarray  # int64 (examples,)

    @staticmethod
    def concat(parts: list[Crossing]) -> Crossing:
        return Crossing(np.concatenate([p.activations for p in parts], axis=1),
                        np.concatenate([p.gradients for p in parts], axis=1),
                        np.concatenate([p.labels for p in parts]))


@dataclass(frozen=True)
class WireBytes:
    """Bytes one step sends each way, at the tensors' dtypes (two round trips: forward, backward)."""

    up: int
    down: int


@dataclass(frozen=True)
class Step:
    """A split step: its task loss (the mechanism's regulariser aside), and per adapter set what crossed
    (sets, batch, d), and its bytes each way.

    Up: the activations at the cut (once; every set runs on them) and each set's output gradient; down: each
    set's output and, when the device trains below the cut, the gradient at the cut (the sets' summed)."""

    loss: torch.Tensor
    activations: torch.Tensor
    gradients: torch.Tensor
    wire: WireBytes


class _Cut:
    """A forward pre-hook on the server's first block: the device's activations there become a new leaf (the
    first pass), which every adapter set's pass then starts from; the server's part of the first pass begins
    here (``server``, entered on the pass's ``stack``)."""

    def __init__(self, server: Callable[[], AbstractContextManager]):
        self.device: torch.Tensor | None = None  # the device's activations (its graph ends here)
        self.server: torch.Tensor | None = None  # the server's copy (its graph starts here)
        self.stack: ExitStack | None = None
        self._enter = server

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            h, args = args[0], args[1:]
        else:
            h = kwargs.pop("hidden_states")
        if self.server is None:  # the first pass: the device's blocks end here, the server's begin
            self.device = h
            self.server = h.detach().requires_grad_(h.requires_grad)
            self.stack.enter_context(self._enter())
        return (self.server, *args), kwargs


@contextmanager
def _server_pass(model: nn.Module, blocks: str, cut: int, params: dict[str, nn.Parameter] | None) -> Iterator[None]:
    """An adapter set's pass: its parameters in place of the model's, and only the server's blocks in the block
    list (the device's blocks ran once, in the first pass)."""
    if params is None:
        yield
        return
    owner_name, _, attr = blocks.rpartition(".")
    owner, full = model.get_submodule(owner_name), model.get_submodule(blocks)
    saved = {}
    for name, p in params.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        saved[name] = (module, leaf, module._parameters[leaf])
        module._parameters[leaf] = p
    setattr(owner, attr, nn.ModuleList(list(full)[cut:]))
    try:
        yield
    finally:
        setattr(owner, attr, full)
        for module, leaf, p in saved.values():
            module._parameters[leaf] = p


def split_step(model: nn.Module, blocks: str, tokens: torch.Tensor, labels: torch.Tensor, *, cut: int, pad_id: int,
               mechanism: Mechanism, sets: list[dict[str, nn.Parameter]] = (),
               server: Callable[[], AbstractContextManager] = nullcontext) -> Step:
    """One forward and backward of a split device: gradients land in the parameters as unsplit training puts them
    there (one set, no mechanism). ``sets``: the server's further adapter sets (P³EFT), each its parameters by
    name. ``server()`` is entered around each part the server computes (the cost model's meters)."""
    hook = _Cut(server)
    where = classifier.positions(tokens, pad_id)  # the device tells the server where each sequence ends
    outputs = []
    handle = model.get_submodule(blocks)[cut].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for params in [None, *sets]:  # set 0: the model's own adapters
            # a further set's pass is the server's from its start (its discarded embedding is the emulator's)
            with ExitStack() as hook.stack, (nullcontext() if params is None else server()), \
                    _server_pass(model, blocks, cut, params):
                hidden = model.base_model(input_ids=tokens).last_hidden_state  # device below the cut, server above
                outputs.append(classifier.pooled(hidden, where))  # server: its output, sent down
    finally:
        handle.remove()
    received = [out.detach().requires_grad_(True) for out in outputs]  # device
    labels = labels.to(tokens.device)
    loss = mechanism.loss(getattr(model, classifier.HEAD), received, labels)
    extra = mechanism.regulariser(received, labels)
    (loss if extra is None else loss + extra).backward()  # device: the head's gradient, and each output's, sent up
    with server():
        torch.autograd.backward(outputs, [r.grad for r in received])  # server: its adapters', and the cut's, sent down
    below = hook.device.requires_grad
    if below:
        hook.device.backward(hook.server.grad)  # device: its blocks' gradients
    a, o = (t.numel() * t.element_size() for t in (hook.server, outputs[0]))
    return Step(loss=loss.detach(), activations=torch.stack([r.detach() for r in received]),
                gradients=torch.stack([r.grad for r in received]),
                wire=WireBytes(up=a + len(outputs) * o, down=len(outputs) * o + (a if below else 0)))


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
