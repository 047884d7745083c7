"""A finished DP run's two models, for synth's re-filter: its public pre-trained model and its DP fine-tuned one.

Both are rebuilt from the run directory alone: its ``config.yaml`` (the
pre-trained model comes from pre-training's cache, or is trained again with
the same result) and its checkpoint's global state, applied to that model as
the run's held-out evaluation applies it.
"""

from __future__ import annotations

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
    run: str
    epsilon: float | None
    fingerprint: str  # the run's state and config: the re-filter's cache key
    tokenizer: object
    public: torch.nn.Module
    private: torch.nn.Module
    width: int  # the run's data.seq_len

    def log_likelihood_ratio(self, texts: list[str], *, progress: bool) -> np.ndarray:
        """Per text, mean log-likelihood per token under the DP model minus under the public model."""
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        eos = eos_id(self.tokenizer)
        kw = {"eos": eos, "width": self.width, "progress": progress}
        return (lm.nll(self.public, ids, desc="synth re-filter: public model", **kw)
                - lm.nll(self.private, ids, desc="synth re-filter: DP model", **kw))


def run_models(run_dir: Path, *, field: str, pretrained_base: Callable[..., BaseModel]) -> RunModels:
    """The models of the finished run in ``run_dir`` (its pre-training redone or loaded by ``pretrained_base``,
    :func:`raysim.synth.sources.pretrained_base`); one ConfigError naming ``field`` if it is not one."""
    summary_path, state_path = run_dir / "summary.json", run_dir / ckpt.FILE
    if not summary_path.is_file() or not state_path.is_file():
        raise ConfigError(f"{run_dir} holds no run with a checkpoint (run it first)", field=field)
    summary = json.loads(summary_path.read_text())
    if summary.get("status") not in COMPLETE:
        raise ConfigError(f"{run_dir}: the run is {summary.get('status')}, not finished", field=field)
    cfg = load_experiment(run_dir / "config.yaml")
    parts = ckpt.load(state_path)
    state = ckpt.sub(parts["aggregator"], "state").tensors
    dataset = build_dataset(cfg)
    base = pretrained_base(cfg, dataset, initial_base_model(cfg.model, seed=cfg.seed),
                           seed=base_seed(cfg.model, seed=cfg.seed), progress=False)
    space = Space.build(cfg, base)
    whole = Structure(rank=0, heads=space.units, mlp=space.inner, blocks=(), embeddings=False,
                      adapter=space.adapters[0])
    private = Submodel(space=space, base=base, cfg=cfg, device=torch.device("cpu"), structure=whole)
    private.load_frozen(state, None, version=object())
    private.lm.eval()
    _, tok = public_texts(cfg)
    return RunModels(run=str(run_dir), epsilon=summary.get("epsilon"), fingerprint=_file_hash(state_path),
                     tokenizer=tok, public=lm.model_of(base), private=private.lm, width=cfg.data.seq_len)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
