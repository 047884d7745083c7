"""Experiment configuration: OmegaConf structured configs with one clear error.

``load_experiment(path, overrides)`` merges, in order, the dataclass defaults,
the YAML file and ``key=value`` overrides, then validates ranges. Unknown keys
and wrong types are rejected by OmegaConf's structured merge; the error is
turned into a :class:`ConfigError` that names the file (or "override") and the
dotted key. Every float must be finite, and each key is range-checked
(:func:`validate`); a bad value is reported against where it was last set:
the file, "override", or a study's layer.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from raysim.errors import ConfigError
from raysim.io import shipped
from raysim.methods import METHODS, Method
from raysim.methods.embedding_updates import EMBEDDING_SELECTIONS, SERVER_SELECTIONS

QUICKSTART = shipped.folder("experiments") / "quickstart.yaml"


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
    label_column: str | None = None  # dirichlet: the label/topic column
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
    """Central pre-training on the public split, cached by content hash."""

    steps: int = 0  # 0: start federated rounds from the initial (or loaded) model
    batch_size: int = 32
    lr: float = 3e-3
    cache_dir: str = "~/.cache/raysim"


OUTPUT_LOSSES = ("softmax", "nce", "sampled_softmax")  # raysim/methods/output_loss.py


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
MethodsConfig.__module__ = __name__  # its option types are names in this module


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    speedups: SpeedupsConfig = field(default_factory=SpeedupsConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_mapping(path: str | Path, *, kind: str) -> DictConfig:
    """A YAML file that must hold a mapping (an experiment, a study, a policy), or one ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} file not found", file=str(path))
    try:
        data = OmegaConf.load(p)
    except Exception as err:  # YAML syntax errors come in many types
        raise ConfigError(f"cannot parse YAML: {str(err).splitlines()[0]}", file=str(path)) from None
    if not isinstance(data, DictConfig):
        raise ConfigError(f"a{'n' * (kind[0] in 'aeiou')} {kind} file must be a mapping of keys", file=str(path))
    return data


