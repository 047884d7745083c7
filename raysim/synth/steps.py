"""``raysim synth``'s steps, server side only: generate, filter, transform and re-filter public text.

After Wu et al. (2024), with raysim's own small models where they prompt a
public LLM:

- the *generator* is a GPT-2 trained by raysim on the broad public pool
  (:mod:`raysim.synth.pool`) with its own BPE tokenizer; *generated* texts are
  its continuations of the domain prompts (``synth.prompts``, written without
  looking at a user's text), each prompt in turn;
- the *domain scorer* is the generator fine-tuned on the generated texts and
  the prompts; *filtered* keeps the pool chunks whose cross-entropy difference
  (generator minus domain scorer: Moore & Lewis 2010) ranks in the top
  ``synth.filter_fraction``;
- *transformed* texts are pool chunks rewritten toward the domain: each
  chunk's first ``synth.prefix_tokens`` tokens continued by the domain scorer;
- *refiltered* keeps the top ``synth.refilter_fraction`` of the candidates
  (pool chunks, generated and transformed texts) by a finished DP run's
  model's log-likelihood minus its public pre-trained model's (Wu et al.'s
  second step). A DP model's output is post-processing: this spends no ε.

Every text a step reads is recorded (:attr:`Synth.read`, hashes); none is a
user's (``tests/test_synth.py``). Each step's texts are cached under
``pretrain.cache_dir/synth`` by a hash of everything that decides them; the
models are cached as pre-training is.
"""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from tqdm.auto import tqdm

from raysim import rng
from raysim.config import ExperimentConfig, ModelConfig, PretrainConfig
from raysim.data.corpus import PUBLIC_USER
from raysim.data.text import load_user_texts, pack_texts
from raysim.data.tokenizer import content_hash, eos_id, train_tokenizer
from raysim.errors import ConfigError
from raysim.io.results import atomic_write
from raysim.models.build import BaseModel, initial_base_model
from raysim.models.pretrain import pretrain
from raysim.synth import lm
from raysim.synth.pool import POOL, chunks, digest

PROMPTS = Path(__file__).resolve().parent / "prompts.txt"
STEPS = ("generated", "filtered", "transformed", "refiltered")
BATCH = 64  # sequences sampled or scored at once


@dataclass(frozen=True)
class Made:
    """A step's texts and how they were made (``summary.json`` ``synth``, ``raysim synth``)."""

    texts: list[str]
    about: dict


def describe(texts: list[str], **how) -> dict:
    return {"texts": len(texts), "chars": sum(map(len, texts)), "sha256": content_hash(texts), **how}


