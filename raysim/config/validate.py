"""Range checks the type system cannot express, one function per section, each failure one line.

Every float must be finite; names are checked against their registries; each per-device method checks its own
axis and what it asks of the rest of the config (:meth:`raysim.methods.base.Method.check`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from raysim.config.schema import CohortConfig, ExperimentConfig, PrivacyConfig
from raysim.config.synth import SOURCE_NAMES
from raysim.errors import ConfigError
from raysim.methods import METHODS


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
    elif isinstance(value, dict):
        for key, item in value.items():
            if (found := non_finite(item, f"{prefix}.{key}" if prefix else str(key))) is not None:
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
    for section in (_validate_run, _validate_model, _validate_emulators, _validate_data, _validate_methods,
                    _validate_aggregation, _validate_private, _validate_eval, _validate_ray):
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
    c(cfg.server.train_gflops > 0, "server.train_gflops", "must be > 0")
    _validate_split(cfg, c)


def _validate_split(cfg: ExperimentConfig, c) -> None:
    from raysim.split.mechanisms import MECHANISMS

    s = cfg.split
    c(s.mechanism in MECHANISMS, "split.mechanism", f"must be {MECHANISMS.choices()}")
    c(s.dcor_weight >= 0, "split.dcor_weight", "must be >= 0")
    c(s.adapter_sets >= 2, "split.adapter_sets", "must be >= 2 (P³EFT mixes several sets)")
    c(s.coefficient_std >= 0, "split.coefficient_std", "must be >= 0")
    c(s.adversary_weight >= 0, "split.adversary_weight", "must be >= 0")
    if s.mechanism == "p3eft":
        cuts = set(cfg.methods.split)
        c(len(cuts) == 1 and None not in cuts, "methods.split",
          "p3eft needs every device split at one cut (one non-null value): the adapter sets are mixed above it")


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


def _validate_emulators(cfg: ExperimentConfig, c) -> None:
    """Each named emulator's keys; its blocks against ``model.n_layer`` (with ``model.path``, against the folder's
    blocks when the run builds it)."""
    from raysim.offsite.layout import KINDS, layout

    for name, e in cfg.emulators.items():
        key = f"emulators.{name}"
        c(e.kind in KINDS, f"{key}.kind", f"must be {KINDS.choices()}")
        if cfg.model.path is None and (bad := layout(e, cfg.model.n_layer)[1]) is not None:
            c(False, f"{key}.{bad[0]}", bad[1])
        c(e.harmonizer_rank >= 1, f"{key}.harmonizer_rank", "must be >= 1")
        c(e.svd_fraction is None or 0.0 < e.svd_fraction <= 1.0, f"{key}.svd_fraction", "must be in (0, 1] or null")
        c(e.steps >= 1, f"{key}.steps", "must be >= 1")
        c(e.batch_size >= 1, f"{key}.batch_size", "must be >= 1")
        c(e.lr > 0, f"{key}.lr", "must be > 0")
        c(e.kd_weight >= 0, f"{key}.kd_weight", "must be >= 0")
        c(e.score_sequences >= 1, f"{key}.score_sequences", "must be >= 1")


def _validate_data(cfg: ExperimentConfig, c) -> None:
    from raysim.data.sources import PARTITIONS

    d, n_positions = cfg.data, cfg.model.n_positions
    c(2 <= d.seq_len <= n_positions, "data.seq_len", f"must be in [2, model.n_positions={n_positions}]")
    c(d.partition in PARTITIONS, "data.partition", f"must be {PARTITIONS.choices()}")
    c(d.partition != "dirichlet" or d.label_column is not None, "data.label_column",
      "dirichlet partitions need a label column")
    c(d.dirichlet_alpha > 0, "data.dirichlet_alpha", "must be > 0")
    c(d.task in ("lm", "classification"), "data.task", "must be lm or classification")
    if d.task == "classification":
        c(d.labels is not None and len(set(d.labels)) == len(d.labels) >= 2, "data.labels",
          "classification needs a list of at least 2 distinct label values, e.g. [comment, docstring]")
        c(d.source != "synthetic", "data.source", "synthetic data has no labels: classify python-docs or a file")
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
    _validate_sources(cfg, c)


def _validate_sources(cfg: ExperimentConfig, c) -> None:
    sources, s = cfg.pretrain.sources, cfg.synth
    if sources is None:
        return
    c(len(sources) >= 1, "pretrain.sources", "must list at least one source (null: the public split)")
    c(cfg.pretrain.steps > 0, "pretrain.sources", "pre-trains nothing with pretrain.steps=0")
    c(cfg.data.source != "synthetic", "pretrain.sources", "synthetic data has no text: use a text data.source")
    weighted = [src.weight is not None for src in sources]
    for i, src in enumerate(sources):
        key = f"pretrain.sources[{i}]"
        c(src.name in SOURCE_NAMES, f"{key}.name", f"must be one of {', '.join(SOURCE_NAMES)}")
        c(src.weight is None or src.weight > 0, f"{key}.weight", "must be > 0")
        c(all(weighted) or not any(weighted), f"{key}.weight", "give every source a weight, or none (pooled)")
        c((src.path is not None) == (src.name == "file"), f"{key}.path", "a file source needs a path; others none")
        c((src.run is not None) == (src.name == "refiltered"), f"{key}.run",
          "a refiltered source needs the run directory of a finished DP run; others none")
        c(src.name != "oracle" or cfg.data.public_fraction > 0, f"{key}.name",
          "oracle is the users data.public_fraction sets aside: set data.public_fraction > 0")
    g = s.generator
    c(g.n_layer >= 1 and g.n_head >= 1 and g.n_embd % g.n_head == 0, "synth.generator.n_head",
      "must divide synth.generator.n_embd (and n_layer >= 1)")
    c(g.vocab_size >= 258, "synth.generator.vocab_size", "must be >= 258 (byte-level BPE: 256 bytes and EOS)")
    c(g.seq_len >= 8, "synth.generator.seq_len", "must be >= 8")
    c(g.steps >= 1 and g.batch_size >= 1 and g.lr > 0, "synth.generator", "steps, batch_size and lr must be > 0")
    c(s.generated >= 1 and s.transformed >= 1, "synth.generated", "synth.generated and synth.transformed: >= 1")
    c(1 <= s.max_new_tokens < g.seq_len, "synth.max_new_tokens", "must be in [1, synth.generator.seq_len)")
    c(1 <= s.prefix_tokens <= g.seq_len - s.max_new_tokens, "synth.prefix_tokens",
      "must be in [1, synth.generator.seq_len - synth.max_new_tokens]")
    c(s.temperature > 0, "synth.temperature", "must be > 0")
    c(0 < s.top_p <= 1, "synth.top_p", "must be in (0, 1]")
    c(s.max_pool is None or s.max_pool >= 2, "synth.max_pool", "must be >= 2")
    c(s.domain_steps >= 1, "synth.domain_steps", "must be >= 1")
    c(0 < s.filter_fraction <= 1, "synth.filter_fraction", "must be in (0, 1]")
    c(0 < s.refilter_fraction <= 1, "synth.refilter_fraction", "must be in (0, 1]")


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
    from raysim.methods.embeddings import SELECTIONS
    from raysim.methods.output_loss import SAMPLED
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
    c(selection is None or selection in SELECTIONS, "methods.embedding_selection",
      f"must be {' | '.join(SELECTIONS)} (or null)")
    losses = ("softmax", *SAMPLED)  # the full softmax, or a sampled loss (raysim.methods.output_loss)
    c(methods.output_loss in losses, "methods.output_loss", f"must be {' | '.join(losses)}")
    c(methods.noise_samples >= 1, "methods.noise_samples", "must be >= 1")
    c(selection not in SELECTIONS or not SELECTIONS[selection].server or methods.embedding_rows is not None,
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

