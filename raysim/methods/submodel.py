"""A device's submodel: the model it trains, and the exact map between it and the global coordinates.

A :class:`~raysim.methods.coordinates.Structure` is built once per actor and reused (:func:`build_model` is the
model transformers and peft build for it; :class:`Submodel` adds keyed dropout and the speed-ups).
:class:`Submodel` copies the device's view of the global state in, encodes its trained update for the uplink
(:class:`Encoding`) and maps it back to full coordinates with the mask of what it held.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from raysim.config import ExperimentConfig
from raysim.methods import adapter, quantize, width
from raysim.methods.coordinates import Space, Structure, Tensors
from raysim.methods.width import Slices
from raysim.models import classifier
from raysim.models.build import BaseModel, instantiate
from raysim.models.fastops import fuse_activations
from raysim.models.grouped import install_keyed_dropout, stackable
from raysim.offsite.emulator import install
from raysim.split.protocol import device_parameters


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
    if structure.emulator is not None:  # the model owner's stand-in for the middle blocks
        if structure.emulator not in base.emulators:
            raise ValueError(f"the base model carries no emulator {structure.emulator!r} "
                             "(raysim.offsite.build.build_emulators builds them)")
        install(model, base.emulators[structure.emulator], space.arch, width=space.sizes.width)
    fam = adapter.family(structure.adapter)
    trained = [t for t in fam.targets(space) if t.layer in structure.blocks]
    model = fam.build(model, space=space, structure=structure, trained=trained, cfg=cfg)
    if structure.embeddings:
        model.get_parameter(space.embedding).requires_grad_(True)
    if space.classes:
        classifier.attach(model, space.classes)
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
        self.dropout_keys = install_keyed_dropout(model)
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
        # an emulator's middle blocks are its own, fixed as shipped: the global state is loaded around them
        self._middle = frozenset(space.emulator_layout(structure.emulator).middle if structure.emulator else ())
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

    @functools.cached_property
    def sent(self) -> frozenset[str]:
        """The trainable parameters whose values and updates cross the device's link: all of them, but on a
        split device only those it holds (the server's adapters stay on the server)."""
        if self.structure.cut is None:
            return frozenset(self.params)
        held = {id(p) for p in device_parameters(self.lm, self.space.arch.blocks, self.structure.cut)}
        return frozenset(n for n, p in self.params.items() if id(p) in held)

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
                if layer in self._middle:
                    continue
                out_idx, in_idx = space.index(kind, slices, layer)
                module = self.projection(name)
                w, b = self.frozen_weights(state, name, out_idx, in_idx)
                module.weight.copy_(w)
                if b is not None:
                    module.bias.copy_(b)
            for entry in (self.space.embedding, classifier.HEAD_WEIGHT):
                if entry in state:
                    self.lm.get_parameter(entry).copy_(state[entry])
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
        if self.space.classes:
            out[classifier.HEAD_WEIGHT] = state[classifier.HEAD_WEIGHT]
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

        Embedding updates travel as the ``rows`` sent, plus their int32 indices unless the server chose them; a split
        server's adapters do not travel (:attr:`sent`).
        """
        if rows is not None:
            e = self.space.embedding
            update = {**update, e: update[e].index_select(0, rows.to(update[e].device))}
        nbytes = 0 if rows is None or not encoding.row_indices else 4 * len(rows)
        kept = {name: u for name, u in update.items() if name not in self.sent}  # a split server's: not sent
        update = {name: u for name, u in update.items() if name in self.sent}
        if encoding.bits == quantize.UNQUANTIZED:
            return update | kept, nbytes + sum(4 * u.numel() for u in update.values())
        decoded = dict(kept)
        for name, u in update.items():
            e = quantize.encode(u, bits=encoding.bits, per_row=encoding.per_row, generator=generator)
            decoded[name] = quantize.decode(e).to(u.device)
            nbytes += e.nbytes
        return decoded, nbytes

    def to_global(self, initial: Tensors, update: Tensors, state: Tensors, slices: Slices,
                  *, rows: torch.Tensor | None, only: set[str] | None = None) -> tuple[Tensors, Tensors]:
        """A decoded device update in full coordinates, and the masks of what it held; ``only``: the update holds
        just these parameters (a P³EFT server's further adapter set), and only their targets map back."""
        out, held = {}, {}
        wanted = (lambda name: True) if only is None else (lambda name: name in only)

        def put(key: str, sub: torch.Tensor, *, r=None, c=None, mask=True) -> None:
            if r is None and c is None:
                out[key] = sub
                return
            out[key], m = width.scatter(sub, shape=tuple(state[key].shape), rows=r, cols=c)
            if mask:
                held[key] = m

        for t in self.trained:
            if only is not None and not any(n.startswith(f"{t.name}.") for n in only):
                continue
            out_idx, in_idx = self.space.index(t.kind, slices, t.layer)
            for key, sub, r, c in self.family.to_global(self.space, self.structure, t, initial, update, state,
                                                        out_idx, in_idx):
                put(key, sub, r=r, c=c)
        if self.structure.embeddings and wanted(self.space.embedding):
            e = self.space.embedding
            put(e, update[e], r=rows.to(update[e].device))
        if self.space.classes and wanted(classifier.HEAD_WEIGHT):
            put(classifier.HEAD_WEIGHT, update[classifier.HEAD_WEIGHT])
        return out, held



def _rescale_input(scales: dict, name: str, module: nn.Module, args: tuple) -> tuple | None:
    side, vector = scales[name]
    return (args[0] * vector, *args[1:]) if side == "in" else None


def _rescale_output(scales: dict, name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    side, vector = scales[name]
    return output * vector if side == "out" else None
