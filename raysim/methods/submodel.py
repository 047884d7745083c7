"""A device's submodel, and the exact map between it and the global coordinates.

The aggregator holds the trainable state in full coordinates (:class:`Space`):
for every LoRA-targeted weight what the run's LoRA rule holds
(:mod:`raysim.aggregation.lora`: the dense product ``ΔW``, which devices at
rank 0 train directly, or the adapter factors at the largest rank), plus the
token embedding when some device may train partial embeddings (the output embedding, the head, where the
model does not tie them: ``model.tie_embeddings``). A :class:`DeviceConfig` determines a
:class:`Structure` (the shapes: rank, kept heads and MLP units, trained
blocks, embeddings), built once per actor and reused, and per device and
round the :class:`Slices` of units it holds. :class:`Submodel` copies the
device's view of the global state in and maps its trained, encoded update
back to full coordinates with the mask of what it held.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PreTrainedModel

from raysim import rng
from raysim.aggregation.lora import LORA_RULES, LoraRule
from raysim.architectures import ARCHITECTURES, Architecture, Sizes, check_targets, features, lora_targets
from raysim.config import ExperimentConfig
from raysim.errors import ConfigError
from raysim.fastops import fuse_activations
from raysim.grouped import install_keyed_dropout, stackable
from raysim.methods import layers, quantize, width
from raysim.methods.lora import Target, lora_init
from raysim.methods.width import PRUNING
from raysim.models import BaseModel, add_lora, instantiate
from raysim.types import DeviceConfig

Tensors = dict[str, torch.Tensor]
EMBEDDING = ARCHITECTURES["gpt2"].embedding  # GPT-2's token embedding, tied to its output head
OUTPUT_EMBEDDING = "lm_head.weight"  # the head, where it is its own matrix (every family's name)


@dataclass(frozen=True)
class Structure:
    """What a submodel's shapes depend on: the cache key on an actor."""

    lora_rank: int
    heads: int  # attention units kept per block (heads; key-value groups under grouped-query attention)
    mlp: int  # MLP hidden units kept per block
    blocks: tuple[int, ...]  # blocks trained
    embeddings: bool


# per block (attention units, MLP units); None: full width
Slices = tuple[tuple[torch.Tensor, torch.Tensor], ...] | None


