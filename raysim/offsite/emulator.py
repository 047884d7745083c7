"""An offsite-tuning emulator: what the model owner ships a device in place of the full model, and its modules.

An :class:`Emulator` keeps the model's block indices: its adapter blocks are the model's own, each middle block
is kept (the base's weights, or distilled ones), replaced by a :class:`Harmonizer`, or dropped (:class:`Skip`).
Every state entry of the global coordinates therefore names the same block on the device as in the full model,
and the adapters a device trains plug back into the full model as they are: the plug-in model is the full model
with the global state, the emulator alone is :func:`install`'s model with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from raysim.models.architectures import Architecture, features
from raysim.offsite.layout import Layout


class Skip(nn.Module):
    """A dropped block: its input is its output."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class Harmonizer(nn.Module):
    """ScaleOT's harmonizer in place of a block: ``h + W_up ReLU(W_down h)``, ``W_up`` zero at the start (the
    harmonizer starts as a dropped block)."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.up(torch.relu(self.down(hidden_states)))


class LowRank(nn.Module):
    """A projection at rank ``r``: ``up(down(x))`` with ``up`` carrying the projection's bias (its truncated SVD,
    :func:`low_rank`)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


@dataclass(frozen=True)
class Emulator:
    """One built emulator: which middle blocks it runs and how, and the weights that differ from the base's."""

    name: str
    kind: str
    layout: Layout
    kept: tuple[int, ...]  # middle blocks run whole
    harmonized: tuple[int, ...] = ()  # middle blocks replaced by a Harmonizer
    harmonizer_rank: int = 0
    ranks: tuple[tuple[str, int], ...] = ()  # projections at reduced rank (module name, rank)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # kept blocks' trained weights, harmonizers, factors
    scores: tuple[tuple[int, float], ...] = ()  # middle block -> importance (the public loss it saves)
    key: str = ""  # the cache key it was built or loaded under

    @property
    def dropped(self) -> tuple[int, ...]:
        return tuple(b for b in self.layout.middle if b not in self.kept and b not in self.harmonized)

    def describe(self) -> dict:
        """What summary.json records of it."""
        return {"kind": self.kind, "adapter_blocks": list(self.layout.adapters), "kept": list(self.kept),
                "harmonized": list(self.harmonized), "dropped": list(self.dropped),
                "harmonizer_rank": self.harmonizer_rank, "ranks": dict(self.ranks),
                "importance": {str(b): s for b, s in self.scores}, "cache_key": self.key}


def install(model: nn.Module, emulator: Emulator, arch: Architecture, *, width: int) -> nn.Module:
    """Turn the full model ``model`` (the base's weights) into ``emulator`` in place: its middle blocks kept,
    harmonized or dropped, kept projections at their reduced rank, and the emulator's weights loaded."""
    blocks = model.get_submodule(arch.blocks)
    for b in emulator.layout.middle:
        if b in emulator.harmonized:
            blocks[b] = Harmonizer(width, emulator.harmonizer_rank)
        elif b not in emulator.kept:
            blocks[b] = Skip()
    for name, rank in emulator.ranks:
        owner, _, attr = name.rpartition(".")
        old = model.get_submodule(name)
        out_f, in_f = features(old)
        setattr(model.get_submodule(owner), attr, LowRank(in_f, out_f, rank, bias=old.bias is not None))
    missing = set(emulator.state) - set(model.state_dict())
    if missing:
        raise ValueError(f"emulator {emulator.name}: entries its model lacks: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in emulator.state.items():
            model.get_parameter(name).copy_(value)
    return model


def attention_projections(arch: Architecture, block: int) -> list[str]:
    """The module names of a block's attention projections (what selective rank compression reduces)."""
    return [f"{arch.block(block)}.{p.kind}" for p in arch.projections if p.kind.split(".")[0] in ("attn", "self_attn")]


def low_rank(weight: torch.Tensor, bias: torch.Tensor | None, *, rank: int,
             transposed: bool) -> dict[str, torch.Tensor]:
    """A projection's rank-``rank`` truncated SVD as :class:`LowRank`'s entries (``down.weight``, ``up.weight``,
    ``up.bias``): ``W ≈ (U_r √S_r)(√S_r V_rᵀ)`` with ``W`` in (out, in); the best rank-r approximation in
    Frobenius norm (Eckart-Young), computed in float64."""
    w = (weight.T if transposed else weight).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    out = {"down.weight": (root[:, None] * vh[:rank]).to(weight.dtype),
           "up.weight": (u[:, :rank] * root[None, :]).to(weight.dtype)}
    if bias is not None:
        out["up.bias"] = bias.clone()
    return out


def svd_rank(weight_shape: tuple[int, int], fraction: float) -> int:
    """The rank a weight keeps at ``fraction`` of its full rank (at least 1)."""
    return max(1, round(fraction * min(weight_shape)))
