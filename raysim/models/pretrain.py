"""Central pre-training on public text, cached by content hash.

Today's on-device LMs start from a model pretrained on public data and are
then fine-tuned privately on devices; LoRA needs something to adapt. This
stage trains the whole base model on the dataset's public split in the
driver, before any device runs, and caches the weights under
``pretrain.cache_dir`` keyed by everything that determines them (model
config, starting weights, public tokens, steps, batch, learning rate, seed,
the recipe's version and the torch and transformers versions): the first run
pays, later runs load.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from raysim import rng
from raysim.config import PretrainConfig
from raysim.io.results import atomic_write
from raysim.models.build import BaseModel, instantiate

# Bump whenever a change to this module changes what pre-training computes (the schedule, the optimizer, how
# batches are drawn, the loss): weights cached by an older recipe are then trained anew, not reused.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Mixture:
    """Pre-training data from several sources: each batch row comes from source ``i`` with probability
    ``weights[i] / sum(weights)``, then is one of its sequences, uniformly."""

    parts: tuple[torch.Tensor, ...]  # int sequences [n_i, seq_len]
    weights: tuple[float, ...]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def draw(self, batch_size: int, g: torch.Generator) -> torch.Tensor:
        w = torch.tensor(self.weights, dtype=torch.float64)
        source = torch.multinomial(w, batch_size, replacement=True, generator=g)
        u = torch.rand(batch_size, generator=g, dtype=torch.float64)
        rows = [self.parts[s][int(x * len(self.parts[s]))] for s, x in zip(source.tolist(), u.tolist())]
        return torch.stack(rows)


def cache_key(base: BaseModel, public: torch.Tensor | Mixture, cfg: PretrainConfig, *, seed: int) -> str:
    """A hash of everything that decides the pre-trained weights: the inputs, the recipe and the libraries that
    compute it (their kernels and defaults change between versions)."""
    if isinstance(public, Mixture):
        h = hashed(base, torch.empty(0, dtype=torch.int32), recipe=RECIPE_VERSION)
        for part, weight in zip(public.parts, public.weights):
            h.update(repr(("part", tuple(part.shape), weight)).encode())
            h.update(part.numpy().tobytes())
    else:
        h = hashed(base, public, recipe=RECIPE_VERSION)
    h.update(repr((cfg.steps, cfg.batch_size, cfg.lr, seed)).encode())
    return h.hexdigest()[:16]


def hashed(base: BaseModel, public: torch.Tensor, *, recipe: int) -> hashlib._Hash:
    """A sha256 fed with what every model the server trains on public text depends on: a recipe's version, the
    libraries' versions, the model's config and weights, and the public tokens."""
    h = hashlib.sha256()
    h.update(repr((recipe, torch.__version__, transformers.__version__)).encode())
    h.update(repr(sorted(base.config.items())).encode())
    for name in sorted(base.state):
        h.update(name.encode())
        h.update(base.state[name].detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(public.numpy().tobytes())
    return h


def lr_at(step: int, *, steps: int, lr: float) -> float:
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of ``lr``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def pretrain(base: BaseModel, public: torch.Tensor | Mixture, cfg: PretrainConfig, *, seed: int, progress: bool,
             what: str = "a base model") -> BaseModel:
    """``base`` trained for ``cfg.steps`` on ``public`` sequences (or loaded from the cache)."""
    if cfg.steps == 0 or len(public) == 0:
        return base
    key = cache_key(base, public, cfg, seed=seed)
    path = Path(cfg.cache_dir).expanduser() / "pretrained" / f"{key}.pt"
    if path.is_file():
        return BaseModel(config=base.config, state=torch.load(path, weights_only=True), origin=f"pretrained {key}")
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    model = instantiate(base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    g = rng.generator(seed, "pretrain")
    # one line even with progress=false: minutes of work must not look like a hang
    print(f"raysim: pre-training {what} on {len(public):,} public sequences for {cfg.steps} steps "
          f"(cached as {path})", file=sys.stderr)
    bar = tqdm(range(cfg.steps), desc="pre-training on public text", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps=cfg.steps, lr=cfg.lr)
        x = (public.draw(cfg.batch_size, g) if isinstance(public, Mixture)
             else public[torch.randint(len(public), (cfg.batch_size,), generator=g)])
        loss = model(input_ids=x, labels=x).loss
        if not torch.isfinite(loss):
            raise ArithmeticError(f"pre-training diverged at step {step} (loss {loss.item()}); lower pretrain.lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix_str(f"loss {loss.item():.3f}", refresh=False)
    torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # runs of a study may pre-train the same model at once
    return BaseModel(config=base.config, state=state, origin=f"pretrained {key}")
