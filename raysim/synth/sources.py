"""``pretrain.sources``: what central pre-training trains on, source by source.

A source is a registered function from (its config, a :class:`Context`) to
texts and a description; every source's texts are tokenized with the run's
tokenizer (trained on the public split whatever pre-trains: ``data.tokenizer``)
and packed into ``data.seq_len`` sequences. With every ``weight`` null the
sequences are pooled; otherwise each batch row comes from a source in
proportion to its weight (:class:`~raysim.models.pretrain.Mixture`). The
pre-trained weights are cached by the sequences, weights and recipe, as
pre-training on the public split always was; ``pretrain.sources: null`` is that
pre-training, unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from raysim.config import ExperimentConfig, SourceConfig
from raysim.config.synth import SOURCE_NAMES
from raysim.data.base import FederatedDataset
from raysim.data.sources import read_table, text_column
from raysim.data.text import pack_texts, public_texts
from raysim.data.tokenizer import content_hash
from raysim.errors import ConfigError
from raysim.models.build import BaseModel
from raysim.models.pretrain import Mixture, pretrain
from raysim.registry import Registry
from raysim.synth import refilter
from raysim.synth.steps import STEPS, Synth


@dataclasses.dataclass
class Context:
    cfg: ExperimentConfig
    public: dict[str, list[str]]  # the public split's parts: public, oracle
    progress: bool
    synth: Synth | None = None

    def synthesized(self) -> Synth:
        if self.synth is None:
            self.synth = Synth(self.cfg, progress=self.progress)
        return self.synth


Source = Callable[[SourceConfig, Context, str], tuple[list[str], dict]]
SOURCES: Registry[Source] = Registry("pre-training source")


@SOURCES.register("public")
def public(src: SourceConfig, ctx: Context, key: str) -> tuple[list[str], dict]:
    return ctx.public["public"], {"how": "the corpus' own public split"}


@SOURCES.register("oracle")
def oracle(src: SourceConfig, ctx: Context, key: str) -> tuple[list[str], dict]:
    return ctx.public["oracle"], {"how": "the users data.public_fraction sets aside (real users' text)"}


@SOURCES.register("file")
def from_file(src: SourceConfig, ctx: Context, key: str) -> tuple[list[str], dict]:
    path = str(Path(src.path).expanduser())
    return text_column(read_table(path), ctx.cfg.data, source=path), {"how": "a file", "path": path}


def _step(name: str) -> Source:
    def source(src: SourceConfig, ctx: Context, key: str) -> tuple[list[str], dict]:
        synth = ctx.synthesized()
        made = (synth.refiltered(run_models(src.run, field=f"{key}.run")) if name == "refiltered"
                else getattr(synth, name)())
        return made.texts, made.about

    source.__doc__ = f"raysim synth's {name} texts (raysim/synth/steps.py)."
    return source


for _name in STEPS:
    SOURCES.register(_name)(_step(_name))
assert tuple(SOURCES) == SOURCE_NAMES, "raysim/config/synth.py's SOURCE_NAMES lists the sources registered here"


def pretraining_data(cfg: ExperimentConfig, dataset: FederatedDataset, *,
                     progress: bool) -> tuple[torch.Tensor | Mixture, dict | None]:
    """What pre-training trains on, and what each source gave (None: ``pretrain.sources`` is null)."""
    if cfg.pretrain.sources is None:
        return dataset.public_examples(), None
    parts_text, tok = public_texts(cfg)
    ctx = Context(cfg=cfg, public=parts_text, progress=progress)
    parts, about = [], []
    for i, src in enumerate(cfg.pretrain.sources):
        key = f"pretrain.sources[{i}]"
        texts, how = SOURCES[src.name](src, ctx, key)
        blocks = torch.from_numpy(pack_texts(tok, texts, seq_len=cfg.data.seq_len)).long()
        if len(blocks) == 0:
            raise ConfigError(f"{src.name} gives no sequence of data.seq_len={cfg.data.seq_len} tokens "
                              f"({len(texts)} texts)", field=key)
        parts.append(blocks)
        about.append({"name": src.name, "weight": src.weight, "sequences": len(blocks), "texts": len(texts),
                      "sha256": content_hash(texts), **how})
    weights = [src.weight for src in cfg.pretrain.sources]
    data = torch.cat(parts) if all(w is None for w in weights) else Mixture(tuple(parts), tuple(weights))
    return data, {"sources": about}


def pretrained_base(cfg: ExperimentConfig, dataset: FederatedDataset, base: BaseModel, *, seed: int,
                    progress: bool) -> BaseModel:
    """``base`` pre-trained on ``pretrain.sources`` (cached), carrying what each source gave."""
    if cfg.pretrain.steps == 0:
        return base
    data, about = pretraining_data(cfg, dataset, progress=progress)
    base = pretrain(base, data, cfg.pretrain, seed=seed, progress=progress)
    return base if about is None else dataclasses.replace(base, pretrained_on=about)


def run_models(run_dir: str, *, field: str) -> refilter.RunModels:
    """A finished DP run's public and DP models, for the re-filter (its pre-training redone or loaded here)."""
    return refilter.run_models(Path(run_dir).expanduser(), field=field, pretrained_base=pretrained_base)
