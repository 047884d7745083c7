"""The one interface the rest of raysim reads federated data through."""

from __future__ import annotations

from typing import Protocol

import torch


class FederatedDataset(Protocol):
    """Token sequences per user; all tensors are int64 ``[n, seq_len]``.

    ``device_examples(i)`` gives the sequences of the user on device ``i``,
    ``eval_examples()`` the held-out users', ``public_examples()`` the public
    text that trains the tokenizer and the central pre-training stage.
    """

    num_users: int | None  # distinct users behind the devices (None: one per device)

    def fingerprint(self) -> str: ...

    def device_examples(self, device_id: int) -> torch.Tensor: ...

    def eval_examples(self) -> torch.Tensor: ...

    def public_examples(self) -> torch.Tensor: ...