def _explain(err: OmegaConfBaseException, *, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or None
    if isinstance(err, ConfigKeyError):
        return ConfigError("unknown key" + _did_you_mean(err), file=source, field=key)
    msg = str(err).splitlines()[0]
    if "is not a subclass of" in msg:
        msg = "expected a mapping of keys"
    return ConfigError(msg, file=source, field=key)


def _did_you_mean(err: ConfigKeyError) -> str:
    """`` (did you mean cohort.deadline_s?)`` for a key close to one of its section's, else nothing."""
    section = err.object_type
    if not dataclasses.is_dataclass(section) or err.key is None:
        return ""
    close = difflib.get_close_matches(str(err.key), [f.name for f in dataclasses.fields(section)], n=1)
    prefix = (err.full_key or "").removesuffix(str(err.key))
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _merge(base: DictConfig, extra: Any, *, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, extra)
    except OmegaConfBaseException as err:
        raise _explain(err, source=source) from None


def frozen(value: Any) -> Any:
    """A config section (or any value in one) as a hashable key: dataclasses as (name, fields), lists as tuples."""
    if dataclasses.is_dataclass(value):
        return type(value).__name__, tuple((f.name, frozen(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, frozen(v)) for k, v in value.items()))
    return value


def split_seed(cfg: ExperimentConfig) -> int:
    """The seed of the data split and synthetic data: ``data.seed``, else the run's."""
    return cfg.seed if cfg.data.seed is None else cfg.data.seed


def load_experiment(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    layers: Sequence[tuple[str, Any]] = (),
) -> ExperimentConfig:
    """Defaults <- YAML file <- overrides <- ``layers``, validated; a plain ExperimentConfig.

    ``layers`` are (source, mapping) pairs merged in turn; errors in one name
    its source (``raysim compare`` layers a study's base and axis values).
    """
    cfg = OmegaConf.structured(ExperimentConfig)
    setters: list[tuple[str, set[str]]] = []  # (source, the dotted keys it set), in merge order
    if path is not None:
        data = load_mapping(path, kind="experiment")
        cfg = _merge(cfg, data, source=str(path))
        setters.append((str(path), _dotted_keys(data)))
    for item in overrides or []:
        data = parse_override(item)
        cfg = _merge(cfg, data, source="override")
        setters.append(("override", _dotted_keys(data)))
    for layer_source, data in layers:
        cfg = _merge(cfg, data, source=layer_source)
        setters.append((layer_source, _dotted_keys(data)))
    experiment = OmegaConf.to_object(cfg)
    try:
        validate(experiment, source=setters[0][0] if setters else "config")
    except ConfigError as err:
        # name whoever set the bad value last: a file's value fixed by an override is the override's fault
        owner = next((src for src, keys in reversed(setters) if err.field and _sets(keys, err.field)), err.file)
        raise ConfigError(err.message, file=owner, field=err.field) from None
    return experiment


def _dotted_keys(data: Any, prefix: str = "") -> set[str]:
    """Every dotted key a mapping sets, sections included (``privacy``, ``privacy.clip_norm``)."""
    if not isinstance(data, (dict, DictConfig)):
        return set()
    keys = set()
    for key, value in (data.items_ex(resolve=False) if isinstance(data, DictConfig) else data.items()):
        dotted = f"{prefix}{key}"
        keys |= {dotted, *_dotted_keys(value, f"{dotted}.")}
    return keys


def _sets(keys: set[str], field_name: str) -> bool:
    """Whether ``keys`` set the value at ``field_name`` (``methods.bits[1]`` is set by ``methods.bits``)."""
    return field_name.split("[")[0] in keys


def parse_override(item: str) -> DictConfig:
    """``key=value`` as a nested mapping; a malformed one is a ConfigError."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value", file="override")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as err:
        raise _explain(err, source="override") from None
    except yaml.YAMLError as err:  # the value is YAML; its errors span lines and point into a one-line string
        key, value = item.split("=", 1)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"cannot parse value {value!r}: {problem}", file="override", field=key) from None


def _check(ok: bool, field_name: str, message: str, *, source: str) -> None:
    if not ok:
        raise ConfigError(message, file=source, field=field_name)


def non_finite(value: Any, prefix: str = "") -> tuple[str, float] | None:
    """The dotted key and value of the first float in a config (or section) that is inf or NaN; None if all
    are finite.

    Every float key has a finite meaning only: an infinite clip norm or noise multiplier, learning rate or
    deadline gives a false result or a hang, never a useful limit (None is how a key says "no limit")."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if (found := non_finite(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name)) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            if (found := non_finite(item, f"{prefix}[{i}]")) is not None:
                return found
    elif isinstance(value, float) and not math.isfinite(value):
        return prefix, value
    return None


def validate(cfg: ExperimentConfig, *, source: str = "config") -> None:
    """Range checks the type system cannot express, section by section (a bad value is reported against
    ``source``); names are checked against their registries."""
    c = lambda ok, key, msg: _check(ok, key, msg, source=source)  # noqa: E731
    if (bad := non_finite(cfg)) is not None:
        c(False, bad[0], f"must be finite (got {bad[1]})")
    for section in (_validate_run, _validate_model, _validate_data, _validate_methods, _validate_aggregation,
                    _validate_private, _validate_eval, _validate_ray):
        section(cfg, c)


def _validate_run(cfg: ExperimentConfig, c) -> None:
    from raysim.emulation.cohort import SAMPLING

    c(cfg.rounds >= 1, "rounds", "must be >= 1")
    c(cfg.population_size is None or cfg.population_size >= 1, "population_size", "must be >= 1")
    c(cfg.cohort.size >= 1, "cohort.size", "must be >= 1")
    c(cfg.cohort.sampling in SAMPLING, "cohort.sampling", f"must be {SAMPLING.choices()}")
    c(cfg.cohort.over_selection >= 1.0, "cohort.over_selection", "must be >= 1.0")
    c(cfg.cohort.deadline_s is None or cfg.cohort.deadline_s > 0, "cohort.deadline_s", "must be > 0")
    c(cfg.train.local_steps >= 1, "train.local_steps", "must be >= 1")
    c(cfg.train.batch_size >= 1, "train.batch_size", "must be >= 1")
    c(cfg.train.lr > 0, "train.lr", "must be > 0")
    c(cfg.train.weight_decay >= 0, "train.weight_decay", "must be >= 0")


def _validate_model(cfg: ExperimentConfig, c) -> None:
    from raysim.models.architectures import ARCHITECTURES

    m = cfg.model
    c(m.n_layer >= 1, "model.n_layer", "must be >= 1")
    c(m.n_head >= 1 and m.n_embd % m.n_head == 0, "model.n_head", "must divide model.n_embd")
    c(m.family in ARCHITECTURES, "model.family", f"must be {ARCHITECTURES.choices()}")
    c(m.n_kv_head is None or (m.n_kv_head >= 1 and m.n_head % m.n_kv_head == 0), "model.n_kv_head",
      f"must divide model.n_head={m.n_head}")
    c(m.n_kv_head is None or m.family != "gpt2", "model.n_kv_head", "GPT-2 has no grouped-query attention")
    c(m.n_inner is None or m.n_inner >= 1, "model.n_inner", "must be >= 1")
    c(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    c(m.vocab_size >= 8, "model.vocab_size", "must be >= 8")
    c(0.0 <= m.dropout < 1.0, "model.dropout", "must be in [0, 1)")


def _validate_data(cfg: ExperimentConfig, c) -> None:
    d, n_positions = cfg.data, cfg.model.n_positions
    c(2 <= d.seq_len <= n_positions, "data.seq_len", f"must be in [2, model.n_positions={n_positions}]")
    c(d.partition in ("natural", "dirichlet", "iid"), "data.partition", "must be natural, dirichlet or iid")
    c(d.partition != "dirichlet" or d.label_column is not None, "data.label_column",
      "dirichlet partitions need a label column")
    c(d.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    c(d.num_users is None or d.num_users >= 2, "data.num_users", "must be >= 2")
    c(0.0 <= d.public_fraction < 1.0, "data.public_fraction", "must be in [0, 1)")
    c(d.min_examples >= 1, "data.min_examples", "must be >= 1")
    c(d.max_examples is None or d.max_examples >= d.min_examples, "data.max_examples", "must be >= data.min_examples")
    c(d.examples_per_user >= 1, "data.examples_per_user", "must be >= 1")
    c(d.num_styles >= 1, "data.num_styles", "must be >= 1")
    c(d.eval_users >= 1, "data.eval_users", "must be >= 1")
    p = cfg.pretrain
    c(p.steps >= 0, "pretrain.steps", "must be >= 0")
    c(p.batch_size >= 1, "pretrain.batch_size", "must be >= 1")
    c(p.lr > 0, "pretrain.lr", "must be > 0")


def _validate_aggregation(cfg: ExperimentConfig, c) -> None:
    from raysim.aggregation.server_opt import SERVER_OPTIMIZERS

    g = cfg.aggregation
    c(g.server_optimizer in SERVER_OPTIMIZERS, "aggregation.server_optimizer", f"must be {SERVER_OPTIMIZERS.choices()}")
    c(g.server_lr > 0, "aggregation.server_lr", "must be > 0")
    c(0 <= g.beta1 < 1, "aggregation.beta1", "must be in [0, 1)")
    c(0 <= g.beta2 < 1, "aggregation.beta2", "must be in [0, 1)")
    c(g.tau > 0, "aggregation.tau", "must be > 0")


def _validate_private(cfg: ExperimentConfig, c) -> None:
    """Privacy, then what the methods and the LoRA rule ask of each other and of it."""
    from raysim.aggregation.lora import LORA_RULES

    _validate_privacy(cfg.privacy, cfg.cohort, c)
    c(not cfg.privacy.local.enabled or cfg.methods.output_loss == "softmax", "methods.output_loss",
      "local DP-SGD trains with the full softmax (privacy.local.enabled)")
    c(cfg.aggregation.lora in LORA_RULES, "aggregation.lora", f"must be {LORA_RULES.choices()}")
    for method in METHODS.values():  # what each per-device method asks of the rest of the config
        if (problem := method.check_all(getattr(cfg.methods, method.key), cfg)) is not None:
            c(False, *problem)
    dense = [name for name, rule in LORA_RULES.items() if rule.dense]
    space = cfg.privacy.noise_space
    c(space in (None, "dense", "factors"), "privacy.noise_space", "must be dense or factors (or null)")
    if space in ("dense", "factors") and cfg.aggregation.lora in LORA_RULES:
        factors = [name for name, rule in LORA_RULES.items() if not rule.dense]
        c((space == "dense") == LORA_RULES[cfg.aggregation.lora].dense, "privacy.noise_space",
          f"{space} needs aggregation.lora=" + (" or ".join(dense) if space == "dense" else
                                               " or ".join(factors) + " (ffa: exact, A frozen)")
          + f", not {cfg.aggregation.lora}")


def _validate_eval(cfg: ExperimentConfig, c) -> None:
    from raysim.emulation.costmodel import RECIPES

    c(cfg.eval.every >= 0, "eval.every", "must be >= 0")
    c(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    c(cfg.eval.max_examples >= 1, "eval.max_examples", "must be >= 1")
    c(cfg.eval.target_accuracy is None or 0 <= cfg.eval.target_accuracy <= 1, "eval.target_accuracy",
      "must be in [0, 1]")
    c(not cfg.eval.stop_at_target or (cfg.eval.target_accuracy is not None and cfg.eval.every > 0),
      "eval.stop_at_target", "needs eval.target_accuracy and eval.every > 0")
    c(cfg.checkpoint.every >= 0, "checkpoint.every", "must be >= 0")
    c(cfg.costs.recipe in RECIPES, "costs.recipe", f"must be {RECIPES.choices()}")


def _validate_ray(cfg: ExperimentConfig, c) -> None:
    r = cfg.ray
    c(r.num_actors is None or r.num_actors >= 1, "ray.num_actors", "must be >= 1")
    c(r.cpus_per_actor > 0, "ray.cpus_per_actor", "must be > 0")
    c(r.gpus_per_actor >= 0, "ray.gpus_per_actor", "must be >= 0")
    c(r.work_units >= 1, "ray.work_units", "must be >= 1")
    c(r.max_retries >= 0, "ray.max_retries", "must be >= 0")
    c(r.placement_timeout_s is None or r.placement_timeout_s > 0, "ray.placement_timeout_s", "must be > 0")
    c(r.tokens_per_pass >= 0, "ray.tokens_per_pass", "must be >= 0")


def _validate_methods(cfg: ExperimentConfig, c) -> None:
    """Each per-device method's values, then the method options."""
    from raysim.methods.quantize import GRANULARITY
    from raysim.methods.width import PRUNING
    from raysim.models.architectures import ARCHITECTURES

    methods, model = cfg.methods, cfg.model
    for method in METHODS.values():
        values = getattr(methods, method.key)
        c(len(values) >= 1, f"methods.{method.key}", "needs at least one value")
        for i, value in enumerate(values):
            if (problem := method.check(value, cfg)) is not None:
                c(False, f"methods.{method.key}[{i}]", problem)
    c(methods.lora_alpha_per_rank > 0, "methods.lora_alpha_per_rank", "must be > 0")
    c(methods.lora_target_modules is None or len(methods.lora_target_modules) >= 1, "methods.lora_target_modules",
      "needs at least one module (null: the family's default)")
    if model.path is None and model.family in ARCHITECTURES:  # with model.path, the folder's family decides
        from raysim.models.architectures import check_targets
        check_targets(ARCHITECTURES[model.family], methods.lora_target_modules, c)
    c(methods.pruning in PRUNING, "methods.pruning", f"must be {PRUNING.choices()}")
    c(methods.quantization in GRANULARITY, "methods.quantization", f"must be {GRANULARITY.choices()}")
    c(methods.embedding_rows is None or methods.embedding_rows >= 1, "methods.embedding_rows", "must be >= 1")
    selection = methods.embedding_selection
    c(selection is None or selection in EMBEDDING_SELECTIONS, "methods.embedding_selection",
      f"must be {' | '.join(EMBEDDING_SELECTIONS)} (or null)")
    c(methods.output_loss in OUTPUT_LOSSES, "methods.output_loss", f"must be {' | '.join(OUTPUT_LOSSES)}")
    c(methods.noise_samples >= 1, "methods.noise_samples", "must be >= 1")
    c(selection not in SERVER_SELECTIONS or methods.embedding_rows is not None,
      "methods.embedding_selection", f"{selection} needs methods.embedding_rows (the rows the server picks)")


def _validate_privacy(p: PrivacyConfig, cohort: CohortConfig, c) -> None:
    from raysim.privacy.accounting import ACCOUNTANTS
    from raysim.privacy.mechanisms import MECHANISMS

    c(p.mechanism is None or p.mechanism in MECHANISMS, "privacy.mechanism",
      f"must be {MECHANISMS.choices()} (or null)")
    c(p.mechanism is None or p.clip_norm is not None, "privacy.clip_norm", f"{p.mechanism} needs a clip norm")

    c(p.noise_multiplier >= 0, "privacy.noise_multiplier", "must be >= 0")
    c(p.clip_norm is None or p.clip_norm > 0, "privacy.clip_norm", "must be > 0 (or null: no central DP)")
    c(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)")
    c(p.accountant in ACCOUNTANTS, "privacy.accountant", f"must be {ACCOUNTANTS.choices()}")
    c(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon", "must be > 0")
    c(p.max_epsilon is None or p.max_epsilon > 0, "privacy.max_epsilon", "must be > 0")
    c(p.target_epsilon is None or p.noise_multiplier == 0, "privacy.target_epsilon",
      "set either privacy.noise_multiplier or privacy.target_epsilon (which calibrates it), not both")
    central = p.noise_multiplier > 0 or p.target_epsilon is not None or p.max_epsilon is not None
    c(not (central or p.adaptive_clipping.enabled) or p.clip_norm is not None, "privacy.clip_norm",
      "central DP (noise_multiplier, target_epsilon, max_epsilon, adaptive_clipping) needs a clip norm")
    c(p.clip_norm is None or cohort.sampling == "poisson", "cohort.sampling",
      "DP-FedAvg's accounting assumes Poisson sampling with q = cohort.size / population; "
      "set cohort.sampling=poisson (fixed-size cohorts have no accounting here)")
    a = p.adaptive_clipping
    c(0 < a.target_quantile < 1, "privacy.adaptive_clipping.target_quantile", "must be in (0, 1)")
    c(a.learning_rate > 0, "privacy.adaptive_clipping.learning_rate", "must be > 0")
    c(a.count_std is None or a.count_std > 0, "privacy.adaptive_clipping.count_std", "must be > 0")
    loc = p.local
    c(loc.noise_multiplier >= 0, "privacy.local.noise_multiplier", "must be >= 0")
    c(loc.clip_norm > 0, "privacy.local.clip_norm", "must be > 0")
    c(0 < loc.delta < 1, "privacy.local.delta", "must be in (0, 1)")


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Keys that cannot change a run's results: where it runs and writes, how often it checkpoints, progress bars,
# experiment tracking, a study's labels.
NOT_RESULTS = ("ray", "progress", "output_dir", "checkpoint", "tracking", "study_axes")


def result_keys(config: dict) -> dict:
    """A resolved config (as a plain dict) less what cannot change its results."""
    return {k: v for k, v in config.items() if k not in NOT_RESULTS}


def result_config(cfg: ExperimentConfig) -> dict:
    return result_keys(OmegaConf.to_container(OmegaConf.structured(cfg)))


def with_defaults(config: dict, defaults: dict | None = None) -> dict:
    """A stored resolved config (a run's ``config.yaml`` or checkpoint) with every key it lacks set to today's
    default: a key added to raysim later defaults to what runs did before it existed, so an old run is still
    the same run (``raysim compare`` and ``--resume`` compare configs)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(ExperimentConfig())) if defaults is None else defaults
    filled = dict(config)
    for key, value in defaults.items():
        if key not in filled:
            filled[key] = value
        elif isinstance(value, dict) and isinstance(filled[key], dict) and key != "study_axes":
            filled[key] = with_defaults(filled[key], value)
    return filled


def first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    """The dotted key of the first value that differs between two nested dicts (None: equal)."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            if (found := first_difference(x, y, f"{prefix}{key}.")) is not None:
                return found
        elif x != y:
            return f"{prefix}{key}"
    return None