class Synth:
    """The synth steps of one experiment; each runs at most once per object (and once per cache)."""

    def __init__(self, cfg: ExperimentConfig, *, progress: bool = False):
        self.cfg, self.s, self.progress = cfg, cfg.synth, progress
        self.cache = Path(cfg.pretrain.cache_dir).expanduser() / "synth"
        self.read: set[str] = set()  # sha256 of every text a step read: public text only

    def _read(self, texts: list[str]) -> list[str]:
        self.read.update(digest(t) for t in texts)
        return texts

    @functools.cached_property
    def pool(self) -> list[str]:
        """The broad public pool: the corpus' public split in chunks, then the shipped pool, each text once."""
        public = load_user_texts(self.cfg).texts.get(PUBLIC_USER, [])
        shipped = pq.read_table(POOL, columns=["text"]).column("text").to_pylist()
        pool = list(dict.fromkeys([c for t in public for c in chunks(t)] + shipped))
        if self.s.max_pool is not None:
            kept = set(sorted(pool, key=digest)[:self.s.max_pool])
            pool = [t for t in pool if t in kept]
        return pool

    @functools.cached_property
    def prompts(self) -> list[str]:
        path = Path(self.s.prompts).expanduser() if self.s.prompts else PROMPTS
        if not path.is_file():
            raise ConfigError("no such file", file=str(path), field="synth.prompts")
        lines = [line.strip() for line in path.read_text().splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        if not prompts:
            raise ConfigError("holds no prompt (one per line; # starts a comment)", file=str(path),
                              field="synth.prompts")
        return prompts

    @functools.cached_property
    def tokenizer(self):
        return train_tokenizer(self._read(self.pool), vocab_size=self.s.generator.vocab_size,
                               cache_dir=Path(self.cfg.pretrain.cache_dir))

    @functools.cached_property
    def pool_ids(self) -> list[list[int]]:
        """The pool's texts tokenized (what the filter scores and the transform starts from)."""
        return self.encode(self._read(self.pool))

    @property
    def eos(self) -> int:
        return eos_id(self.tokenizer)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def _train(self, base: BaseModel, texts: list[str], *, steps: int, what: str) -> BaseModel:
        g = self.s.generator
        blocks = torch.from_numpy(pack_texts(self.tokenizer, self._read(texts), seq_len=g.seq_len)).long()
        cfg = PretrainConfig(steps=steps, batch_size=g.batch_size, lr=g.lr, cache_dir=self.cfg.pretrain.cache_dir)
        return pretrain(base, blocks, cfg, seed=self.s.seed, progress=self.progress, what=what)

    @functools.cached_property
    def generator(self) -> torch.nn.Module:
        g = self.s.generator
        arch = ModelConfig(n_layer=g.n_layer, n_embd=g.n_embd, n_head=g.n_head, n_positions=g.seq_len,
                           vocab_size=self.tokenizer.get_vocab_size())
        self.generator_base = self._train(initial_base_model(arch, seed=self.s.seed), self.pool, steps=g.steps,
                                          what="the synth generator")
        return lm.model_of(self.generator_base)

    @functools.cached_property
    def domain(self) -> torch.nn.Module:
        self.generator  # noqa: B018 (trains or loads generator_base)
        self.domain_base = self._train(self.generator_base, self.generated().texts + self.prompts,
                                       steps=self.s.domain_steps, what="the synth domain scorer")
        return lm.model_of(self.domain_base)

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, disable=not self.progress, file=sys.stderr, dynamic_ncols=True)

    def _cached(self, step: str, make, *key: object) -> Made:
        """A step's texts from the cache, or made and cached; ``key``: what decides them but the libraries (the
        models by their content-hashed origin, the texts by hash, the step's settings)."""
        path = self.cache / f"{step}-{content_hash([], *key, torch.__version__, transformers.__version__)}.parquet"
        if path.is_file():
            table = pq.read_table(path)
            return Made(table.column("text").to_pylist(), json.loads(table.schema.metadata[b"raysim"]))
        made = make()
        table = pa.table({"text": made.texts}).replace_schema_metadata({"raysim": json.dumps(made.about)})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return made

    def _sampling(self) -> tuple:
        s = self.s
        return s.seed, s.max_new_tokens, s.temperature, s.top_p

    def generated(self) -> Made:
        self.generator  # noqa: B018 (trains or loads generator_base, whose origin is part of the key)
        return self._cached("generated", self._generate, self.generator_base.origin, content_hash(self.prompts),
                            self.s.generated, *self._sampling())

    def _generate(self) -> Made:
        s, prompts = self.s, self.prompts
        texts = []
        for j, ids in enumerate(self._bar(self.encode(prompts), "synth: generating, by prompt")):
            n = len(range(j, s.generated, len(prompts)))
            for b, start in enumerate(range(0, n, BATCH)):
                rows = torch.tensor([ids] * min(BATCH, n - start))
                new = lm.sample(self.generator, rows, eos=self.eos, max_new_tokens=s.max_new_tokens,
                                temperature=s.temperature, top_p=s.top_p, seed=s.seed, purpose=f"generated-{j}",
                                batch=b)
                texts += [self.tokenizer.decode(ids + row) for row in new]
        return Made(texts, describe(texts, how="the generator's continuations of the domain prompts",
                                    prompts=len(prompts), generator=_generator_about(self)))

    def filtered(self) -> Made:
        self.domain  # noqa: B018
        return self._cached("filtered", self._filter, content_hash(self.pool), self.generator_base.origin,
                            self.domain_base.origin, self.s.filter_fraction)

    def _filter(self) -> Made:
        ids = self.pool_ids
        width = self.s.generator.seq_len
        score = (lm.nll(self.generator, ids, eos=self.eos, width=width, progress=self.progress,
                        desc="synth filter: generator") -
                 lm.nll(self.domain, ids, eos=self.eos, width=width, progress=self.progress,
                        desc="synth filter: domain scorer"))
        keep = _top(score, self.s.filter_fraction)
        texts = [self.pool[i] for i in keep]
        return Made(texts, describe(texts, how="pool chunks by cross-entropy difference, generator minus "
                                    "domain scorer (Moore-Lewis)", pool=len(self.pool),
                                    fraction=self.s.filter_fraction, threshold=float(score[keep[-1]])))

    def transformed(self) -> Made:
        self.domain  # noqa: B018
        return self._cached("transformed", self._transform, content_hash(self.pool), self.domain_base.origin,
                            self.s.transformed, self.s.prefix_tokens, *self._sampling())

    def _transform(self) -> Made:
        s, k = self.s, self.s.prefix_tokens
        ids = self.pool_ids
        long_enough = np.flatnonzero([len(t) > k for t in ids])
        order = np.argsort(rng.uniform(s.seed, "synth-transform", ids=long_enough), kind="stable")
        chosen = long_enough[order[:s.transformed]]
        texts = []
        for b, start in enumerate(self._bar(range(0, len(chosen), BATCH), "synth: transforming, by batch")):
            rows = torch.tensor([ids[i][:k] for i in chosen[start:start + BATCH]])
            new = lm.sample(self.domain, rows, eos=self.eos, max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature, top_p=s.top_p, seed=s.seed, purpose="transformed", batch=b)
            texts += [self.tokenizer.decode(p + n) for p, n in zip(rows.tolist(), new)]
        return Made(texts, describe(texts, how="pool chunks' first tokens continued by the domain scorer",
                                    prefix_tokens=k, generator=_generator_about(self)))

    def candidates(self) -> list[str]:
        """What the re-filter ranks: the pool's chunks, the generated and the transformed texts, each once."""
        return list(dict.fromkeys(self.pool + self.generated().texts + self.transformed().texts))

    def refiltered(self, models) -> Made:
        """The candidates re-ranked by a finished run's models (:func:`raysim.synth.sources.run_models`)."""
        return self._cached("refiltered", lambda: self._refilter(models), content_hash(self.candidates()),
                            models.fingerprint, self.s.refilter_fraction)

    def _refilter(self, models) -> Made:
        texts = self.candidates()
        score = models.log_likelihood_ratio(texts, progress=self.progress)
        keep = _top(score, self.s.refilter_fraction)
        kept = [texts[i] for i in keep]
        return Made(kept, describe(kept, how="candidates by the DP model's log-likelihood minus the public "
                                   "model's (post-processing of a DP release: no further epsilon)",
                                   candidates=len(texts), fraction=self.s.refilter_fraction, run=models.run,
                                   run_epsilon=models.epsilon, threshold=float(score[keep[-1]])))


def _top(score: np.ndarray, fraction: float) -> np.ndarray:
    """The indices of the top ``fraction`` of ``score`` (at least one), best first; ties by index."""
    n = max(1, int(round(fraction * len(score))))
    return np.argsort(-score, kind="stable")[:n]


def _generator_about(synth: Synth) -> dict:
    g = synth.s.generator
    return {"n_layer": g.n_layer, "n_embd": g.n_embd, "steps": g.steps, "pool_texts": len(synth.pool),
            "origin": synth.generator_base.origin}
