"""Partial Embedding Updates (Xu et al., arXiv 2207.08988).

A device trains and sends only the embedding rows of tokens it saw, so its
payload shrinks with the share of the vocabulary it uses. With a fixed row
count the payload size reveals nothing: a device that saw more tokens sends a
random subset of them, one that saw fewer pads with rows it did not see (their
update is zero).
"""

from __future__ import annotations

import torch


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
