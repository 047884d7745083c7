"""Rules for heterogeneous LoRA ranks: how the global state holds each targeted weight, how a device starts
from it and how its update maps back. ``aggregation.lora`` names one (:data:`LORA_RULES`).

The math is in :mod:`raysim.methods.lora`. Elements a device held are
averaged over the devices that held them (:mod:`raysim.aggregation.rules`);
a rule only decides the coordinates.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from raysim.methods import lora, width
from raysim.methods.lora import Target, lora_init
from raysim.registry import Registry

Tensors = dict[str, torch.Tensor]
Index = torch.Tensor | None  # feature indices a width-sliced device holds (None: all)
Factors = tuple[torch.Tensor, torch.Tensor]  # (lora_A, lora_B)
# A device's update for one state entry: (key, tensor in the device's slice, out rows, in columns)
Piece = tuple[str, torch.Tensor, Index, Index]


class LoraRule(ABC):
    """How the global state holds the LoRA-targeted weights (see the module docstring)."""

    dense: bool  # the state holds every target's ΔW: full fine-tuning (rank 0) and the utility gradient need it
    frozen: tuple[str, ...] = ()  # factor names ("lora_A") devices hold fixed at the state's value

    @abstractmethod
    def initial_state(self, target: Target, *, max_rank: int, seed: int) -> Tensors:
        """The target's entries of the global state before round 1."""

    @abstractmethod
    def merged(self, state: Tensors, target: Target, *, scale: float) -> torch.Tensor:
        """The full ``ΔW`` the global state gives ``target``."""

    def truncation_error(self, state: Tensors, targets: tuple[Target, ...], *, rank: int, scale: float) -> float:
        """Relative error ``‖ΔW - ΔW_r‖_F / ‖ΔW‖_F`` of the start a rank-``rank`` device gets."""
        return lora.relative_truncation_error([self.merged(state, t, scale=scale) for t in targets], rank=rank)

    @abstractmethod
    def start(self, state: Tensors, target: Target, *, rank: int, rows: Index, cols: Index, fallback_A: torch.Tensor,
              cache: dict, scale: float) -> Factors:
        """The (A, B) factors a rank-``rank`` device holding ``rows`` x ``cols`` of ``target`` starts from.

        ``cache`` is the round's, shared by the devices of one actor: work a view needs once goes there.
        """

    @abstractmethod
    def update(self, target: Target, *, start: Factors, delta: Factors, state: Tensors, rows: Index, cols: Index,
               scale: float, max_rank: int) -> list[Piece]:
        """A device's trained change of the factors (``delta``, from ``start``) as pieces of the global state."""


    @abstractmethod
    def support(self, target: Target, *, rank: int, rows: Index, cols: Index) -> list[tuple[str, Index, Index]]:
        """The state entries, and their (rows, columns), that a rank-``rank`` device holding ``rows`` x ``cols``
        of ``target`` can change (None: all of that axis)."""


LORA_RULES: Registry[LoraRule] = Registry("LoRA aggregation rule")


class FlexLoRA(LoraRule):
    """The exact product-space mean ``ΔW = Σ p_k s B_k A_k``; each device starts from the truncated SVD (Bai et
    al. 2024)."""

    dense = True

    def initial_state(self, target: Target, *, max_rank: int, seed: int) -> Tensors:
        return {f"{target.name}.delta": torch.zeros(target.out_features, target.in_features)}

    def merged(self, state: Tensors, target: Target, *, scale: float) -> torch.Tensor:
        return state[f"{target.name}.delta"]

    def start(self, state: Tensors, target: Target, *, rank: int, rows: Index, cols: Index, fallback_A: torch.Tensor,
              cache: dict, scale: float) -> Factors:
        key = (target.name, _index_key(rows), _index_key(cols), rank)
        if key not in cache:  # devices with the same view share one SVD
            delta = width.extract(state[f"{target.name}.delta"], rows=rows, cols=cols)
            fallback = width.extract(fallback_A, cols=cols).to(delta.device)
            cache[key] = lora.refactor(delta, rank=rank, scale=scale, fallback_A=fallback)
        return cache[key]

    def update(self, target: Target, *, start: Factors, delta: Factors, state: Tensors, rows: Index, cols: Index,
               scale: float, max_rank: int) -> list[Piece]:
        local = lora.product(lora_A=start[0] + delta[0], lora_B=start[1] + delta[1], scale=scale)
        current = width.extract(state[f"{target.name}.delta"], rows=rows, cols=cols)
        return [(f"{target.name}.delta", local - current, rows, cols)]

    def support(self, target: Target, *, rank: int, rows: Index, cols: Index) -> list[tuple[str, Index, Index]]:
        return [(f"{target.name}.delta", rows, cols)]  # a product B A of any rank reaches every element