@dataclass(frozen=True)
class Space:
    """The global coordinate system the aggregator holds, and its sizes."""

    targets: tuple[Target, ...]
    lora: str  # the LoRA rule's name (aggregation.lora)
    max_rank: int
    scale: float  # LoRA alpha / rank
    embeddings: bool
    family: str  # the model family (raysim.architectures)
    sizes: Sizes
    embedding: str  # the embedding partial-embedding devices train: the tied table or the head

    @classmethod
    def build(cls, cfg: ExperimentConfig, base: BaseModel) -> Space:
        arch, sizes = base.architecture, base.sizes
        modules = cfg.methods.lora_target_modules
        if cfg.model.path:  # the folder's family decides what its projections are called
            def check(ok: bool, key: str, message: str) -> None:
                if not ok:
                    raise ConfigError(message, file=cfg.model.path, field=key)
            check_targets(arch, modules, check)
        suffixes = lora_targets(arch, modules)
        targets = []
        for name, module in instantiate(base).named_modules():
            match = re.fullmatch(rf"{re.escape(arch.blocks)}\.(\d+)\.(.+)", name)
            shape = features(module)
            if match and shape and match[2] in arch.kinds and name.split(".")[-1] in suffixes:
                targets.append(Target(name, int(match[1]), match[2], *shape))
        tied = base.config.get("tie_word_embeddings", True)
        return cls(targets=tuple(targets), lora=cfg.aggregation.lora, max_rank=max(cfg.methods.lora_rank),
                   scale=cfg.methods.lora_alpha_per_rank, embeddings=any(cfg.methods.partial_embeddings),
                   family=arch.name, sizes=sizes, embedding=arch.embedding if tied else OUTPUT_EMBEDDING)

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.family]

    @property
    def n_layer(self) -> int:
        return self.sizes.n_layer

    @property
    def units(self) -> int:
        """Attention units per block: what width pruning keeps or drops whole."""
        return self.sizes.n_kv_head

    @property
    def inner(self) -> int:
        return self.sizes.inner

    @property
    def vocab_size(self) -> int:
        return self.sizes.vocab_size

    @property
    def rule(self) -> LoraRule:
        return LORA_RULES[self.lora]

    def initial_state(self, base: BaseModel, *, seed: int) -> Tensors:
        """Every target's entries as the LoRA rule starts them, and the embedding where devices may train it."""
        state = {}
        for t in self.targets:
            state |= self.rule.initial_state(t, max_rank=self.max_rank, seed=seed)
        if self.embeddings:
            state[self.embedding] = base.state[self.embedding].clone()
        return state

    def merged(self, state: Tensors, target: Target) -> torch.Tensor:
        """The full ``ΔW`` the global state gives ``target``."""
        return self.rule.merged(state, target, scale=self.scale)

    def truncation_error(self, state: Tensors, *, rank: int) -> float:
        """Relative error ``‖ΔW - ΔW_r‖_F / ‖ΔW‖_F`` of the start a rank-``rank`` device gets."""
        return self.rule.truncation_error(state, self.targets, rank=rank, scale=self.scale)

    def support(self, configs: list[DeviceConfig], state: Tensors, *, pruning: str, round: int,
                embedding_rows: torch.Tensor | None = None) -> Tensors:
        """Per state entry, a bool mask of the coordinates that some device of ``configs`` can change in ``round``.

        The union of what the configs' submodels hold: their trained blocks, their width (the pruning window of
        the round; federated dropout keeps a random part of it, so the whole window), their LoRA rank in the
        rule's coordinates, and for partial embeddings the server's ``embedding_rows`` of the round, or else the
        whole embedding (any row may be one a device saw).
        Entries no config reaches are all False: an update never touches them.
        """
        masks = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in state.items()}
        for config in dict.fromkeys(configs):
            structure = self.structure(config)
            slices = self.slices(replace(config, dropout_rate=0.0), pruning=pruning, seed=0, round=round, device_id=0)
            for t in self.targets:
                if t.layer not in structure.blocks:
                    continue
                out_idx, in_idx = self.index(t.kind, slices, t.layer)
                pieces = ([(f"{t.name}.delta", out_idx, in_idx)] if config.lora_rank == 0 else
                          self.rule.support(t, rank=config.lora_rank, rows=out_idx, cols=in_idx))
                for key, rows, cols in pieces:
                    mask = masks[key]
                    mask[(slice(None) if rows is None else rows.unsqueeze(1),
                          slice(None) if cols is None else cols)] = True
            if config.partial_embeddings:
                masks[self.embedding][slice(None) if embedding_rows is None else embedding_rows] = True
        return masks

    def structure(self, config: DeviceConfig) -> Structure:
        heads = width.kept(width.kept(self.units, config.prune_ratio), config.dropout_rate)
        mlp = width.kept(width.kept(self.inner, config.prune_ratio), config.dropout_rate)
        return Structure(lora_rank=config.lora_rank, heads=heads, mlp=mlp,
                         blocks=layers.trained_blocks(self.n_layer, config.trainable_layers),
                         embeddings=config.partial_embeddings)

    def slices(self, config: DeviceConfig, *, pruning: str, seed: int, round: int, device_id: int) -> Slices:
        """The heads and MLP units each block of the device's submodel holds this round."""
        if config.prune_ratio == 0 and config.dropout_rate == 0:
            return None
        out = []
        for layer in range(self.n_layer):
            kept = []
            for part, total in (("heads", self.units), ("mlp", self.inner)):
                units = PRUNING[pruning].units(total, config.prune_ratio, round=round)
                if config.dropout_rate > 0:
                    g = rng.generator(seed, "federated-dropout", round, device_id, layer, part)
                    units = width.dropout(units, config.dropout_rate, generator=g)
                kept.append(units)
            out.append(tuple(kept))
        return tuple(out)

    def index(self, kind: str, slices: Slices, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(out, in) feature indices a block's projection keeps (None: all)."""
        return self.arch.index(kind, self.sizes, None if slices is None else slices[layer])

    def projections(self) -> list[tuple[str, int, str]]:
        """(module name, block, kind) of every block's projections."""
        return [(f"{self.arch.block(layer)}.{kind}", layer, kind)
                for layer in range(self.n_layer) for kind in self.arch.kinds]

    def oriented(self, w: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight in the orientation the family's modules store it, or a module's weight (or its
        gradient) in (out, in): either way one transpose where the modules store (in, out), its own inverse."""
        return w.T if self.arch.transposed else w

    def extract_weight(self, w: torch.Tensor, out_idx: torch.Tensor | None,
                       in_idx: torch.Tensor | None) -> torch.Tensor:
        """A module-oriented weight sliced to (out, in) indices, in module orientation."""
        if self.arch.transposed:
            return width.extract(w, rows=in_idx, cols=out_idx)
        return width.extract(w, rows=out_idx, cols=in_idx)


@dataclass
class Support:
    """What some config of a run's method space can change, round by round (:meth:`Space.support`): where central
    DP's noise goes. Computed once unless a pruning window rolls."""

    space: Space
    configs: tuple[DeviceConfig, ...]
    pruning: str
    embedding_rows: Callable[..., torch.Tensor] | None = None  # (round=) the server's rows, if it picks them
    _cached: Tensors | None = None

    def masks(self, state: Tensors, *, round: int) -> Tensors:
        rolls = PRUNING[self.pruning].rolls and any(c.prune_ratio > 0 for c in self.configs)
        if self._cached is None or rolls or self.embedding_rows is not None:
            rows = None if self.embedding_rows is None else self.embedding_rows(round=round)
            self._cached = self.space.support(list(self.configs), state, pruning=self.pruning, round=round,
                                              embedding_rows=rows)
        return self._cached

    def count(self, state: Tensors, *, round: int = 1) -> int:
        """How many coordinates that is (the same every round: a rolling window keeps its size)."""
        return sum(int(m.sum()) for m in self.masks(state, round=round).values())


def _slices_key(slices: Slices) -> tuple | None:
    return None if slices is None else tuple((tuple(h.tolist()), tuple(m.tolist())) for h, m in slices)


@dataclass(frozen=True)
class Encoding:
    """How a device's update travels: bit-width, per row or per tensor, fixed embedding rows."""

    bits: int
    per_row: bool
    embedding_rows: int | None
    row_indices: bool = True  # embedding rows travel with their int32 indices (device_seen); the server's do not


def build_model(*, space: Space, structure: Structure, base: BaseModel, cfg: ExperimentConfig) -> PreTrainedModel:
    """The Hugging Face model of ``structure`` as transformers and peft build it: narrowed to its width, peft
    LoRA (or the targeted weights themselves) trainable in its blocks, and the embedding where it trains.

    Nothing of raysim's own computing is in it: the cost model measures it as it is
    (:mod:`raysim.costmodel`), and :class:`Submodel` adds keyed dropout and the speed-ups on top.
    """
    model = instantiate(base)
    if structure.heads < space.units or structure.mlp < space.inner:
        space.arch.shrink(model, units=structure.heads, mlp=structure.mlp, sizes=space.sizes)
    trained = [t for t in space.targets if t.layer in structure.blocks]
    if structure.lora_rank > 0 and trained:
        model = add_lora(model, rank=structure.lora_rank, methods=cfg.methods, seed=cfg.seed,
                         modules=[t.name for t in trained]).get_base_model()
    else:
        model.requires_grad_(False)
        for t in trained:
            model.get_submodule(t.name).weight.requires_grad_(True)
    for name, p in model.named_parameters():  # factors the LoRA rule holds fixed (ffa's A) do not train
        if any(f".{factor}." in name for factor in space.rule.frozen):
            p.requires_grad_(False)
    if structure.embeddings:
        model.get_parameter(space.embedding).requires_grad_(True)
    return model


class Submodel:
    """One structure's real model on an actor; devices of that structure load into it in turn."""

    def __init__(self, *, space: Space, structure: Structure, base: BaseModel, cfg: ExperimentConfig,
                 device: torch.device):
        self.space, self.structure, self.base = space, structure, base
        model = build_model(space=space, structure=structure, base=base, cfg=cfg)
        self.trained = [t for t in space.targets if t.layer in structure.blocks]
        install_keyed_dropout(model)
        if cfg.speedups.fused_activations:
            fuse_activations(model)
        self.lm = model.to(device)
        self.device = device
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # devices can share a pass; not with partial embeddings (each device's rows, one row mask per pass)
        self.stackable = bool(self.params) and not structure.embeddings and stackable(model, list(self.params))
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay, fused=True) if self.params else None
        self._loaded: tuple | None = None
        self._fallback = {t.name: lora_init(t, rank=space.max_rank, seed=cfg.seed) for t in self.trained}

    def projection(self, name: str) -> nn.Module:
        """A block's projection (a Conv1D or Linear), under its LoRA wrapper if it has one."""
        module = self.lm.get_submodule(name)
        return getattr(module, "base_layer", module)

    def load_frozen(self, state: Tensors, slices: Slices, *, version: object) -> None:
        """Base weights (sliced to the device's width), with the global ``ΔW`` merged where not trained.

        Reloads only when the state's ``version`` (the round) or the slices change.
        """
        key = (version, _slices_key(slices))
        if key == self._loaded:
            return
        targets = {t.name: t for t in self.space.targets}
        trained = {t.name for t in self.trained}
        space = self.space
        with torch.no_grad():
            for name, layer, kind in space.projections():
                out_idx, in_idx = space.index(kind, slices, layer)
                module = self.projection(name)
                w = space.extract_weight(self.base.state[f"{name}.weight"], out_idx, in_idx)
                if name in targets and name not in trained:
                    delta = space.merged(state, targets[name]).to(w.device)
                    w = w + space.oriented(width.extract(delta, rows=out_idx, cols=in_idx))
                module.weight.copy_(w)
                if module.bias is not None:
                    bias = self.base.state[f"{name}.bias"]
                    module.bias.copy_(bias if out_idx is None else bias[out_idx])
            if self.space.embedding in state:
                self.lm.get_parameter(self.space.embedding).copy_(state[self.space.embedding])
        self._loaded = key

    def width_bytes(self) -> int:
        """Bytes of the frozen projections a width-sliced submodel holds (what it must download when they change)."""
        return sum(4 * sum(p.numel() for p in self.projection(name).parameters(recurse=False))
                   for name, _, _ in self.space.projections())

    def initial(self, state: Tensors, slices: Slices, cache: dict) -> Tensors:
        """The device's starting trainable tensors, by parameter name.

        ``cache`` is the round's: what the LoRA rule computes once per view (FlexLoRA's SVD).
        """
        r, out = self.structure.lora_rank, {}
        for t in self.trained:
            out_idx, in_idx = self.space.index(t.kind, slices, t.layer)
            if r == 0:
                w0 = self.space.extract_weight(self.base.state[f"{t.name}.weight"], out_idx, in_idx)
                delta = width.extract(state[f"{t.name}.delta"], rows=out_idx, cols=in_idx)
                out[f"{t.name}.weight"] = w0.to(delta.device) + self.space.oriented(delta)
                continue
            a, b = self.space.rule.start(state, t, rank=r, rows=out_idx, cols=in_idx, fallback_A=self._fallback[t.name],
                                         cache=cache, scale=self.space.scale)
            out[f"{t.name}.lora_A.default.weight"] = a
            out[f"{t.name}.lora_B.default.weight"] = b
        if self.structure.embeddings:
            out[self.space.embedding] = state[self.space.embedding]
        return out

    def load_fixed(self, initial: Tensors) -> None:
        """The starting tensors that do not train (a rule's frozen factors), copied into the model."""
        with torch.no_grad():
            for name, value in initial.items():
                if name not in self.params:
                    self.lm.get_parameter(name).copy_(value)

    def encode(self, update: Tensors, *, rows: torch.Tensor | None, encoding: Encoding,
               generator: torch.Generator) -> tuple[Tensors, int]:
        """The update as the device sends it, decoded, and the payload's bytes.

        Embedding updates travel as the ``rows`` sent, plus their int32 indices unless the server chose them.
        """
        if rows is not None:
            e = self.space.embedding
            update = {**update, e: update[e].index_select(0, rows.to(update[e].device))}
        nbytes = 0 if rows is None or not encoding.row_indices else 4 * len(rows)
        if encoding.bits == quantize.UNQUANTIZED:
            return update, nbytes + sum(4 * u.numel() for u in update.values())
        decoded = {}
        for name, u in update.items():
            e = quantize.encode(u, bits=encoding.bits, per_row=encoding.per_row, generator=generator)
            decoded[name] = quantize.decode(e).to(u.device)
            nbytes += e.nbytes
        return decoded, nbytes

    def to_global(self, initial: Tensors, update: Tensors, state: Tensors, slices: Slices,
                  *, rows: torch.Tensor | None) -> tuple[Tensors, Tensors]:
        """A decoded device update in full coordinates, and the masks of what it held."""
        out, held = {}, {}

        def put(key: str, sub: torch.Tensor, *, r=None, c=None, mask=True) -> None:
            if r is None and c is None:
                out[key] = sub
                return
            out[key], m = width.scatter(sub, shape=tuple(state[key].shape), rows=r, cols=c)
            if mask:
                held[key] = m

        rank = self.structure.lora_rank
        for t in self.trained:
            out_idx, in_idx = self.space.index(t.kind, slices, t.layer)
            if rank == 0:
                put(f"{t.name}.delta", self.space.oriented(update[f"{t.name}.weight"]), r=out_idx, c=in_idx)
                continue
            na, nb = f"{t.name}.lora_A.default.weight", f"{t.name}.lora_B.default.weight"
            pieces = self.space.rule.update(t, start=(initial[na], initial[nb]), delta=(update.get(na), update[nb]),
                                            state=state, rows=out_idx, cols=in_idx, scale=self.space.scale,
                                            max_rank=self.space.max_rank)
            for key, sub, r, c in pieces:
                put(key, sub, r=r, c=c)
        if self.structure.embeddings:
            e = self.space.embedding
            put(e, update[e], r=rows.to(update[e].device))
        return out, held

