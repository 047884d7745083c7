"""Sequence classification on a causal LM: a linear head on the last hidden state at each sequence's first EOS.

Each sequence of a classification dataset is one text, then EOS padding (:func:`raysim.data.text.build_text_dataset`),
so its first EOS is the one position that has attended to the whole text: the position GPT-2's and Llama's
sequence-classification models read (their last non-padding token). The head, ``classifier.weight``, is a
bias-free ``(labels, d)`` matrix: a state entry every device trains, and the one part of the model a split
device (:mod:`raysim.split`) keeps for itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raysim import rng

HEAD = "classifier"  # the head's module; its weight is the state entry ``classifier.weight``
HEAD_WEIGHT = f"{HEAD}.weight"
INIT_STD = 0.02  # transformers' initializer_range for GPT-2 and Llama


def attach(model: nn.Module, classes: int) -> None:
    """Give ``model`` a trainable bias-free head from its hidden size to ``classes`` logits."""
    setattr(model, HEAD, nn.Linear(model.config.hidden_size, classes, bias=False))


def initial_head(*, classes: int, width: int, seed: int) -> torch.Tensor:
    """The head before round 1: N(0, 0.02²) entries keyed by (seed, "classifier")."""
    g = rng.generator(seed, "classifier")
    return torch.randn(classes, width, generator=g) * INIT_STD


def positions(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Each sequence's first EOS (every classification sequence has one)."""
    return (tokens == pad_id).int().argmax(dim=1)


def pooled(hidden: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``hidden[i, where[i]]`` for every row i: (rows, d)."""
    return hidden[torch.arange(len(where), device=hidden.device), where.to(hidden.device)]


def features(model: nn.Module, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The last hidden state at each sequence's first EOS: what the head reads."""
    return pooled(model.base_model(input_ids=tokens).last_hidden_state, positions(tokens, pad_id))


def logits(model: nn.Module, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    return getattr(model, HEAD)(features(model, tokens, pad_id)).float()


def device_losses(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, pad_id: int,
                  devices: int) -> torch.Tensor:
    """Each device's mean cross-entropy over its rows (``devices`` equal row blocks)."""
    loss = F.cross_entropy(logits(model, tokens, pad_id), labels.to(tokens.device), reduction="none")
    return loss.view(devices, -1).mean(1)
