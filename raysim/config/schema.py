"""The experiment's schema: one dataclass per section, defaults included, each key documented where it is set.

OmegaConf merges YAML files and overrides into these (:mod:`raysim.config.load`) and rejects unknown keys and
wrong types; :mod:`raysim.config.validate` checks what types cannot say. ``MethodsConfig`` is derived from the
method registry (:mod:`raysim.methods`): one list-valued key per per-device method, then the method options.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from raysim.config.synth import SourceConfig, SynthConfig
from raysim.methods import METHODS, Method


@dataclass
class CohortConfig:
    size: int = 16  # updates aggregated per round (the target)
    sampling: str = "fixed"  # fixed | poisson
    over_selection: float = 1.0  # select ceil(size * over_selection) devices
    deadline_s: float | None = None  # virtual seconds; None = wait for the target


@dataclass
class TrainConfig:
    local_steps: int = 4
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass
class ModelConfig:
    # gpt2 (GPT-2: LayerNorm, learned positions, GELU MLP) | llama (a Llama-style decoder: RMSNorm, rotary
    # positions, SwiGLU MLP, grouped-query attention). Ignored with model.path (the folder's config decides)
    family: str = "gpt2"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4  # attention (query) heads
    n_kv_head: int | None = None  # llama: key-value heads (grouped-query attention); null: n_head
    n_inner: int | None = None  # MLP hidden units; null: 4 * n_embd (gpt2), 8/3 * n_embd rounded up to 64 (llama)
    vocab_size: int = 1024
    n_positions: int = 64
    rope_theta: float = 10000.0  # llama: the rotary positions' base
    # dropout during local training: GPT-2's residual, embedding and attention dropout; Llama's attention dropout
    dropout: float = 0.0
    # a local Hugging Face model folder (GPT-2, Llama, Mistral or Qwen2 type): its config gives the family,
    # sizes and vocabulary, its tokenizer.json the tokenizer (unless data.tokenizer.path is set)
    path: str | None = None
    # seed of the base model's initialisation and pre-training; None: the run's seed. Fix it to
    # fine-tune one base model under many run seeds (studies, train-policy); they then share one pre-training
    seed: int | None = None
    # GPT-2 ties its output head to the token embedding (true; Llama-style models may too). false: the head
    # is its own V x d matrix, and partial embeddings train its rows (the output embedding): their gradient
    # needs only the last hidden state, so a device training its top blocks does not back-propagate below
    # them. Ignored with model.path (the folder's config decides)
    tie_embeddings: bool = True


@dataclass
class TokenizerConfig:
    path: str | None = None  # tokenizer.json (or a folder holding one); None: train BPE on the public split


@dataclass
class DataConfig:
    # python-docs (the shipped corpus) | synthetic | a path: .parquet, .jsonl, or a datasets save_to_disk folder
    source: str = "python-docs"
    user_column: str = "user"
    text_column: str = "text"
    partition: str = "natural"  # natural (by user column) | dirichlet (over label_column) | iid
    label_column: str | None = None  # dirichlet: the label/topic column; classification: the label (python-docs: kind)
    # lm: next-token prediction on packed text | classification: one text per sequence, classified by a linear
    # head on the last hidden state at its first EOS (the head trains on every device; methods.split keeps it there)
    task: str = "lm"
    labels: list[str] | None = None  # classification: the label values to classify, in class order; others dropped
    dirichlet_alpha: float = 0.5
    num_users: int | None = None  # dirichlet / iid: users to make (None: as many as natural users)
    public_fraction: float = 0.0  # share of users set aside as public text (the corpus' own public split is kept)
    # seed of the split (public, held-out and training users, partitions) and of synthetic data; None: the
    # run's seed. Fix it so that runs with different seeds evaluate on the same held-out users (studies)
    seed: int | None = None
    min_examples: int = 2  # drop users with fewer sequences
    max_examples: int | None = 256  # keep at most this many sequences per user
    seq_len: int = 64
    eval_users: int = 32  # held-out users for evaluation
    examples_per_user: int = 32  # synthetic only
    num_styles: int = 8  # synthetic only: clusters of users that write alike
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class PretrainConfig:
    """Central pre-training on public text, cached by content hash."""

    steps: int = 0  # 0: start federated rounds from the initial (or loaded) model
    batch_size: int = 32
    lr: float = 3e-3
    cache_dir: str = "~/.cache/raysim"
    # what it trains on (raysim/config/synth.py): a list of {name, weight, path, run}; null: the dataset's public
    # split as one pool (the corpus' public text and the data.public_fraction users)
    sources: list[SourceConfig] | None = None


@dataclass
class MethodOptions:
    """The ``methods.*`` keys that are not per-device axes: how the methods the axes choose are set up."""

    lora_alpha_per_rank: float = 2.0  # alpha = lora_alpha_per_rank * rank
    # modules LoRA (and rank 0) trains in every block: gpt2 c_attn, c_proj (attention output and MLP's), c_fc;
    # llama q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. null: the attention's input
    # projections (gpt2 c_attn; llama q_proj, k_proj, v_proj)
    lora_target_modules: list[str] | None = None
    pruning: str = "heterofl"  # heterofl (static prefix) | fedrolex (rolling window)
    quantization: str = "tensor"  # tensor | row: one scale pair per tensor or per row
    embedding_rows: int | None = None  # partial embeddings: send exactly this many rows (hides which)
    # partial embeddings: which rows a device trains: device_seen (its tokens, sent with their indices: the
    # server learns each user's token set), server_frequent or server_random (the server's m = embedding_rows
    # rows of the round, no index travels; under central DP only they are noised). null: device_seen, except
    # under central DP, where a choice must be written
    embedding_selection: str | None = None
    # the training loss at the output (raysim/methods/output_loss.py): softmax (full, over every token) | nce
    # | sampled_softmax, which score each position's target and noise_samples tokens drawn from public
    # unigram counts, one set per device and step. Evaluation always uses the full softmax
    output_loss: str = "softmax"
    noise_samples: int = 128


def _axis(method: Method) -> tuple[str, Any, Any]:
    """``methods.<key>``: a list of the method's values, ``[default]`` by default."""
    return method.key, list[method.type], field(default_factory=functools.partial(list, [method.default]))


