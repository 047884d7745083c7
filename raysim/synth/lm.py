"""The server's small causal LMs: sampled and scored, text by text.

Training is pre-training's (:func:`raysim.models.pretrain.pretrain`, cached
by content hash); these are the two other things ``raysim synth`` asks of a
model. Every draw is keyed by (seed, purpose, batch), so a step gives the same
texts whatever else ran before it.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from raysim import rng
from raysim.models.build import BaseModel, instantiate


def model_of(base: BaseModel) -> torch.nn.Module:
    """The Hugging Face model ``base`` describes, in eval mode."""
    model = instantiate(base)
    model.eval()
    return model


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, *, eos: int, max_new_tokens: int, temperature: float,
           top_p: float, seed: int, purpose: str, batch: int) -> list[list[int]]:
    """Continue each row of ``prompts`` (token ids ``[n, length]``, all one length) until EOS or
    ``max_new_tokens``, by nucleus sampling; the new tokens of each row (EOS not included)."""
    room = int(model.config.n_positions) - prompts.shape[1]
    steps = min(max_new_tokens, room)
    g = rng.generator(seed, "synth-sample", purpose, batch)
    out = torch.empty((len(prompts), 0), dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    past, x = None, prompts
    for _ in range(steps):
        res = model(input_ids=x, cache=past, use_cache=True)
        past = res.cache
        probs = torch.softmax(res.logits[:, -1].double() / temperature, dim=-1)
        ranked, order = probs.sort(dim=-1, descending=True)
        outside = ranked.cumsum(-1) - ranked > top_p  # tokens after the nucleus (the first one always stays)
        ranked[outside] = 0.0
        picked = order.gather(-1, torch.multinomial(ranked, 1, generator=g))
        picked[done] = eos
        out = torch.cat([out, picked], dim=1)
        done |= picked[:, 0] == eos
        if bool(done.all()):
            break
        x = picked
    rows = out.tolist()
    return [row[:row.index(eos)] if eos in row else row for row in rows]


@torch.no_grad()
def nll(model: torch.nn.Module, texts: list[list[int]], *, eos: int, width: int, batch_size: int = 64,
        progress: bool = False, desc: str = "scoring") -> np.ndarray:
    """Each text's mean next-token loss (nats per token) under ``model``: its tokens and a closing EOS, in
    windows of ``width`` tokens; a text of one token scores its EOS."""
    windows: list[tuple[int, list[int]]] = []
    for i, ids in enumerate(texts):
        ids = [*ids, eos]
        windows += [(i, ids[s:s + width]) for s in range(0, max(1, len(ids) - 1), width - 1)]
    total = np.zeros(len(texts))
    count = np.zeros(len(texts))
    starts = range(0, len(windows), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True):
        chunk = windows[s:s + batch_size]
        length = max(len(w) for _, w in chunk)
        x = torch.full((len(chunk), length), eos, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.bool)
        for r, (_, w) in enumerate(chunk):
            x[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = True
        logits = model(input_ids=x).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        loss = (loss * mask[:, 1:]).double().sum(1)
        for r, (i, w) in enumerate(chunk):
            total[i] += float(loss[r])
            count[i] += len(w) - 1
    return total / np.maximum(count, 1)
