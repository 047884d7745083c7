"""LoRA as an adapter family (Hu et al. 2021): a rank-r adapter on each targeted projection, as peft builds it,
or (rank 0) the targeted weights themselves.

The targets are ``methods.lora_target_modules`` in every block. How the
global state holds them, how a device of a given rank starts from it and how
its update maps back is the run's LoRA rule (``aggregation.lora``,
:mod:`raysim.aggregation.lora`); this family applies it. LoRA's state adds
to a weight: ``W0 + ΔW``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from raysim.methods import width
from raysim.methods.family import AdapterFamily, Index, Piece, Reach, Tensors
from raysim.methods.lora import lora_init
from raysim.models.build import add_lora

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from raysim.config import ExperimentConfig
    from raysim.methods.coordinates import Space, Structure
    from raysim.methods.lora import Target
    from raysim.models.build import BaseModel


class LoRA(AdapterFamily):
    def targets(self, space: Space) -> tuple[Target, ...]:
        return space.targets

    def initial_state(self, space: Space, base: BaseModel, *, seed: int) -> Tensors:
        state = {}
        for t in space.targets:
            state |= space.rule.initial_state(t, max_rank=space.max_rank, seed=seed)
        return state

    def apply(self, space: Space, state: Tensors, target: Target, weight: torch.Tensor, bias: torch.Tensor | None,
              out_idx: Index, in_idx: Index) -> tuple[torch.Tensor, torch.Tensor | None]:
        delta = space.merged(state, target).to(weight.device)
        return weight + space.oriented(width.extract(delta, rows=out_idx, cols=in_idx)), bias

    def build(self, model: PreTrainedModel, *, space: Space, structure: Structure, trained: list[Target],
              cfg: ExperimentConfig) -> PreTrainedModel:
        if structure.rank > 0 and trained:
            model = add_lora(model, rank=structure.rank, methods=cfg.methods, seed=cfg.seed,
                             modules=[t.name for t in trained]).get_base_model()
        else:
            model.requires_grad_(False)
            for t in trained:
                model.get_submodule(t.name).weight.requires_grad_(True)
        for name, p in model.named_parameters():  # factors the LoRA rule holds fixed (ffa's A) do not train
            if any(f".{factor}." in name for factor in space.rule.frozen):
                p.requires_grad_(False)
        return model

    def initial(self, space: Space, state: Tensors, structure: Structure, target: Target, out_idx: Index,
                in_idx: Index, *, base: BaseModel, cache: dict, seed: int) -> Tensors:
        t, rank = target, structure.rank
        if rank == 0:
            w0 = space.extract_weight(base.state[f"{t.name}.weight"], out_idx, in_idx)
            delta = width.extract(state[f"{t.name}.delta"], rows=out_idx, cols=in_idx)
            return {f"{t.name}.weight": w0.to(delta.device) + space.oriented(delta)}
        if ("lora-init", t.name) not in cache:  # the rows of A a zero singular value leaves to a standard init
            cache["lora-init", t.name] = lora_init(t, rank=space.max_rank, seed=seed)
        a, b = space.rule.start(state, t, rank=rank, rows=out_idx, cols=in_idx, fallback_A=cache["lora-init", t.name],
                                cache=cache, scale=space.scale)
        return {f"{t.name}.lora_A.default.weight": a, f"{t.name}.lora_B.default.weight": b}

    def to_global(self, space: Space, structure: Structure, target: Target, initial: Tensors, update: Tensors,
                  state: Tensors, out_idx: Index, in_idx: Index) -> list[Piece]:
        t = target
        if structure.rank == 0:
            return [(f"{t.name}.delta", space.oriented(update[f"{t.name}.weight"]), out_idx, in_idx)]
        na, nb = f"{t.name}.lora_A.default.weight", f"{t.name}.lora_B.default.weight"
        return space.rule.update(t, start=(initial[na], initial[nb]), delta=(update.get(na), update[nb]), state=state,
                                 rows=out_idx, cols=in_idx, scale=space.scale, max_rank=space.max_rank)

    def support(self, space: Space, structure: Structure, target: Target, out_idx: Index,
                in_idx: Index) -> list[Reach]:
        if structure.rank == 0:
            return [(f"{target.name}.delta", out_idx, in_idx)]
        return space.rule.support(target, rank=structure.rank, rows=out_idx, cols=in_idx)


FAMILY = LoRA()
