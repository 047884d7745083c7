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
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysim import rng
from raysim.config import DataConfig, ExperimentConfig, split_seed
from raysim.data.corpus import PUBLIC_USER, SHIPPED
from raysim.data.sources import column, partition_rows, read_table, text_column
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
    # data.task: classification. Each sequence is one text (then EOS padding) and has a label: its index in
    # data.labels, one per row of blocks and eval_blocks
    labels: torch.Tensor | None = None
    eval_labels: torch.Tensor | None = None
    pad_id: int | None = None  # the EOS that ends (and pads) every sequence

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

    def device_labels(self, device_id: int) -> torch.Tensor:
        u = self.user_of(device_id)
        return self.labels[self.offsets[u]:self.offsets[u + 1]]

    def public_examples(self) -> torch.Tensor:
        return self.public_blocks.long()

    def fingerprint(self) -> str:
        """A content hash of everything a run trains and evaluates on."""
        h = hashlib.sha256()
        for t in (self.blocks, self.eval_blocks, self.public_blocks, self.labels, self.eval_labels):
            if t is not None:
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


@dataclass(frozen=True)
class UserTexts:
    """A corpus split into users: each user's texts and, for a labelled task, each text's label."""

    texts: dict[str, list[str]]
    labels: dict[str, list[str]] | None  # data.task: classification; the label column's values, as strings
    source: str  # for messages


# ``data.source`` names one of these corpora; any other value of it is a file or folder of text (:func:`from_file`)
CORPORA: Registry[Callable[[ExperimentConfig], UserTexts]] = Registry("text corpus")


def load_user_texts(cfg: ExperimentConfig) -> UserTexts:
    """Texts (and labels) per user from ``data.source``."""
    return CORPORA.get(cfg.data.source, from_file)(cfg)


def split_table(table: pa.Table, data: DataConfig, *, seed: int, source: str) -> UserTexts:
    """``table``'s rows dealt to users by ``data.partition``; labels from ``data.label_column`` where the task
    is classification."""
    texts = text_column(table, data, source=source)
    rows = partition_rows(table, data, seed=seed, source=source)
    labels = None
    if data.task == "classification":
        values = column(table, data.label_column, key="data.label_column", source=source)
        labels = {user: [str(values[r]) for r in user_rows] for user, user_rows in rows.items()}
    return UserTexts({user: [texts[r] for r in user_rows] for user, user_rows in rows.items()}, labels, source)


@CORPORA.register("python-docs")
def python_docs(cfg: ExperimentConfig) -> UserTexts:
    """The shipped corpus (:mod:`raysim.data.corpus`), always split naturally, by module; its label is
    ``kind`` (docstring, comment) unless ``data.label_column`` names another column."""
    natural = replace(cfg.data, partition="natural", user_column="user", text_column="text",
                      label_column=cfg.data.label_column or "kind")
    return split_table(pq.read_table(SHIPPED), natural, seed=split_seed(cfg), source=str(SHIPPED))


def from_file(cfg: ExperimentConfig) -> UserTexts:
    """A .parquet or .jsonl file or a ``datasets`` folder (:func:`~raysim.data.sources.read_table`), split by
    ``data.partition``."""
    source = str(Path(cfg.data.source).expanduser())
    return split_table(read_table(source), cfg.data, seed=split_seed(cfg), source=source)


