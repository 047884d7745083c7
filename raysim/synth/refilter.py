"""A finished DP run's two models, for synth's re-filter: its public pre-trained model and its DP fine-tuned one.

Both are rebuilt from the run directory alone: its ``config.yaml`` (the
pre-trained model comes from pre-training's cache, or is trained again with
the same result) and its checkpoint's global state, applied to that model as
the run's held-out evaluation applies it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raysim.config import load_experiment
from raysim.data.build import build_dataset
from raysim.data.text import public_texts
from raysim.data.tokenizer import eos_id
from raysim.errors import ConfigError
from raysim.io import checkpoint as ckpt
from raysim.io.results import COMPLETE
from raysim.methods.coordinates import Space, Structure
from raysim.methods.submodel import Submodel
from raysim.models.build import BaseModel, base_seed, initial_base_model
from raysim.synth import lm


@dataclass
class RunModels:
    """What identifies a finished run (its ε, its checkpoint's hash: the re-filter's cache key) and, loaded on
    first use, its tokenizer and two models: a cached re-filter never builds them."""

    run: str
    epsilon: float | None
    fingerprint: str
    load: Callable[[], tuple]  # -> (tokenizer, public model, DP model, the run's data.seq_len)

    @functools.cached_property
    def loaded(self) -> tuple:
        return self.load()

    def log_likelihood_ratio(self, texts: list[str], *, progress: bool) -> np.ndarray:
        """Per text, mean log-likelihood per token under the DP model minus under the public model."""
        tokenizer, public, private, width = self.loaded
        ids = [e.ids for e in tokenizer.encode_batch(texts)]
        kw = {"eos": eos_id(tokenizer), "width": width, "progress": progress}
        return (lm.nll(public, ids, desc="synth re-filter: public model", **kw)
                - lm.nll(private, ids, desc="synth re-filter: DP model", **kw))


def run_models(run_dir: Path, *, field: str, pretrained_base: Callable[..., BaseModel]) -> RunModels:
    """The finished run in ``run_dir`` (its pre-training redone or loaded by ``pretrained_base``,
    :func:`raysim.synth.sources.pretrained_base`); one ConfigError naming ``field`` if it is not one."""
    summary_path, state_path = run_dir / "summary.json", run_dir / ckpt.FILE
    if not summary_path.is_file() or not state_path.is_file():
        raise ConfigError(f"{run_dir} holds no run with a checkpoint (run it first)", field=field)
    summary = json.loads(summary_path.read_text())
    if summary.get("status") not in COMPLETE:
        raise ConfigError(f"{run_dir}: the run is {summary.get('status')}, not finished", field=field)
    return RunModels(run=str(run_dir), epsilon=summary.get("epsilon"), fingerprint=_file_hash(state_path),
                     load=functools.partial(_load, run_dir, pretrained_base))


def _load(run_dir: Path, pretrained_base: Callable[..., BaseModel]) -> tuple:
    """The run's tokenizer, its pre-trained model, the same with the checkpoint's global state applied as the
    run's held-out evaluation applies it, and its sequence length."""
    cfg = load_experiment(run_dir / "config.yaml")
    state = ckpt.sub(ckpt.load(run_dir / ckpt.FILE)["aggregator"], "state").tensors
    base = pretrained_base(cfg, build_dataset(cfg), initial_base_model(cfg.model, seed=cfg.seed),
                           seed=base_seed(cfg.model, seed=cfg.seed), progress=False)
    space = Space.build(cfg, base)
    whole = Structure(rank=0, heads=space.units, mlp=space.inner, blocks=(), embeddings=False,
                      adapter=space.adapters[0])
    private = Submodel(space=space, base=base, cfg=cfg, device=torch.device("cpu"), structure=whole)
    private.load_frozen(state, None, version=object())
    private.lm.eval()
    _, tokenizer = public_texts(cfg)
    return tokenizer, lm.model_of(base), private.lm, cfg.data.seq_len


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
