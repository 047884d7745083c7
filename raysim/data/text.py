"""Real text as a federated dataset: users' texts tokenized and packed into sequences.

Built once, in the driver (:func:`build_text_dataset`), and shipped to the
actors through the object store: one int32 tensor of packed sequences with
per-user offsets, so an actor holds every user's tokens compactly and a
device's data is a slice. Device ``i`` is user ``i mod num_users`` of the
training users; held-out users are only evaluated; public text (the corpus'
own public split, plus ``data.public_fraction`` of users) trains the
tokenizer and the central pre-training stage and is never a device's data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raysim import rng
from raysim.config import ExperimentConfig, split_seed
from raysim.data.corpus import PUBLIC_USER, SHIPPED
from raysim.data.sources import partition, read_table
from raysim.data.tokenizer import eos_id, load_tokenizer, train_tokenizer
from raysim.errors import ConfigError
from raysim.models.build import folder_tokenizer, model_vocab_size
from raysim.registry import Registry


@dataclass
class TextDataset:
    users: list[str]  # training users, sorted
    blocks: torch.Tensor  # int32 [total sequences, seq_len], users' sequences back to back
    offsets: np.ndarray  # user u owns blocks[offsets[u]:offsets[u + 1]]
    eval_users: list[str]
    eval_blocks: torch.Tensor
    public_blocks: torch.Tensor
    vocab_size: int  # the tokenizer's

    @property
    def num_users(self) -> int:
        return len(self.users)

    def user_of(self, device_id: int) -> int:
        return device_id % self.num_users

    def device_examples(self, device_id: int) -> torch.Tensor:
        u = self.user_of(device_id)
        return self.blocks[self.offsets[u]:self.offsets[u + 1]].long()

    def eval_examples(self) -> torch.Tensor:
        return self.eval_blocks.long()

    def public_examples(self) -> torch.Tensor:
        return self.public_blocks.long()

    def fingerprint(self) -> str:
        """A content hash of everything a run trains and evaluates on."""
        h = hashlib.sha256()
        for t in (self.blocks, self.eval_blocks, self.public_blocks):
            h.update(t.numpy().tobytes())
        h.update(np.asarray(self.offsets).tobytes())
        h.update("\n".join(self.users + ["|"] + self.eval_users).encode())
        return h.hexdigest()[:16]


def _pack(ids: list[list[int]], *, eos: int, seq_len: int, max_blocks: int | None) -> np.ndarray:
    """Concatenate texts with EOS between them and cut into full sequences (GPT-2 style)."""
    flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int32)
    n = len(flat) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    return flat[: n * seq_len].reshape(n, seq_len)


# ``data.source`` names one of these corpora (texts per user, and their source for messages); any other value
# of it is a file or folder of text (:func:`from_file`)
CORPORA: Registry[Callable[[ExperimentConfig], tuple[dict[str, list[str]], str]]] = Registry("text corpus")


def load_user_texts(cfg: ExperimentConfig) -> tuple[dict[str, list[str]], str]:
    """Texts per user from ``data.source``, and the source name for messages."""
    return CORPORA.get(cfg.data.source, from_file)(cfg)


@CORPORA.register("python-docs")
def python_docs(cfg: ExperimentConfig) -> tuple[dict[str, list[str]], str]:
    """The shipped corpus (:mod:`raysim.data.corpus`), always split naturally, by module."""
    table, source = pq.read_table(SHIPPED), str(SHIPPED)
    natural = replace(cfg.data, partition="natural", user_column="user", text_column="text")
    return partition(table, natural, seed=split_seed(cfg), source=source), source


def from_file(cfg: ExperimentConfig) -> tuple[dict[str, list[str]], str]:
    """A .parquet or .jsonl file or a ``datasets`` folder (:func:`~raysim.data.sources.read_table`), split by
    ``data.partition``."""
    source = str(Path(cfg.data.source).expanduser())
    return partition(read_table(source), cfg.data, seed=split_seed(cfg), source=source), source


def build_text_dataset(cfg: ExperimentConfig) -> TextDataset:
    d = cfg.data
    texts, source = load_user_texts(cfg)
    public_names = {PUBLIC_USER} & set(texts)
    others = sorted(set(texts) - public_names)
    if d.public_fraction > 0:
        draw = rng.uniform(split_seed(cfg), "public-users", ids=np.arange(len(others)))
        public_names |= {u for u, x in zip(others, draw) if x < d.public_fraction}
    public_texts = [t for u in sorted(public_names) for t in texts[u]]

    vocab_size = model_vocab_size(cfg.model)
    vocab_key = "model.path" if cfg.model.path else "model.vocab_size"  # what sets the model's vocabulary
    vocab = f"the model's {vocab_size:,} (model.path)" if cfg.model.path else f"model.vocab_size={vocab_size:,}"
    tokenizer_path = d.tokenizer.path or (folder_tokenizer(cfg.model.path) if cfg.model.path else None)
    if tokenizer_path:
        tok = load_tokenizer(str(tokenizer_path))
    elif public_texts:
        tok = train_tokenizer(public_texts, vocab_size=vocab_size, cache_dir=Path(cfg.pretrain.cache_dir))
        if tok.get_vocab_size() < vocab_size:  # BPE ran out of pairs to merge: the text is too small
            raise ConfigError(
                f"the public text of {Path(source).name} yields a BPE vocabulary of {tok.get_vocab_size():,} "
                f"tokens, fewer than {vocab}; lower it, give more public text "
                f"(data.public_fraction, more users), a tokenizer (data.tokenizer.path), or use "
                f"data.source=synthetic (any vocabulary size)", field=vocab_key)
    else:
        raise ConfigError("no public text to train a tokenizer on: set data.public_fraction > 0 "
                          "or give data.tokenizer.path", file=source, field="data.tokenizer.path")
    if tok.get_vocab_size() > vocab_size:
        raise ConfigError(f"the tokenizer has {tok.get_vocab_size():,} tokens, more than {vocab}",
                          field="data.tokenizer.path" if tokenizer_path else vocab_key)
    eos = eos_id(tok)

    def encode(names: list[str], max_blocks: int | None) -> list[np.ndarray]:
        return [_pack([e.ids for e in tok.encode_batch(texts[u])], eos=eos, seq_len=d.seq_len, max_blocks=max_blocks)
                for u in names]

    private = [u for u in others if u not in public_names]
    packed = dict(zip(private, encode(private, d.max_examples)))
    kept = [u for u in private if len(packed[u]) >= d.min_examples]
    if len(kept) < d.eval_users + 2:
        raise ConfigError(f"only {len(kept)} users have >= data.min_examples={d.min_examples} sequences of "
                          f"{d.seq_len} tokens; need data.eval_users + 2", file=source, field="data.min_examples")
    order = np.argsort(rng.uniform(split_seed(cfg), "eval-users", ids=np.arange(len(kept))), kind="stable")
    eval_users = sorted(kept[i] for i in order[: d.eval_users])
    train_users = sorted(set(kept) - set(eval_users))

    per_user = max(1, cfg.eval.max_examples // len(eval_users))
    eval_blocks = np.concatenate([packed[u][:per_user] for u in eval_users])
    public_blocks = (np.concatenate(encode(sorted(public_names), None)) if public_names
                     else np.empty((0, d.seq_len), np.int32))
    sizes = [len(packed[u]) for u in train_users]
    return TextDataset(
        users=train_users,
        blocks=torch.from_numpy(np.concatenate([packed[u] for u in train_users])),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        eval_users=eval_users,
        eval_blocks=torch.from_numpy(eval_blocks),
        public_blocks=torch.from_numpy(public_blocks),
        vocab_size=tok.get_vocab_size(),
    )