class HetLoRA(LoraRule):
    """Factors zero-padded to the largest rank and averaged (Cho et al. 2024); inexact, a baseline."""

    dense = False

    def initial_state(self, target: Target, *, max_rank: int, seed: int) -> Tensors:
        return {f"{target.name}.lora_A": lora_init(target, rank=max_rank, seed=seed),
                f"{target.name}.lora_B": torch.zeros(target.out_features, max_rank)}

    def merged(self, state: Tensors, target: Target, *, scale: float) -> torch.Tensor:
        return lora.product(lora_A=state[f"{target.name}.lora_A"], lora_B=state[f"{target.name}.lora_B"], scale=scale)

    def truncation_error(self, state: Tensors, targets: tuple[Target, ...], *, rank: int, scale: float) -> float:
        """What the first ``rank`` components of the zero-padded factors leave out of their product."""
        dropped = total = 0.0
        for t in targets:
            a, b = state[f"{t.name}.lora_A"].double(), state[f"{t.name}.lora_B"].double()
            full = lora.product(lora_A=a, lora_B=b, scale=scale)
            dropped += float((full - lora.product(lora_A=a[:rank], lora_B=b[:, :rank], scale=scale)).pow(2).sum())
            total += float(full.pow(2).sum())
        return math.sqrt(dropped / total) if total > 0 else 0.0

    def start(self, state: Tensors, target: Target, *, rank: int, rows: Index, cols: Index, fallback_A: torch.Tensor,
              cache: dict, scale: float) -> Factors:
        return (width.extract(state[f"{target.name}.lora_A"][:rank], cols=cols),
                width.extract(state[f"{target.name}.lora_B"][:, :rank], rows=rows))

    def update(self, target: Target, *, start: Factors, delta: Factors, state: Tensors, rows: Index, cols: Index,
               scale: float, max_rank: int) -> list[Piece]:
        da, db = lora.zero_pad(lora_A=delta[0], lora_B=delta[1], rank=max_rank)  # padded components: held zeros
        return [(f"{target.name}.lora_A", da, None, cols), (f"{target.name}.lora_B", db, rows, None)]

    def support(self, target: Target, *, rank: int, rows: Index, cols: Index) -> list[tuple[str, Index, Index]]:
        components = torch.arange(rank)  # the zero-padded ones above ``rank`` never change
        return [(f"{target.name}.lora_A", components, cols), (f"{target.name}.lora_B", rows, components)]


class FFALoRA(HetLoRA):
    """LoRA with A frozen at its shared random start, B trained and averaged (FFA-LoRA, Sun et al. 2024): the mean
    of the products is the product of the mean, exactly, at every rank (a rank-r device uses A's first r rows);
    under central DP the noise goes on B alone (out x max rank per target): the factor space. The state, its
    product and a device's start are HetLoRA's; only A never changes."""

    frozen = ("lora_A",)  # factors devices never change: the submodel holds them fixed

    def update(self, target: Target, *, start: Factors, delta: Factors, state: Tensors, rows: Index, cols: Index,
               scale: float, max_rank: int) -> list[Piece]:
        # B's columns above the device's rank are held zeros: B's mean over every device that held the rows is
        # then the mean of the products, whatever the ranks (as A is shared)
        db = delta[1]
        padded = torch.cat([db, db.new_zeros(db.shape[0], max_rank - db.shape[1])], dim=1)
        return [(f"{target.name}.lora_B", padded, rows, None)]

    def support(self, target: Target, *, rank: int, rows: Index, cols: Index) -> list[tuple[str, Index, Index]]:
        return [(f"{target.name}.lora_B", rows, torch.arange(rank))]


LORA_RULES.register("flexlora")(FlexLoRA())
LORA_RULES.register("hetlora")(HetLoRA())
LORA_RULES.register("ffa")(FFALoRA())


def _index_key(index: Index) -> tuple | None:
    return None if index is None else tuple(index.tolist())
