"""Tokenizers: byte-level BPE trained locally on the public split, or loaded from a path.

Training is cached by a hash of the training text and the vocabulary size, so
every run on the same public text reuses one ``tokenizer.json``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raysim.errors import ConfigError
from raysim.io.results import atomic_write

EOS = "<|endoftext|>"


def content_hash(texts: list[str], *extra: object) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    h.update(repr(extra).encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: list[str], *, vocab_size: int, cache_dir: Path) -> Tokenizer:
    """Byte-level BPE with ``vocab_size`` entries (EOS included), cached by content."""
    path = Path(cache_dir).expanduser() / "tokenizers" / content_hash(texts, vocab_size) / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tok.save(str(tmp)))  # runs training it at once never share a file
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A ``tokenizer.json`` file, or a folder holding one (a saved HF fast tokenizer)."""
    p = Path(path).expanduser()
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError("no tokenizer.json there", file=str(p), field="data.tokenizer.path")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises plain Exceptions for bad files
        raise ConfigError(f"cannot load tokenizer: {err}", file=str(file), field="data.tokenizer.path") from None


def eos_id(tok: Tokenizer) -> int:
    """The end-of-text id, or the last id when the tokenizer has none."""
    found = tok.token_to_id(EOS)
    return found if found is not None else tok.get_vocab_size() - 1
