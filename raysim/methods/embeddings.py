"""Partial Embedding Updates (Xu et al., arXiv 2207.08988).

Which rows a device trains and sends (``methods.embedding_selection``):

- ``device_seen``: the rows of tokens it saw, sent with their int32 indices.
  The payload shrinks with the share of the vocabulary it uses, but the
  indices tell the server the user's token set. With a fixed row count the
  payload size reveals nothing more: a device that saw more tokens sends a
  random subset of them, one that saw fewer pads with rows it did not see.
- ``server_random`` / ``server_frequent``: the server picks the round's
  ``embedding_rows`` rows, keyed by (seed, round), uniformly or with
  probability proportional to public-data unigram counts (plus one); every
  device of the round trains and sends those rows, with no index, and under
  central DP only they are noised. This is the paper's setting: the payload,
  and with it the noise, shrink with m.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from raysim import rng
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import MethodsConfig

@dataclass(frozen=True)
class Selection:
    """How the embedding rows a device trains and sends are chosen (``methods.embedding_selection`` names one)."""

    server: bool  # the server picks the round's rows: the same for every device, sent with no index
    unigram: bool = False  # the server's draw weighs rows by public unigram counts
    # (count, vocab_size, unigram, generator) -> the server's sorted rows; None where each device picks its own
    draw: Callable[..., torch.Tensor] | None = None


def _uniform(*, count: int, vocab_size: int, unigram: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(vocab_size, generator=generator)[:count].sort().values


def _frequent(*, count: int, vocab_size: int, unigram: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Without replacement, with probability proportional to ``unigram + 1`` (Gumbel top-k)."""
    weights = (unigram.double() + 1.0).log()
    gumbel = -torch.log(-torch.log(torch.rand(vocab_size, generator=generator, dtype=torch.float64)))
    return (weights + gumbel).topk(count).indices.sort().values


SELECTIONS: Registry[Selection] = Registry("embedding selection")
SELECTIONS.register("device_seen")(Selection(server=False))
SELECTIONS.register("server_frequent")(Selection(server=True, unigram=True, draw=_frequent))
SELECTIONS.register("server_random")(Selection(server=True, draw=_uniform))


def server_picks(selection: str | None) -> bool:
    """Whether the server picks the round's rows (no selection: each device picks its own)."""
    return selection is not None and SELECTIONS[selection].server


def trained_rows(config: Any, methods: MethodsConfig, *, tokens: Callable[[], torch.Tensor],
                 server: Callable[[], torch.Tensor], vocab_size: int, generator: Callable[[], torch.Generator],
                 device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rows a device of ``config`` sends, and the (vocabulary, 1) 0/1 mask of the rows it may change; (None,
    None) where it trains no embedding.

    With the server's selection, the round's rows (``server()``), trained and sent with no index. Otherwise only
    the rows of ``tokens()`` (what the device trains on) may change, and those are sent, or exactly
    ``methods.embedding_rows`` of them, sampled or padded with ``generator()``.
    """
    if not config.partial_embeddings:
        return None, None
    if server_picks(methods.embedding_selection):
        rows = seen = server()
    else:
        rows = seen = seen_rows(tokens())
        if methods.embedding_rows is not None:
            rows = fixed_rows(seen, count=methods.embedding_rows, vocab_size=vocab_size, generator=generator())
    keep = torch.zeros(vocab_size, 1, device=device)
    keep[seen.to(device)] = 1.0
    return rows, keep


def most_rows(config: Any, methods: MethodsConfig, *, vocab_size: int) -> torch.Tensor | None:
    """The most rows a device of ``config`` can send (without a fixed row count, the vocabulary); None: none."""
    if not config.partial_embeddings:
        return None
    return torch.arange(min(methods.embedding_rows or vocab_size, vocab_size))


def seen_rows(tokens: torch.Tensor) -> torch.Tensor:
    """Sorted distinct token ids in ``tokens``."""
    return torch.unique(tokens.reshape(-1).cpu())


def fixed_rows(seen: torch.Tensor, *, count: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``min(count, vocab_size)`` sorted rows: a sample of ``seen``, padded with unseen rows."""
    count = min(count, vocab_size)
    if len(seen) >= count:
        return seen[torch.randperm(len(seen), generator=generator)[:count]].sort().values
    unseen = torch.ones(vocab_size, dtype=torch.bool)
    unseen[seen] = False
    others = unseen.nonzero().squeeze(1)
    pad = others[torch.randperm(len(others), generator=generator)[: count - len(seen)]]
    return torch.cat([seen, pad]).sort().values


def server_rows(selection: str, *, count: int, vocab_size: int, unigram: torch.Tensor | None, seed: int,
                round: int) -> torch.Tensor:
    """The round's ``count`` sorted rows, the same on every actor and at the aggregator, drawn as ``selection``
    says (``server_frequent``: weighted by ``unigram + 1``; ``server_random``: uniformly)."""
    generator = rng.generator(seed, "embedding-rows-server", round)
    return SELECTIONS[selection].draw(count=min(count, vocab_size), vocab_size=vocab_size, unigram=unigram,
                                      generator=generator)


def server_selection(methods: MethodsConfig, public: Callable[[], torch.Tensor], *, vocab_size: int,
                     seed: int) -> Callable[..., torch.Tensor] | None:
    """``rows(round=r)``: the server's rows of round r as every actor and the aggregator draw them; None where
    devices pick their own (``device_seen``). ``public()`` gives the public tokens ``server_frequent`` counts."""
    if not any(methods.partial_embeddings) or not server_picks(methods.embedding_selection):
        return None
    unigram = (unigram_counts(public(), vocab_size=vocab_size)
               if SELECTIONS[methods.embedding_selection].unigram else None)
    return functools.partial(server_rows, methods.embedding_selection, count=methods.embedding_rows,
                             vocab_size=vocab_size, unigram=unigram, seed=seed)


class ServerRows:
    """The server's embedding rows of each round (``methods.embedding_selection: server_*``) as an actor draws
    them, once per round; the public unigram counts ``server_frequent`` needs are taken on first use."""

    def __init__(self, methods: MethodsConfig, public: Callable[[], torch.Tensor], *, vocab_size: int, seed: int):
        self._select = functools.partial(server_selection, methods, public, vocab_size=vocab_size, seed=seed)
        self._rows_of: Callable[..., torch.Tensor] | None = None
        self._last: tuple[int, torch.Tensor] | None = None  # (round, its rows)

    def __call__(self, round: int) -> torch.Tensor:
        if self._last is None or self._last[0] != round:
            if self._rows_of is None:
                self._rows_of = self._select()
            self._last = round, self._rows_of(round=round)
        return self._last[1]


def unigram_counts(tokens: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
    """How often each token id occurs in ``tokens`` (public data)."""
    return torch.bincount(tokens.reshape(-1).long(), minlength=vocab_size)[:vocab_size]
