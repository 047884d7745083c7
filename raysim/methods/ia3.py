"""(IA)³ as an adapter family (Liu et al. 2022, arXiv 2205.05638): learned vectors that rescale activations.

A device trains one vector per targeted projection, as peft's ``IA3Config``
builds it: a feed-forward target rescales its input, the others their output
(bias included). The targets are peft's defaults for the model family
(``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``): GPT-2's ``c_attn``
(keys and values; GPT-2 computes queries in the same projection, so they are
rescaled too) and the MLP's ``c_proj``; Llama-style models' ``k_proj``,
``v_proj`` and ``down_proj``.

The global state holds each target's vector (``<module>.ia3``), all ones
before round 1. A device starts from its slice of it (width pruning keeps the
units it holds), and its update is the change of its vector, so the server
averages each element over the devices that trained it. (IA)³ applies around
LoRA: a projection of the global model is ``diag(l_out) (W0 + ΔW) diag(l_in)``;
a LoRA device holds the vectors as a fixed rescaling of the projections it
trains, an (IA)³ device holds ``ΔW`` merged into its frozen weights.

Departures from the paper: no unlikelihood or length-normalised losses (the
run's output loss trains it), and the vectors are trained from ones on each
device rather than pre-trained on a multitask mixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import IA3Config, get_peft_model
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
)
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS,
)

from raysim.methods.family import AdapterFamily, Index, Piece, Reach, Tensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from raysim.config import ExperimentConfig
    from raysim.methods.coordinates import Space, Structure
    from raysim.methods.lora import Target
    from raysim.models.build import BaseModel


def _named(target: Target, suffixes: list[str]) -> bool:
    return any(target.name.endswith(f".{suffix}") for suffix in suffixes)


class IA3(AdapterFamily):
    def targets(self, space: Space) -> tuple[Target, ...]:
        return tuple(t for t in space.projection_targets if _named(t, TARGETS[space.family]))

    @staticmethod
    def _feedforward(space: Space, target: Target) -> bool:
        """A feed-forward target rescales its input (peft's ``feedforward_modules``); the others their output."""
        return _named(target, FEEDFORWARD[space.family])

    @staticmethod
    def _parameter(target: Target) -> str:
        return f"{target.name}.ia3_l.default"

    def initial_state(self, space: Space, base: BaseModel, *, seed: int) -> Tensors:
        return {f"{t.name}.ia3": torch.ones(t.in_features if self._feedforward(space, t) else t.out_features)
                for t in self.targets(space)}

    def scaling(self, space: Space, state: Tensors, target: Target, out_idx: Index,
                in_idx: Index) -> tuple[str, torch.Tensor]:
        side, index = ("in", in_idx) if self._feedforward(space, target) else ("out", out_idx)
        vector = state[f"{target.name}.ia3"]
        return side, vector if index is None else vector.index_select(0, index.to(vector.device))

    def apply(self, space: Space, state: Tensors, target: Target, weight: torch.Tensor, bias: torch.Tensor | None,
              out_idx: Index, in_idx: Index) -> tuple[torch.Tensor, torch.Tensor | None]:
        side, vector = self.scaling(space, state, target, out_idx, in_idx)
        vector = vector.to(weight.device)
        rows_are_out = not space.arch.transposed  # module orientation: (out, in), or (in, out) for GPT-2's Conv1D
        if side == "out":
            weight = weight * (vector[:, None] if rows_are_out else vector[None, :])
            return weight, None if bias is None else bias * vector
        return weight * (vector[None, :] if rows_are_out else vector[:, None]), bias

    def build(self, model: PreTrainedModel, *, space: Space, structure: Structure, trained: list[Target],
              cfg: ExperimentConfig) -> PreTrainedModel:
        if not trained:
            model.requires_grad_(False)
            return model
        config = IA3Config(target_modules=[t.name for t in trained],
                           feedforward_modules=[t.name for t in trained if self._feedforward(space, t)],
                           fan_in_fan_out=space.arch.transposed)  # GPT-2's Conv1D stores weights as (in, out)
        return get_peft_model(model, config).get_base_model()

    def initial(self, space: Space, state: Tensors, structure: Structure, target: Target, out_idx: Index,
                in_idx: Index, *, base: BaseModel, cache: dict, seed: int) -> Tensors:
        side, vector = self.scaling(space, state, target, out_idx, in_idx)
        return {self._parameter(target): vector.reshape(-1, 1) if side == "out" else vector.reshape(1, -1)}

    def to_global(self, space: Space, structure: Structure, target: Target, initial: Tensors, update: Tensors,
                  state: Tensors, out_idx: Index, in_idx: Index) -> list[Piece]:
        index = in_idx if self._feedforward(space, target) else out_idx
        return [(f"{target.name}.ia3", update[self._parameter(target)].flatten(), index, None)]

    def support(self, space: Space, structure: Structure, target: Target, out_idx: Index,
                in_idx: Index) -> list[Reach]:
        return [(f"{target.name}.ia3", in_idx if self._feedforward(space, target) else out_idx, None)]


FAMILY = IA3()