# The per-device method space a policy chooses from: one list per registered method (raysim/methods/base.py),
# then the options. A policy hands each device one value from each list (raysim.methods.space enumerates the
# product); the first value of every list is the default config, which the ``uniform`` policy gives everyone.
MethodsConfig = dataclasses.make_dataclass(
    "MethodsConfig", [*map(_axis, METHODS.values()), *((f.name, f.type, f) for f in dataclasses.fields(MethodOptions))])
MethodsConfig.__module__ = __name__  # its option types are names in this module (raysim.config.schema)


@dataclass
class AggregationConfig:
    server_optimizer: str = "fedavg"  # fedavg | fedadam
    server_lr: float = 1.0
    beta1: float = 0.9  # fedadam
    beta2: float = 0.99  # fedadam
    tau: float = 1e-3  # fedadam adaptivity
    # Heterogeneous LoRA ranks: flexlora (exact product-space mean, SVD re-factoring)
    # | hetlora (zero-padded factor mean; a baseline)
    lora: str = "flexlora"


@dataclass
class AdaptiveClippingConfig:
    """Andrew et al. 2021: the clip norm tracks a quantile of update norms, learnt from a noisy count."""

    enabled: bool = False  # privacy.clip_norm is then the initial clip norm
    target_quantile: float = 0.5  # share of updates left unclipped
    learning_rate: float = 0.2  # geometric step: C *= exp(-learning_rate * (unclipped share - target))
    count_std: float | None = None  # noise std on the unclipped count; None: expected cohort / 20