def build_text_dataset(cfg: ExperimentConfig) -> TextDataset:
    d = cfg.data
    corpus = load_user_texts(cfg)
    texts, source = corpus.texts, corpus.source
    public_names = _public_names(cfg, texts)
    others = sorted(set(texts) - {PUBLIC_USER})
    tok = _tokenizer(cfg, [t for u in sorted(public_names) for t in texts[u]], source)
    eos = eos_id(tok)

    def pack(names: list[str], max_blocks: int | None) -> list[np.ndarray]:
        return [_pack([e.ids for e in tok.encode_batch(texts[u])], eos=eos, seq_len=d.seq_len, max_blocks=max_blocks)
                for u in names]

    private = [u for u in others if u not in public_names]
    if corpus.labels is None:
        packed = dict(zip(private, pack(private, d.max_examples)))
        labels = None
    else:
        packed, labels = _labelled(tok, corpus, private, cfg, eos=eos)
    kept = [u for u in private if len(packed[u]) >= d.min_examples]
    if len(kept) < d.eval_users + 2:
        raise ConfigError(f"only {len(kept)} users have >= data.min_examples={d.min_examples} sequences of "
                          f"{d.seq_len} tokens; need data.eval_users + 2", file=source, field="data.min_examples")
    order = np.argsort(rng.uniform(split_seed(cfg), "eval-users", ids=np.arange(len(kept))), kind="stable")
    eval_users = sorted(kept[i] for i in order[: d.eval_users])
    train_users = sorted(set(kept) - set(eval_users))

    per_user = max(1, cfg.eval.max_examples // len(eval_users))
    public_blocks = (np.concatenate(pack(sorted(public_names), None)) if public_names
                     else np.empty((0, d.seq_len), np.int32))
    sizes = [len(packed[u]) for u in train_users]

    def joined(table: dict[str, np.ndarray] | None, users: list[str], cap: int | None = None) -> torch.Tensor | None:
        return None if table is None else torch.from_numpy(np.concatenate([table[u][:cap] for u in users]))

    return TextDataset(
        users=train_users,
        blocks=joined(packed, train_users),
        offsets=np.concatenate([[0], np.cumsum(sizes)]),
        eval_users=eval_users,
        eval_blocks=joined(packed, eval_users, per_user),
        public_blocks=torch.from_numpy(public_blocks),
        vocab_size=tok.get_vocab_size(),
        labels=joined(labels, train_users),
        eval_labels=joined(labels, eval_users, per_user),
        pad_id=eos,
    )


def _public_names(cfg: ExperimentConfig, texts: dict[str, list[str]]) -> set[str]:
    """The corpus' public user (if it has one) and the users ``data.public_fraction`` sets aside."""
    public_names = {PUBLIC_USER} & set(texts)
    others = sorted(set(texts) - public_names)
    if cfg.data.public_fraction > 0:
        draw = rng.uniform(split_seed(cfg), "public-users", ids=np.arange(len(others)))
        public_names |= {u for u, x in zip(others, draw) if x < cfg.data.public_fraction}
    return public_names


def public_texts(cfg: ExperimentConfig) -> tuple[dict[str, list[str]], object]:
    """The public split's texts by part, ``public`` (the corpus' own public text) and ``oracle`` (the users
    ``data.public_fraction`` sets aside), and the run's tokenizer (trained on both, whatever pre-trains)."""
    corpus = load_user_texts(cfg)
    names = _public_names(cfg, corpus.texts)
    parts = {"public": list(corpus.texts.get(PUBLIC_USER, [])),
             "oracle": [t for u in sorted(names - {PUBLIC_USER}) for t in corpus.texts[u]]}
    return parts, _tokenizer(cfg, [t for u in sorted(names) for t in corpus.texts[u]], corpus.source)


def pack_texts(tok, texts: list[str], *, seq_len: int) -> np.ndarray:
    """``texts`` tokenized, EOS after each, cut into full sequences of ``seq_len`` tokens."""
    return _pack([e.ids for e in tok.encode_batch(texts)], eos=eos_id(tok), seq_len=seq_len, max_blocks=None)


def _tokenizer(cfg: ExperimentConfig, public_texts: list[str], source: str):
    """The run's tokenizer: ``data.tokenizer.path``, the model folder's, or BPE trained on the public text."""
    d = cfg.data
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
    return tok


def _labelled(tok, corpus: UserTexts, users: list[str], cfg: ExperimentConfig, *,
              eos: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per user, one sequence per text whose label ``data.labels`` lists (its first ``seq_len - 1`` tokens, an
    EOS, then EOS padding: the classifier reads the first EOS), at most ``data.max_examples``, and its labels'
    indices into ``data.labels``."""
    d = cfg.data
    index = {name: i for i, name in enumerate(d.labels)}
    seen: set[str] = set()
    sequences, labels = {}, {}
    for u in users:
        keep = [j for j, label in enumerate(corpus.labels[u]) if label in index][: d.max_examples]
        rows = np.full((len(keep), d.seq_len), eos, dtype=np.int32)
        for row, e in zip(rows, tok.encode_batch([corpus.texts[u][j] for j in keep])):
            ids = e.ids[: d.seq_len - 1]
            row[: len(ids)] = ids
        sequences[u] = rows
        labels[u] = np.array([index[corpus.labels[u][j]] for j in keep], dtype=np.int64)
        seen |= {corpus.labels[u][j] for j in keep}
    if missing := [name for name in d.labels if name not in seen]:
        raise ConfigError(f"no user's text has the label {missing[0]!r} (column {d.label_column or 'kind'})",
                          file=corpus.source, field="data.labels")
    return sequences, labels
