"""The adapter-family seam: what a device trains in the projections of its trained blocks, and the exact map
between that and the global state.

A family (``methods.adapter``, :mod:`raysim.methods.adapter`) owns a set of
the blocks' projections, its *targets*, and its entries of the global state
for them. Every family in the method space keeps its entries; a projection's
weight in the global model is the base weight with each family's state applied
in turn (:meth:`AdapterFamily.apply`). A device trains one family: its own
entries start from the state (:meth:`AdapterFamily.initial`) and its decoded
update maps back to them (:meth:`AdapterFamily.to_global`); the others' are
frozen into the weights it holds, or, for a family applied around the one the
device trains, held as a fixed rescaling of the trained projection
(:meth:`AdapterFamily.scaling`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from raysim.config import ExperimentConfig
    from raysim.methods.coordinates import Space, Structure
    from raysim.methods.lora import Target
    from raysim.models.build import BaseModel

Tensors = dict[str, torch.Tensor]
Index = torch.Tensor | None  # feature indices a width-sliced device holds (None: all)
Piece = tuple[str, torch.Tensor, Index, Index]  # an update for one state entry: (key, tensor, out rows, in columns)
Reach = tuple[str, Index, Index]  # the (rows, columns) of a state entry an update can change (None: all)


class AdapterFamily(ABC):
    """One adapter family's targets, state and maps (see the module docstring)."""

    @abstractmethod
    def targets(self, space: Space) -> tuple[Target, ...]:
        """The projections this family trains in a trained block."""

    @abstractmethod
    def initial_state(self, space: Space, base: BaseModel, *, seed: int) -> Tensors:
        """This family's entries of the global state before round 1."""

    @abstractmethod
    def apply(self, space: Space, state: Tensors, target: Target, weight: torch.Tensor, bias: torch.Tensor | None,
              out_idx: Index, in_idx: Index) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A projection's ``weight`` and ``bias`` (sliced to (out_idx, in_idx), the weight in module orientation)
        with this family's state applied. Differentiable in the state (the utility gradient goes through it)."""

    def scaling(self, space: Space, state: Tensors, target: Target, out_idx: Index,
                in_idx: Index) -> tuple[str, torch.Tensor] | None:
        """Where this family's state is a rescaling: ("out" or "in", the vector) of ``target``'s output or input,
        sliced; None where it is not (then it can only apply to a frozen weight)."""
        return None

    @abstractmethod
    def build(self, model: PreTrainedModel, *, space: Space, structure: Structure, trained: list[Target],
              cfg: ExperimentConfig) -> PreTrainedModel:
        """``model`` (frozen) with this family's trainable parameters on ``trained``, as peft builds them."""

    @abstractmethod
    def initial(self, space: Space, state: Tensors, structure: Structure, target: Target, out_idx: Index,
                in_idx: Index, *, base: BaseModel, cache: dict, seed: int) -> Tensors:
        """The starting values of the parameters a device trains on ``target``, by parameter name. ``cache`` is
        the actor's for the round: what one view of the state needs once."""

    @abstractmethod
    def to_global(self, space: Space, structure: Structure, target: Target, initial: Tensors, update: Tensors,
                  state: Tensors, out_idx: Index, in_idx: Index) -> list[Piece]:
        """A device's decoded update of ``target``'s parameters as pieces of the global state."""

    @abstractmethod
    def support(self, space: Space, structure: Structure, target: Target, out_idx: Index,
                in_idx: Index) -> list[Reach]:
        """The state entries, and their coordinates, a device of ``structure`` can change on ``target``."""
