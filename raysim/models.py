"""Models: a Hugging Face causal LM with peft LoRA adapters.

The base model is built once per actor from (config, seed), so every actor
holds bit-identical frozen weights without shipping them. The *trainable
state* is the ordered dict of the adapter's parameters: it is what travels to
devices, what devices update and what the aggregator averages.
"""

from __future__ import annotations

import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from raysim import rng
from raysim.config import MethodsConfig, ModelConfig

hf_logging.set_verbosity_error()
# peft probes a deprecated transformers attribute on every wrap; not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def build_base_model(cfg: ModelConfig, *, seed: int) -> GPT2LMHeadModel:
    """A GPT-2-family causal LM initialised from (config, seed)."""
    config = GPT2Config(
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        n_head=cfg.n_head,
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=0,  # GPT-2's 50256 lies outside a small vocabulary
        eos_token_id=0,
    )
    torch.manual_seed(rng.torch_seed(seed, "model", "init"))
    return GPT2LMHeadModel(config)


def add_lora(model: torch.nn.Module, *, rank: int, methods: MethodsConfig) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA at ``rank`` on the configured modules."""
    lora = LoraConfig(
        r=rank,
        lora_alpha=methods.lora_alpha_per_rank * rank,
        target_modules=list(methods.lora_target_modules),
        lora_dropout=0.0,
        fan_in_fan_out=True,  # GPT-2's Conv1D stores weights as (in, out)
        bias="none",
    )
    return get_peft_model(model, lora)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (views, not copies)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
