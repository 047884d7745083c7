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

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from raysim.aggregation.lora import LORA_RULES, LoraRule
from raysim.config import ExperimentConfig
from raysim.errors import ConfigError
from raysim.methods import adapter, embedding_updates, quantize, width
from raysim.methods.base import structure_fields
from raysim.methods.family import AdapterFamily
from raysim.methods.lora import Target
from raysim.methods.rank import max_rank
from raysim.methods.width import Slices
from raysim.models.architectures import ARCHITECTURES, Architecture, Sizes, check_targets, features, lora_targets
from raysim.models.build import BaseModel, instantiate
from raysim.models.fastops import fuse_activations
from raysim.models.grouped import install_keyed_dropout, stackable
from raysim.types import DeviceConfig

Tensors = dict[str, torch.Tensor]
OUTPUT_EMBEDDING = "lm_head.weight"  # the head, where it is its own matrix (every family's name)


@dataclass(frozen=True)
class Structure:
    """What a submodel's shapes depend on: the cache key on an actor."""

    rank: int  # the LoRA rank (0: the targeted weights themselves)
    heads: int  # attention units kept per block (heads; key-value groups under grouped-query attention)
    mlp: int  # MLP hidden units kept per block
    blocks: tuple[int, ...]  # blocks trained
    embeddings: bool
    adapter: str = "lora"  # the adapter family trained in them (raysim.methods.adapter)


@dataclass(frozen=True)
class Space:
    """The global coordinate system the aggregator holds, and its sizes."""

    targets: tuple[Target, ...]
    lora: str  # the LoRA rule's name (aggregation.lora)
    max_rank: int
    scale: float  # LoRA alpha / rank
    embeddings: bool
    family: str  # the model family (raysim.models.architectures)
    sizes: Sizes
    embedding: str  # the embedding partial-embedding devices train: the tied table or the head
    adapters: tuple[str, ...] = ("lora",)  # the adapter families of the method space, in the order they compose
    projection_targets: tuple[Target, ...] = ()  # every projection of every block: what adapter families target

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
        projections = []
        for name, module in instantiate(base).named_modules():
            match = re.fullmatch(rf"{re.escape(arch.blocks)}\.(\d+)\.(.+)", name)
            shape = features(module)
            if match and shape and match[2] in arch.kinds:
                projections.append(Target(name, int(match[1]), match[2], *shape))
        tied = base.config.get("tie_word_embeddings", True)
        return cls(targets=tuple(t for t in projections if t.name.split(".")[-1] in suffixes),
                   lora=cfg.aggregation.lora, max_rank=max_rank(cfg.methods), scale=cfg.methods.lora_alpha_per_rank,
                   embeddings=embedding_updates.any_trained(cfg.methods), family=arch.name, sizes=sizes,
                   embedding=arch.embedding if tied else OUTPUT_EMBEDDING, adapters=adapter.listed(cfg.methods),
                   projection_targets=tuple(projections))

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

    def families(self) -> list[tuple[str, AdapterFamily]]:
        """The method space's adapter families, by name, in the order their states compose."""
        return [(name, adapter.family(name)) for name in self.adapters]

    def initial_state(self, base: BaseModel, *, seed: int) -> Tensors:
        """Every adapter family's entries before round 1, and the embedding where devices may train it."""
        state = {}
        for _, fam in self.families():
            state |= fam.initial_state(self, base, seed=seed)
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
            slices = self.slices(config, pruning=pruning, seed=0, round=round, device_id=0, with_dropout=False)
            fam = adapter.family(structure.adapter)
            for t in fam.targets(self):
                if t.layer not in structure.blocks:
                    continue
                out_idx, in_idx = self.index(t.kind, slices, t.layer)
                for key, rows, cols in fam.support(self, structure, t, out_idx, in_idx):
                    every = slice(None)
                    if masks[key].dim() == 1:  # a vector: its one axis is ``rows``
                        masks[key][every if rows is None else rows] = True
                    else:
                        masks[key][every if rows is None else rows.unsqueeze(1), every if cols is None else cols] = True
            if structure.embeddings:
                masks[self.embedding][slice(None) if embedding_rows is None else embedding_rows] = True
        return masks

    def structure(self, config: DeviceConfig) -> Structure:
        """The shapes of ``config``'s submodel, as its methods set them (raysim.methods.base)."""
        full = dict(rank=0, heads=self.units, mlp=self.inner, blocks=tuple(range(self.n_layer)), embeddings=False,
                    adapter=self.adapters[0])
        return Structure(**structure_fields(config, self, full))

    def slices(self, config: DeviceConfig, *, pruning: str, seed: int, round: int, device_id: int,
               with_dropout: bool = True) -> Slices:
        """The heads and MLP units each block of the device's submodel holds this round (:func:`width.slices`)."""
        return width.slices(config, n_layer=self.n_layer, units=self.units, inner=self.inner, pruning=pruning,
                            seed=seed, round=round, device_id=device_id, with_dropout=with_dropout)

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
        if self._cached is None or width.rolls(self.configs, self.pruning) or self.embedding_rows is not None:
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
    """The Hugging Face model of ``structure`` as transformers and peft build it: narrowed to its width, its
    adapter family's parameters (peft's) trainable in its blocks, and the embedding where it trains.

    Nothing of raysim's own computing is in it: the cost model measures it as it is
    (:mod:`raysim.emulation.costmodel`), and :class:`Submodel` adds keyed dropout and the speed-ups on top.
    """
    model = instantiate(base)
    if structure.heads < space.units or structure.mlp < space.inner:
        space.arch.shrink(model, units=structure.heads, mlp=structure.mlp, sizes=space.sizes)
    fam = adapter.family(structure.adapter)
    trained = [t for t in fam.targets(space) if t.layer in structure.blocks]
    model = fam.build(model, space=space, structure=structure, trained=trained, cfg=cfg)
    if structure.embeddings:
        model.get_parameter(space.embedding).requires_grad_(True)
    return model


class Submodel:
    """One structure's real model on an actor; devices of that structure load into it in turn."""

    def __init__(self, *, space: Space, structure: Structure, base: BaseModel, cfg: ExperimentConfig,
                 device: torch.device):
        self.space, self.structure, self.base, self.seed = space, structure, base, cfg.seed
        model = build_model(space=space, structure=structure, base=base, cfg=cfg)
        self.family = adapter.family(structure.adapter)
        self.trained = [t for t in self.family.targets(space) if t.layer in structure.blocks]
        self._trained_names = {t.name for t in self.trained}
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
        # every family's targets by name, in composition order; the device's own family trains its targets
        self._families = [(name, fam, {t.name: t for t in fam.targets(space)}) for name, fam in space.families()]
        # families applied around the one the device trains rescale its trained projections: fixed per round
        self._scales: dict[str, tuple[str, torch.Tensor]] = {}
        self._hook_rescaling()

    def _hook_rescaling(self) -> None:
        """Hooks that rescale a trained projection's input or output by a family applied around the device's."""
        adapters, own = self.space.adapters, self.structure.adapter
        after = adapters[adapters.index(own) + 1:] if own in adapters else ()
        around = {name for family_name, _, targets in self._families if family_name in after for name in targets}
        for t in self.trained:
            if t.name not in around:
                continue
            module = self.lm.get_submodule(t.name)
            module.register_forward_pre_hook(functools.partial(_rescale_input, self._scales, t.name))
            module.register_forward_hook(functools.partial(_rescale_output, self._scales, t.name))

    def projection(self, name: str) -> nn.Module:
        """A block's projection (a Conv1D or Linear), under its LoRA wrapper if it has one."""
        module = self.lm.get_submodule(name)
        return getattr(module, "base_layer", module)

    def load_frozen(self, state: Tensors, slices: Slices, *, version: object) -> None:
        """Base weights (sliced to the device's width) with every adapter family's global state applied, but on
        the projections the device trains: there the families before its own are merged into the frozen weight,
        and those after it rescale the trained projection (:meth:`_hook_rescaling`).

        Reloads only when the state's ``version`` (the round) or the slices change.
        """
        key = (version, _slices_key(slices))
        if key == self._loaded:
            return
        space = self.space
        with torch.no_grad():
            for name, layer, kind in space.projections():
                out_idx, in_idx = space.index(kind, slices, layer)
                module = self.projection(name)
                w, b = self.frozen_weights(state, name, out_idx, in_idx)
                module.weight.copy_(w)
                if b is not None:
                    module.bias.copy_(b)
            if self.space.embedding in state:
                self.lm.get_parameter(self.space.embedding).copy_(state[self.space.embedding])
        self._loaded = key

    def adapted(self, name: str) -> bool:
        """Whether some adapter family of the method space targets the projection ``name``."""
        return any(name in targets for _, _, targets in self._families)

    def frozen_weights(self, state: Tensors, name: str, out_idx: torch.Tensor | None,
                       in_idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A projection's frozen weight (module orientation) and bias, sliced, with the families' state applied
        (see :meth:`load_frozen`); records the rescaling of a trained projection. Differentiable in ``state``."""
        own, trained = self.structure.adapter, name in self._trained_names
        w = self.space.extract_weight(self.base.state[f"{name}.weight"], out_idx, in_idx)
        b = self.base.state.get(f"{name}.bias")
        b = b if b is None or out_idx is None else b[out_idx]
        around = False  # past the device's own family
        for family_name, fam, targets in self._families:
            around |= family_name == own
            if (t := targets.get(name)) is None or (trained and family_name == own):
                continue
            if trained and around:
                if (scaling := fam.scaling(self.space, state, t, out_idx, in_idx)) is None:
                    raise TypeError(f"adapter family {family_name} cannot apply around {own}")
                self._scales[name] = scaling
            else:
                w, b = fam.apply(self.space, state, t, w, b, out_idx, in_idx)
        return w, b

    def width_bytes(self) -> int:
        """Bytes of the frozen projections a width-sliced submodel holds (what it must download when they change)."""
        return sum(4 * sum(p.numel() for p in self.projection(name).parameters(recurse=False))
                   for name, _, _ in self.space.projections())

    def initial(self, state: Tensors, slices: Slices, cache: dict) -> Tensors:
        """The device's starting trainable tensors, by parameter name.

        ``cache`` is the actor's for the round: what a family computes once per view (FlexLoRA's SVD).
        """
        out = {}
        for t in self.trained:
            out_idx, in_idx = self.space.index(t.kind, slices, t.layer)
            out |= self.family.initial(self.space, state, self.structure, t, out_idx, in_idx, base=self.base,
                                       cache=cache, seed=self.seed)
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

        for t in self.trained:
            out_idx, in_idx = self.space.index(t.kind, slices, t.layer)
            for key, sub, r, c in self.family.to_global(self.space, self.structure, t, initial, update, state,
                                                        out_idx, in_idx):
                put(key, sub, r=r, c=c)
        if self.structure.embeddings:
            e = self.space.embedding
            put(e, update[e], r=rows.to(update[e].device))
        return out, held



def _rescale_input(scales: dict, name: str, module: nn.Module, args: tuple) -> tuple | None:
    side, vector = scales[name]
    return (args[0] * vector, *args[1:]) if side == "in" else None


def _rescale_output(scales: dict, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    side, vector = scales[name]
    return output * vector if side == "out" else None
