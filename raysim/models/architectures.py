"""Model families: where a decoder keeps its blocks, projections and embeddings, and how to cut it.

Every method that changes a device's model (LoRA targets, width pruning and
federated dropout, layer subsets, partial embeddings) works on the same few
facts about a family: the list of blocks, each block's projections with the
orientation of their weights, which of a projection's features belong to
which attention unit or MLP unit, and the token embedding. An
:class:`Architecture` states them once per family; :mod:`raysim.methods.submodel`
reads nothing else.

An attention *unit* is what width pruning keeps or drops whole. In GPT-2 it
is one head. In a Llama-style decoder with grouped-query attention it is one
key-value group: a key head, a value head and the ``n_head / n_kv_head``
query heads that read them (transformers' ``repeat_kv`` gives query head
``i`` the key-value head ``i // group``). A pruned model then keeps the group
size and stays a valid grouped-query model; without grouping a unit is a head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from raysim.errors import ConfigError
from raysim.methods.width import head_columns
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import ModelConfig

# What a projection's output or input features are indexed by, under width pruning
QUERY, KEY_VALUE, FUSED_QKV, MLP = "q", "kv", "qkv", "mlp"


@dataclass(frozen=True)
class Projection:
    kind: str  # module path inside a block, e.g. attn.c_attn or self_attn.q_proj
    out: str | None  # what its output features belong to (QUERY, KEY_VALUE, FUSED_QKV, MLP); None: the full width
    inp: str | None  # what its input features belong to, likewise


@dataclass(frozen=True)
class Sizes:
    """A model's sizes as the methods see them."""

    n_layer: int
    n_head: int  # query heads
    n_kv_head: int  # key-value heads: the attention units
    head_dim: int
    width: int  # the residual stream (hidden size)
    inner: int  # MLP hidden units
    vocab_size: int

    @property
    def group(self) -> int:
        """Query heads per attention unit."""
        return self.n_head // self.n_kv_head


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # transformers' model_type values this family reads (model.path)
    blocks: str  # the module list of decoder blocks
    embedding: str  # the token embedding's parameter
    projections: tuple[Projection, ...]  # every block's linear maps, in block order
    transposed: bool  # weights stored (in, out), as GPT-2's Conv1D; else (out, in), as nn.Linear
    default_lora: tuple[str, ...]  # methods.lora_target_modules when null: the attention's input projections
    config: Callable[[ModelConfig], PretrainedConfig]
    model_class: type
    sizes: Callable[[dict], Sizes]  # from a transformers config dict
    after_shrink: Callable[[nn.Module, int, Sizes], None]  # fix a block's attributes for ``units`` kept units

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(p.kind for p in self.projections)

    @property
    def lora_modules(self) -> tuple[str, ...]:
        """The module names ``methods.lora_target_modules`` may hold."""
        return tuple(dict.fromkeys(p.kind.rpartition(".")[2] for p in self.projections))

    def block(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def projection(self, kind: str) -> Projection:
        return next(p for p in self.projections if p.kind == kind)

    def index(self, kind: str, sizes: Sizes, slices) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(out, in) feature indices a projection keeps for one block's (units, MLP units); None: all."""
        if slices is None:
            return None, None
        units, mlp = slices
        p = self.projection(kind)
        return _features(p.out, units, mlp, sizes), _features(p.inp, units, mlp, sizes)

    def shrink(self, model: nn.Module, *, units: int, mlp: int, sizes: Sizes) -> None:
        """Replace every block's projections by narrower ones holding ``units`` attention units and ``mlp``
        MLP units (their values are loaded later, slice by slice)."""
        kept = (torch.arange(units), torch.arange(mlp))
        for layer in range(sizes.n_layer):
            block = model.get_submodule(self.block(layer))
            for p in self.projections:
                out_idx, in_idx = self.index(p.kind, sizes, kept)
                old = block.get_submodule(p.kind)
                out_f, in_f = features(old)
                out_f = out_f if out_idx is None else len(out_idx)
                in_f = in_f if in_idx is None else len(in_idx)
                owner, _, attr = p.kind.rpartition(".")
                if isinstance(old, Conv1D):
                    new = Conv1D(out_f, in_f)
                else:
                    new = nn.Linear(in_f, out_f, bias=old.bias is not None)
                setattr(block.get_submodule(owner), attr, new)
            self.after_shrink(block, units, sizes)


def _features(spec: str | None, units: torch.Tensor, mlp: torch.Tensor, s: Sizes) -> torch.Tensor | None:
    if spec is None:
        return None
    if spec == MLP:
        return mlp
    if spec == FUSED_QKV:  # GPT-2's c_attn stacks q, k and v, each n_head heads wide (no grouping)
        return head_columns(units, head_dim=s.head_dim, width=s.n_head * s.head_dim, parts=3)
    heads = units if spec == KEY_VALUE else (units.unsqueeze(1) * s.group + torch.arange(s.group)).reshape(-1)
    return head_columns(heads, head_dim=s.head_dim, width=0, parts=1)


def features(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) features of a projection (a Conv1D or Linear); None for any other module."""
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return None


ARCHITECTURES: Registry[Architecture] = Registry("model family")  # model.family names one


def _gpt2_config(cfg: ModelConfig) -> GPT2Config:
    return GPT2Config(
        n_layer=cfg.n_layer,
        n_embd=cfg.n_embd,
        n_head=cfg.n_head,
        n_inner=cfg.n_inner,
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=0,  # GPT-2's 50256 lies outside a small vocabulary
        eos_token_id=0,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _gpt2_sizes(c: dict) -> Sizes:
    return Sizes(n_layer=c["n_layer"], n_head=c["n_head"], n_kv_head=c["n_head"], head_dim=c["n_embd"] // c["n_head"],
                 width=c["n_embd"], inner=c.get("n_inner") or 4 * c["n_embd"], vocab_size=c["vocab_size"])


def _gpt2_after_shrink(block: nn.Module, units: int, sizes: Sizes) -> None:
    block.attn.split_size = units * sizes.head_dim
    block.attn.num_heads = units


ARCHITECTURES.register("gpt2")(Architecture(
    name="gpt2", model_types=("gpt2",), blocks="transformer.h", embedding="transformer.wte.weight",
    projections=(Projection("attn.c_attn", FUSED_QKV, None), Projection("attn.c_proj", None, QUERY),
                 Projection("mlp.c_fc", MLP, None), Projection("mlp.c_proj", None, MLP)),
    transposed=True, default_lora=("c_attn",), config=_gpt2_config, model_class=GPT2LMHeadModel,
    sizes=_gpt2_sizes, after_shrink=_gpt2_after_shrink,
))


def llama_inner(width: int) -> int:
    """Llama's MLP width for a residual width: ``8/3 · width`` rounded up to a multiple of 64 (Touvron et al.
    2023 round to 256 at their sizes; 64 keeps small models near 8/3)."""
    return -(-8 * width // 192) * 64


def _llama_config(cfg: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        num_hidden_layers=cfg.n_layer,
        hidden_size=cfg.n_embd,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        intermediate_size=cfg.n_inner or llama_inner(cfg.n_embd),
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.n_positions,
        attention_dropout=cfg.dropout,  # Llama has no residual or embedding dropout
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=cfg.tie_embeddings,
    )


def _llama_sizes(c: dict) -> Sizes:
    heads = c["num_attention_heads"]
    return Sizes(n_layer=c["num_hidden_layers"], n_head=heads, n_kv_head=c.get("num_key_value_heads") or heads,
                 head_dim=c.get("head_dim") or c["hidden_size"] // heads, width=c["hidden_size"],
                 inner=c["intermediate_size"], vocab_size=c["vocab_size"])


def _llama_after_shrink(block: nn.Module, units: int, sizes: Sizes) -> None:
    """Nothing: Llama's attention infers its head count from the projections' widths, and the group size stays."""


_LLAMA_PROJECTIONS = (
    Projection("self_attn.q_proj", QUERY, None), Projection("self_attn.k_proj", KEY_VALUE, None),
    Projection("self_attn.v_proj", KEY_VALUE, None), Projection("self_attn.o_proj", None, QUERY),
    Projection("mlp.gate_proj", MLP, None), Projection("mlp.up_proj", MLP, None),
    Projection("mlp.down_proj", None, MLP),
)
ARCHITECTURES.register("llama")(Architecture(
    name="llama", model_types=("llama", "mistral", "qwen2"), blocks="model.layers",
    embedding="model.embed_tokens.weight", projections=_LLAMA_PROJECTIONS, transposed=False,
    default_lora=("q_proj", "k_proj", "v_proj"), config=_llama_config, model_class=LlamaForCausalLM,
    sizes=_llama_sizes, after_shrink=_llama_after_shrink,
))


def check_targets(arch: Architecture, modules: list[str] | None, check: Callable[[bool, str, str], None]) -> None:
    """Every name of ``methods.lora_target_modules`` is one of the family's projections."""
    for i, name in enumerate(modules or ()):
        check(name in arch.lora_modules, f"methods.lora_target_modules[{i}]",
              f"{arch.name} has no projection {name!r} (it has {', '.join(arch.lora_modules)})")


def lora_targets(arch: Architecture, modules: list[str] | None) -> tuple[str, ...]:
    """The module names LoRA targets: ``methods.lora_target_modules``, or the family's default."""
    return tuple(modules) if modules else arch.default_lora


def of_model_type(model_type: str, *, folder: str | Path | None = None) -> Architecture:
    """The family that reads ``model_type``, or one ConfigError naming ``model.path`` and what is supported."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES.values() for t in a.model_types)
    raise ConfigError(f"model type {model_type!r} is not supported (supported: {supported})",
                      file=None if folder is None else str(folder), field="model.path")


def of_config(config: dict) -> Architecture:
    """The family of a transformers config dict (with model_type)."""
    return of_model_type(config["model_type"])
