"""Models: a Hugging Face causal LM, its starting weights, and peft LoRA adapters.

A :class:`BaseModel` is what every actor starts from: the model's config and
its weights (initial, pretrained by :mod:`raysim.models.pretrain`, or loaded from a
local folder). The driver builds it once and ships it through the object
store, so every actor holds bit-identical frozen weights and no node needs
the cache or the folder. The *trainable state* is the ordered dict of the
adapter's parameters: what travels to devices, what devices update and what
the aggregator averages.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from raysim import rng
from raysim.config import MethodsConfig, ModelConfig
from raysim.errors import ConfigError
from raysim.models.architectures import ARCHITECTURES, Architecture, Sizes, lora_targets, of_config, of_model_type

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()  # loading a model.path folder draws no bars over the run's own
# peft probes a deprecated transformers attribute on every wrap; not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass(frozen=True)
class BaseModel:
    config: dict  # a transformers config as a dict (with model_type)
    state: dict[str, torch.Tensor]
    origin: str  # "init", "pretrained <key>", or the folder it came from
    # offsite-tuning emulators the model owner built from these weights, by name (raysim.offsite.build)
    emulators: dict = field(default_factory=dict)
    # pretrain.sources: what each source gave pre-training and how synth made it (summary.json "synth")
    pretrained_on: dict | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def n_positions(self) -> int:
        return int(self.config.get("n_positions") or self.config.get("max_position_embeddings"))

    @property
    def architecture(self) -> Architecture:
        return of_config(self.config)

    @property
    def sizes(self) -> Sizes:
        return self.architecture.sizes(self.config)


def folder_config(path: str | Path) -> dict:
    """The ``config.json`` of a Hugging Face model folder (``model.path``), checked to be a family raysim
    handles; one ConfigError naming the folder otherwise."""
    folder = Path(path).expanduser()
    file = folder / "config.json"
    if not file.is_file():
        raise ConfigError("not a Hugging Face model folder (no config.json)", file=str(folder), field="model.path")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read config.json: {err}", file=str(file), field="model.path") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError("config.json names no model_type", file=str(file), field="model.path")
    of_model_type(config["model_type"], folder=folder)
    return config


def folder_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer a model folder ships (``tokenizer.json``), if any."""
    file = Path(path).expanduser() / "tokenizer.json"
    return file if file.is_file() else None


def model_vocab_size(cfg: ModelConfig) -> int:
    """The vocabulary the run's model has: the folder's with ``model.path``, else ``model.vocab_size``."""
    return int(folder_config(cfg.path)["vocab_size"]) if cfg.path else cfg.vocab_size


def base_seed(cfg: ModelConfig, *, seed: int) -> int:
    """The seed of the base model's initialisation and pre-training: ``model.seed``, else the run's."""
    return seed if cfg.seed is None else cfg.seed


def initial_base_model(cfg: ModelConfig, *, seed: int) -> BaseModel:
    """A model of ``model.family`` initialised from (config, ``base_seed``), or loaded from ``model.path``."""
    if cfg.path:
        folder = Path(cfg.path).expanduser()
        folder_config(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
        return BaseModel(config=model.config.to_dict(), state=model.state_dict(), origin=str(folder))
    arch = ARCHITECTURES[cfg.family]
    torch.manual_seed(rng.torch_seed(base_seed(cfg, seed=seed), "model", "init"))
    model = arch.model_class(arch.config(cfg))
    return BaseModel(config=model.config.to_dict(), state=model.state_dict(), origin="init")


def instantiate(base: BaseModel) -> PreTrainedModel:
    """The model a BaseModel describes, with its weights."""
    config = dict(base.config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    model.load_state_dict(base.state)
    model.config.use_cache = False  # training and evaluation never decode: no KV cache to build
    return model


def add_lora(model: PreTrainedModel, *, rank: int, methods: MethodsConfig, seed: int,
             modules: list[str] | None = None) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA at ``rank`` on ``modules`` (default: the configured ones)."""
    arch = of_model_type(model.config.model_type)
    lora = LoraConfig(
        r=rank,
        lora_alpha=methods.lora_alpha_per_rank * rank,
        target_modules=list(modules or lora_targets(arch, methods.lora_target_modules)),
        lora_dropout=0.0,
        fan_in_fan_out=arch.transposed,  # GPT-2's Conv1D stores weights as (in, out)
        bias="none",
    )
    torch.manual_seed(rng.torch_seed(seed, "lora", rank))  # the same adapter init on every actor
    return get_peft_model(model, lora)