@dataclass
class LocalPrivacyConfig:
    """Record-level DP-SGD on every device through Opacus (per-example clipping and noise)."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0  # per-example gradient L2 norm
    delta: float = 1e-5  # per device; devices.parquet reports each device's epsilon at it


@dataclass
class PrivacyConfig:
    """User-level central DP (DP-FedAvg): on when ``clip_norm`` is set; needs Poisson cohorts."""

    # the central mechanism (raysim/privacy/mechanisms.py): dp_fedavg; null: dp_fedavg when clip_norm is set
    mechanism: str | None = None
    clip_norm: float | None = None  # per-device update L2 norm; None: no central DP
    noise_multiplier: float = 0.0  # noise std on the sum = noise_multiplier * clip_norm; 0: clipping only
    target_epsilon: float | None = None  # calibrate noise_multiplier for all the rounds instead
    max_epsilon: float | None = None  # stop the run at the last round within this budget
    delta: float = 1e-6  # must be below 1 / population size
    accountant: str = "rdp"  # rdp | prv (Opacus)
    # where LoRA updates are clipped and noised: dense (ΔW, aggregation.lora=flexlora) or factors (ffa, hetlora);
    # null: wherever aggregation.lora aggregates
    noise_space: str | None = None
    adaptive_clipping: AdaptiveClippingConfig = field(default_factory=AdaptiveClippingConfig)
    local: LocalPrivacyConfig = field(default_factory=LocalPrivacyConfig)


@dataclass
class EvalConfig:
    every: int = 5  # rounds; 0 = never (the last round is always evaluated when > 0)
    batch_size: int = 32
    max_examples: int = 512  # held-out sequences evaluated (spread over the eval users)
    target_accuracy: float | None = None  # summary.json reports the virtual time to reach it
    # stop once an evaluation reaches target_accuracy (status target_reached): time-to-target studies
    # then need no more rounds than the slowest policy takes, and `rounds` is a cap
    stop_at_target: bool = False


@dataclass
class CheckpointConfig:
    """The run's whole state, written atomically to ``checkpoint.safetensors`` (``raysim run --resume``)."""

    every: int = 1  # rounds between checkpoints (0: only where the run stops); a checkpoint costs ms per round


@dataclass
class RayConfig:
    """Where the device actors run. Results do not depend on ``num_actors`` or on the nodes they land on.

    What shapes a run's float rounding is fixed from the cohort and these keys
    (raysim/engine/work.py): ``tokens_per_pass``, ``work_units`` and the torch threads
    per actor (one per whole CPU in ``cpus_per_actor``).
    """

    address: str | None = None  # None: a private local Ray; "auto" or host:port: a cluster
    num_actors: int | None = None  # None: as many as the Ray holds now (CPUs / cpus_per_actor, and GPUs)
    cpus_per_actor: float = 1.0  # each actor runs torch on max(1, floor(cpus_per_actor)) threads
    gpus_per_actor: float = 0.0
    include_dashboard: bool = False
    # Devices with the same config train together in one pass of up to this many tokens per step
    # (raysim/models/grouped.py): each gets the update it would get alone, up to float32 rounding. 0: one per pass.
    tokens_per_pass: int = 4096
    # A round's passes are packed into at most this many units of work, each one partial sum; the
    # aggregator adds them in unit order. More units keep more actors busy; fewer send fewer partial sums.
    work_units: int = 64
    # Seconds to wait for the device actors to be placed before failing; None: 30 on a private local
    # Ray, 600 on a cluster (time for its autoscaler to add nodes).
    placement_timeout_s: float | None = None
    # A unit of work lost with its actor or node is computed again elsewhere, at most this many times;
    # a lost actor is replaced by a new one at most this many times.
    max_retries: int = 3


@dataclass
class SplitConfig:
    """How split devices (methods.split) hide their labels from the server (raysim/split/mechanisms.py)."""

    mechanism: str = "plain"  # plain (split LoRA) | dcor (distance correlation) | p3eft (mixed adapter sets)
    dcor_weight: float = 0.1  # dcor: weight of log dCor² between the server's outputs and the labels
    adapter_sets: int = 2  # p3eft: adapter sets the server runs per device (the paper's n)
    coefficient_std: float = 1.0  # p3eft: σ of the antisymmetric mixing matrix (the code's 10^(mult_std/2), mult_std 0)
    adversary_weight: float = 0.1  # p3eft: weight of each set's adversarial probe loss (0: none)


@dataclass
class ServerConfig:
    """The server split devices (methods.split) share: it runs their blocks above the cut."""

    # training throughput, GFLOP/s, shared equally by the split devices of a round. Default: an NVIDIA A100
    # (312 TFLOP/s dense bf16 peak, its datasheet) at a third of peak, a typical training utilisation
    train_gflops: float = 100000.0


