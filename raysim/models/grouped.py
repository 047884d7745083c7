"""Several devices' local steps in one forward and backward pass.

Devices that train the same parameters differ only in those parameters'
values and in their data. Give each trainable ``nn.Linear`` weight a leading
device dimension, feed the devices' batches through the shared frozen model
together, and let every device's rows meet only its own weights (a batched
matmul): each device gets exactly the gradient it would get alone, because
the frozen layers treat samples independently and the summed per-device
losses separate. Adam is elementwise, so one optimizer over the stacked
tensors steps every device as its own optimizer would. Per-op overhead is paid
once per group instead of once per device, which is most of the cost of a
small model's step.

Randomness stays per device. Model dropout (attention dropout included) draws
each device's mask from that device's own generator, so a device's update does
not depend on which devices it was grouped with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

KEYED_ATTENTION = "raysim_keyed"


class DropoutKeys:
    """The generators of the devices in the current pass, one per device, in row order: one per model
    (:func:`install_keyed_dropout`), set for a pass by :func:`keyed`."""

    def __init__(self) -> None:
        self.generators: list[torch.Generator] | None = None

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        if not training or p == 0.0 or self.generators is None:
            return F.dropout(x, p, training)
        keep = torch.empty_like(x)
        for rows, g in zip(keep.chunk(len(self.generators)), self.generators):
            rows.uniform_(generator=g)  # in place, row block by row block: no per-device tensors to join
        q = 1.0 - p
        return x * keep.lt_(q).div_(q)  # keep with probability q, scaled by 1/q (as F.dropout)


class KeyedDropout(nn.Dropout):
    """``nn.Dropout`` whose masks come from the current devices' generators (``keys``)."""

    def __init__(self, p: float, keys: DropoutKeys):
        super().__init__(p)
        self.keys = keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.keys.dropout(x, self.p, self.training)


def _keyed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention with keyed dropout on the attention weights (transformers' interface)."""
    scaling = query.size(-1) ** -0.5 if scaling is None else scaling
    repeat = query.shape[1] // key.shape[1]  # grouped-query attention shares key/value heads
    if repeat > 1:
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[..., : key.shape[-2]]
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = module.dropout_keys.dropout(weights, dropout, module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(KEYED_ATTENTION, _keyed_attention)
AttentionMaskInterface.register(KEYED_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def install_keyed_dropout(model: nn.Module) -> DropoutKeys:
    """Swap every ``nn.Dropout`` for a keyed one and route attention through keyed dropout; the model's keys,
    which every module holds as ``dropout_keys`` (the attention function is given its module only)."""
    keys = DropoutKeys()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Dropout:
                setattr(module, name, KeyedDropout(child.p, keys))
    for module in model.modules():
        module.dropout_keys = keys
    config = getattr(model, "config", None)
    if config is not None and any(getattr(config, k, 0.0) for k in ("attn_pdrop", "attention_dropout")):
        config._attn_implementation = KEYED_ATTENTION
    return keys


@contextmanager
def keyed(keys: DropoutKeys, generators: list[torch.Generator]) -> Iterator[None]:
    """Draw ``keys``' dropout masks from ``generators`` (one per device, in row order) for the block."""
    keys.generators = generators
    try:
        yield
    finally:
        keys.generators = None


def stackable(model: nn.Module, names: list[str]) -> bool:
    """Whether every trainable tensor is the weight of a bias-free (or frozen-bias) ``nn.Linear``."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr != "weight" or not isinstance(module, nn.Linear):
            return False
        if module.bias is not None and module.bias.requires_grad:
            return False
    return True


def _stacked_linear(x: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    k = weight.shape[0]
    y = torch.bmm(x.reshape(k, -1, x.shape[-1]), weight.transpose(1, 2)).reshape(*x.shape[:-1], weight.shape[1])
    return y if bias is None else y + bias


@contextmanager
def stacked(model: nn.Module, names: list[str], stacks: list[torch.Tensor]) -> Iterator[None]:
    """Run ``model`` with each named Linear weight replaced by its (devices, out, in) stack.

    Rows of the input belong to devices in order, ``rows / devices`` each.
    """
    modules = [model.get_submodule(name.rpartition(".")[0]) for name in names]
    for module, stack in zip(modules, stacks):
        module.forward = partial(_stacked_linear, weight=stack, bias=module.bias)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def per_device_loss(logits: torch.Tensor, tokens: torch.Tensor, *, devices: int) -> torch.Tensor:
    """Each device's mean next-token loss over its rows (as transformers' causal-LM loss)."""
    labels = F.pad(tokens[:, 1:], (0, 1), value=-100)  # the last position predicts nothing
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    rows, length = tokens.shape
    return loss.view(devices, -1).sum(1) / (rows // devices * (length - 1))
