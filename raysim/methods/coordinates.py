"""The global coordinates the aggregator holds, what a device's config makes of them, and central DP's support.

:class:`Space` is the trainable state in full coordinates: for every LoRA-targeted weight what the run's LoRA
rule holds (:mod:`raysim.aggregation.lora`: the dense product ``ΔW``, which devices at rank 0 train directly, or
the adapter factors at the largest rank), the other adapter families' state, plus the token embedding when some
device may train partial embeddings (the output embedding, the head, where the model does not tie them:
``model.tie_embeddings``). A :class:`DeviceConfig` determines a :class:`Structure` (the shapes: rank, kept heads
and MLP units, trained blocks, embeddings, adapter family), and per device and round the
:class:`~raysim.methods.width.Slices` of units it holds. :class:`Support` is what some config of the method
space can change: where central DP's noise goes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from raysim.aggregation.lora import LORA_RULES, LoraRule
from raysim.config import ExperimentConfig
from raysim.errors import ConfigError
from raysim.methods import adapter, embedding_updates, width
from raysim.methods import emulator as emulators
from raysim.methods.base import structure_fields
from raysim.methods.family import AdapterFamily
from raysim.methods.lora import Target
from raysim.methods.rank import max_rank
from raysim.methods.width import Slices
from raysim.models import classifier
from raysim.models.architectures import ARCHITECTURES, Architecture, Sizes, check_targets, features, lora_targets
from raysim.models.build import BaseModel, instantiate
from raysim.offsite.layout import Layout, checked
from raysim.split import mechanisms
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
    cut: int | None = None  # split learning: the blocks below this one run on the device, the rest on the server
    emulator: str | None = None  # offsite-tuning: the emulator whose middle blocks stand in for the model's


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
    classes: int = 0  # data.task: classification: the head's labels (its state entry: classifier.HEAD_WEIGHT)
    # P³EFT (split.mechanism p3eft): the server's adapter sets per device, all above one cut. Set 0 is the
    # state's usual entries; set i > 0 holds its own copy of the entries of the blocks from the cut on, under
    # the prefix "set<i>/" (:meth:`view`)
    sets: int = 1
    cut: int | None = None  # the one cut they are above (None with one set)
    emulators: tuple[tuple[str, Layout], ...] = ()  # offsite-tuning: the method space's emulators' layouts

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
        sets = mechanisms.adapter_sets(cfg)
        return cls(targets=tuple(t for t in projections if t.name.split(".")[-1] in suffixes),
                   lora=cfg.aggregation.lora, max_rank=max_rank(cfg.methods), scale=cfg.methods.lora_alpha_per_rank,
                   embeddings=embedding_updates.any_trained(cfg.methods), family=arch.name, sizes=sizes,
                   embedding=arch.embedding if tied else OUTPUT_EMBEDDING, adapters=adapter.listed(cfg.methods),
                   projection_targets=tuple(projections),
                   classes=len(cfg.data.labels) if cfg.data.task == "classification" else 0,
                   sets=sets, cut=cfg.methods.split[0] if sets > 1 else None,
                   emulators=tuple((name, checked(cfg.emulators[name], sizes.n_layer, name=name))
                                  for name in emulators.listed(cfg.methods)))

    def emulator_layout(self, name: str) -> Layout:
        """The blocks emulator ``name`` keeps as adapters and compresses."""
        return dict(self.emulators)[name]

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
        if self.classes:
            state[classifier.HEAD_WEIGHT] = classifier.initial_head(classes=self.classes, width=self.sizes.width,
                                                                    seed=seed)
        server = self.server_keys(state)
        for i in range(1, self.sets):  # every set starts where set 0 does
            state |= {f"set{i}/{k}": state[k].clone() for k in server}
        return state

    def server_keys(self, state: Tensors) -> list[str]:
        """The entries of the blocks a P³EFT server runs in several sets (none with one set)."""
        if self.sets == 1:
            return []
        prefixes = tuple(f"{self.arch.block(layer)}." for layer in range(self.cut, self.n_layer))
        return [k for k in state if k.startswith(prefixes)]

    def view(self, state: Tensors, i: int) -> Tensors:
        """The state as adapter set ``i`` sees it: its own entries in place of set 0's."""
        if i == 0:
            return state
        prefix = f"set{i}/"
        return state | {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

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
        if self.classes:  # every device trains the head
            masks[classifier.HEAD_WEIGHT][:] = True
        for i in range(1, self.sets):  # a set's entries are changed where set 0's are
            masks |= {f"set{i}/{k}": masks[k].clone() for k in self.server_keys(state)}
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