@dataclass
class EmulatorConfig:
    """One named offsite-tuning emulator (raysim/offsite/): ``methods.emulator`` lists names from ``emulators``.

    The device gets ``bottom`` and ``top`` blocks whole (its adapters: they train, with LoRA at the device's
    ``methods.lora_rank`` or, at rank 0, fully) and a compressed stand-in of the ``n_layer - bottom - top``
    middle blocks; it never receives the full model. The model owner builds the emulator on the public split
    before round 1 (cached under pretrain.cache_dir like pre-training)."""

    # uniform (keep evenly spaced middle blocks: Offsite-Tuning's baseline) | distilled (uniform, then trained to
    # match the full model's middle output) | importance (keep the blocks whose removal raises the public loss
    # most) | harmonizer (ScaleOT's LayerReplace: the other blocks become small trained residual MLPs)
    kind: str = "uniform"
    bottom: int = 2  # adapter blocks at the bottom
    top: int = 2  # adapter blocks at the top
    keep: int | None = None  # middle blocks kept whole; null: half of them, rounded up
    harmonizer_rank: int = 16  # harmonizer: hidden units of each replacement MLP h + W_up ReLU(W_down h)
    # selective rank compression: the kept middle blocks' attention weights at rank round(svd_fraction * full
    # rank) (their SVD); null: uncompressed
    svd_fraction: float | None = None
    steps: int = 200  # distilled, harmonizer: training steps on the public split
    batch_size: int = 16  # sequences per training step
    lr: float = 1e-3  # AdamW, warm-up then cosine (pretrain's schedule)
    kd_weight: float = 30.0  # loss = next-token loss + kd_weight * KD (Offsite-Tuning's scripts use 30)
    score_sequences: int = 64  # importance, harmonizer: public sequences each block's score is measured on


@dataclass
class CostsConfig:
    """What the cost model prices (raysim/emulation/costmodel.py): a declared training recipe, measured on a model built
    for the measurement alone, so that how raysim computes (``speedups``, grouped passes) changes no cost."""

    # reference: the Hugging Face model as transformers builds it (its own activation module, eager
    # attention), full logits and F.cross_entropy, float32 gradients and AdamW's two moments
    # | fused: the same step with the tanh GELU as one kernel and the next-token loss taken chunk by chunk
    # through the head (no (positions x vocabulary) logits are kept for backward)
    recipe: str = "reference"


@dataclass
class SpeedupsConfig:
    """How raysim computes faster than transformers does (raysim/models/fastops.py). Each changes results at most by
    float rounding, and no cost column (``costs.recipe`` decides those); all off, raysim trains as the plain
    Hugging Face model would."""

    fused_activations: bool = True  # GPT-2's tanh GELU as one kernel forward and one backward
    chunked_loss: bool = True  # the next-token loss through a frozen head, chunk by chunk: no full logits
    keep_freed_memory: bool = True  # glibc keeps freed pages in the process: no page faults per pass (exact)


@dataclass
class TrackingConfig:
    """Experiment tracking (raysim/tracking.py): every round's ``rounds.parquet`` row and the resolved config,
    logged as the run goes. Changes no result."""

    tensorboard: bool = False  # event files in <run>/tensorboard (pip install 'raysim[tensorboard]')
    mlflow: bool = False  # one MLflow run, continued by --resume (pip install 'raysim[mlflow]')
    # the MLflow tracking URI (http://host:5000, sqlite:////abs/path.db, ...); null: a SQLite store in the
    # run folder, <run>/mlflow/mlflow.db, its artifacts in <run>/mlflow/artifacts
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None  # the MLflow experiment; null: the run's name


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    rounds: int = 10
    output_dir: str | None = None  # default runs/<name>-<timestamp>
    population: str = "gboard"  # a name from device_profiles/ or a path
    population_size: int | None = None  # None: the population file's size
    policy: str = "uniform"  # a name from policies/ or a path
    progress: bool = True
    # set by raysim compare: the run's axis values (key -> value as text). They label every row of its tables
    # (columns axis.<key>) and change no result
    study_axes: dict[str, str] = field(default_factory=dict)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    methods: MethodsConfig = field(default_factory=MethodsConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    emulators: dict[str, EmulatorConfig] = field(default_factory=dict)  # offsite-tuning emulators, by name
    synth: SynthConfig = field(default_factory=SynthConfig)  # raysim synth (pretrain.sources: generated, ...)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    speedups: SpeedupsConfig = field(default_factory=SpeedupsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)



def split_seed(cfg: ExperimentConfig) -> int:
    """The seed of the data split and synthetic data: ``data.seed``, else the run's."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed

