"""The schema of ``pretrain.sources`` and ``synth``: what central pre-training trains on, and how ``raysim synth``
makes public data that resembles the users' (raysim/synth/)."""

from __future__ import annotations

from dataclasses import dataclass, field

# the sources raysim.synth.sources registers (its import checks the two agree; validation reads this one)
SOURCE_NAMES = ("public", "oracle", "file", "generated", "filtered", "transformed", "refiltered")


@dataclass
class SourceConfig:
    """One pre-training source. Every source is text, tokenized with the run's tokenizer (which no source
    changes: ``data.tokenizer``) and packed into ``data.seq_len`` sequences."""

    # public: the corpus' own public split (python-docs: the language reference) | oracle: the users
    # data.public_fraction sets aside, real users' text (an upper bound) | file: a table's text column (path)
    # | generated, filtered, transformed: made by raysim synth from the broad public pool (synth.*)
    # | refiltered: synth's candidates re-ranked by a finished DP run's model (run)
    name: str = "public"
    # share of pre-training batches' sequences; null on every source: pooled, each sequence equally likely
    weight: float | None = None
    path: str | None = None  # file: a .parquet, .jsonl or datasets folder; its data.text_column is read
    run: str | None = None  # refiltered: a run directory with a checkpoint (its DP fine-tuned model)


@dataclass
class GeneratorConfig:
    """The server's generator: a GPT-2 built and trained by raysim on the broad public pool (no download)."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 2048  # its own BPE tokenizer, trained on the pool
    seq_len: int = 64
    steps: int = 1500  # pre-training's recipe (raysim/models/pretrain.py), cached the same way
    batch_size: int = 32
    lr: float = 5.0e-3


@dataclass
class SynthConfig:
    """``raysim synth``: server-side steps on public text only, each cached by content hash under
    ``pretrain.cache_dir/synth``."""

    seed: int = 0  # every draw of synth (training, sampling, which chunks are transformed)
    # domain prompts, one per line, written without looking at private text; null: raysim/synth/prompts.txt
    prompts: str | None = None
    max_pool: int | None = None  # use at most this many pool texts (the first by content hash): quick looks; null: all
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    generated: int = 4000  # texts sampled from the generator, prompts in turn
    max_new_tokens: int = 48  # per sampled text (it ends earlier at end-of-text)
    temperature: float = 1.0
    top_p: float = 0.95  # nucleus sampling
    # the domain scorer: the generator fine-tuned for these steps on the generated texts (and the prompts)
    domain_steps: int = 300
    # filtered: the pool chunks whose cross-entropy difference (generator minus domain scorer, Moore & Lewis
    # 2010) ranks in this top share
    filter_fraction: float = 0.25
    transformed: int = 3000  # transformed: pool chunks whose start the domain scorer continues
    prefix_tokens: int = 12  # of each transformed chunk, kept as the prompt
    # refiltered: the share of the candidates (pool chunks, generated and transformed texts) kept, ranked by
    # the DP model's log-likelihood minus the public model's
    refilter_fraction: float = 0.25
