"""A seeded non-IID token generator for scale runs and benchmarks.

Users are derived from the seed, never stored, so a population of 10^6
devices costs nothing until a device is sampled. Users belong to *styles*
(clusters), each style is a sparse next-token table (every token has a few
possible successors), and each user has their own preference over those
successors. A small LM can learn it, and users of different styles disagree,
as real users do.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from raysim import rng
from raysim.config import DataConfig

_EVAL_USER_OFFSET = 1 << 40  # held-out and public users live in their own id ranges
_PUBLIC_USER_OFFSET = 2 << 40


class SyntheticTokens:
    """Seeded non-IID token sequences; any number of users, made on demand."""

    successors = 4  # candidates per (style, token)
    num_users = None  # every device is its own user

    def __init__(self, cfg: DataConfig, *, vocab_size: int, seed: int):
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seed = seed
        g = rng.generator(seed, "data", "tables")
        self.tables = torch.randint(0, vocab_size, (cfg.num_styles, vocab_size, self.successors), generator=g)
        self._flat = self.tables.numpy().reshape(-1)

    def device_examples(self, device_id: int) -> torch.Tensor:
        return self._generate(device_id, self.cfg.examples_per_user)

    def fingerprint(self) -> str:
        key = repr((self.seed, self.vocab_size, self.cfg.seq_len, self.cfg.examples_per_user, self.cfg.num_styles))
        return hashlib.sha256(key.encode() + self.tables.numpy().tobytes()).hexdigest()[:16]

    def eval_examples(self) -> torch.Tensor:
        return self._users(_EVAL_USER_OFFSET)

    def public_examples(self) -> torch.Tensor:
        return self._users(_PUBLIC_USER_OFFSET)

    def _users(self, offset: int) -> torch.Tensor:
        return torch.cat([self._generate(offset + u, self.cfg.examples_per_user) for u in range(self.cfg.eval_users)])

    def _generate(self, user_id: int, n: int) -> torch.Tensor:
        g = rng.generator(self.seed, "data", "user", user_id)
        styles = self.cfg.num_styles
        # Mostly the user's own style, sometimes another one: non-IID but overlapping.
        own = int(torch.randint(0, styles, (1,), generator=g))
        seq_style = torch.where(torch.rand(n, generator=g) < 0.8, own, torch.randint(0, styles, (n,), generator=g))
        # The user's own preference over successors: a peaked softmax of Gaussians.
        prefs = torch.softmax(2.0 * torch.randn(self.successors, generator=g), dim=0)
        length = self.cfg.seq_len
        choice = torch.multinomial(prefs, n * (length - 1), replacement=True, generator=g).view(n, length - 1)
        first = torch.randint(0, self.vocab_size, (n,), generator=g)
        # The walk, as flat indices into the tables: (style, previous token, choice) -> next token. In numpy:
        # 31 steps on a few rows each cost less there than one torch indexing op does.
        offsets = seq_style.numpy()[:, None] * (self.vocab_size * self.successors) + choice.numpy()
        tokens = np.empty((n, length), dtype=np.int64)
        tokens[:, 0] = token = first.numpy()
        for t in range(1, length):
            tokens[:, t] = token = self._flat[offsets[:, t - 1] + token * self.successors]
        return torch.from_numpy(tokens)

