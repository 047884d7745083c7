"""Heterogeneous LoRA ranks: exact product-space aggregation and re-factoring.

A rank-r adapter (``lora_A``: r x in, ``lora_B``: out x r, scale s) changes a
weight by ``ΔW = s · B A``. Averaging A and B separately is not the average of
the products, so the server aggregates in product space,
``ΔW̄ = Σ p_k s B_k A_k``, and hands a rank-r device the top r singular
components of the merged ``ΔW`` for the next round (FlexLoRA, Bai et al.
2024). What that truncation drops is the tail of the singular values.

HetLoRA (Cho et al. 2024) instead zero-pads every device's factors to the
largest rank and averages the factors; devices take the first r components.
It is inexact and kept as a baseline. The rules that use these functions are
registered in :mod:`raysim.aggregation.lora`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from raysim import rng


@dataclass(frozen=True)
class Target:
    """A LoRA-targeted weight, in (out, in) orientation."""

    name: str  # module path, e.g. transformer.h.0.attn.c_attn
    layer: int
    kind: str
    out_features: int
    in_features: int


def lora_init(target: Target, *, rank: int, seed: int) -> torch.Tensor:
    """peft's default ``lora_A`` init (Kaiming-uniform, bound 1/sqrt(in)), keyed by the module name."""
    bound = 1.0 / math.sqrt(target.in_features)
    g = rng.generator(seed, "lora-init", target.name)
    return (torch.rand(rank, target.in_features, generator=g) * 2 - 1) * bound


def product(*, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``s · B A``: the weight change an adapter stands for, (out, in)."""
    return scale * (lora_B @ lora_A)


def refactor(delta: torch.Tensor, *, rank: int, scale: float,
             fallback_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (A, B) with ``s · B A`` = the truncated SVD of ``delta``.

    ``B = U_r Σ_r / s`` and ``A = V_rᵀ``. Where a singular value is zero (the
    first round, or a delta of lower rank) the direction carries no
    information; that row of A is taken from ``fallback_A`` (a standard LoRA
    init) so the adapter can still learn along it, and the product is unchanged
    because the matching column of B is zero.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = fallback_A[:rank].double().clone()
    b[:, :k] = u[:, :k] * (s[:k] / scale)
    live = s[:k] > s[0] * delta.shape[0] * torch.finfo(torch.float32).eps if k else s[:0].bool()
    a[:k][live] = vh[:k][live]
    b[:, :k][:, ~live] = 0.0
    return a.to(delta.dtype), b.to(delta.dtype)


def tail_error(singular_values: torch.Tensor, *, rank: int) -> tuple[float, float]:
    """(squared Frobenius norm dropped by keeping ``rank`` components, total squared norm)."""
    sq = singular_values.double().pow(2)
    return float(sq[rank:].sum()), float(sq.sum())


def relative_truncation_error(deltas: list[torch.Tensor], *, rank: int) -> float:
    """``‖ΔW - ΔW_r‖_F / ‖ΔW‖_F`` over a set of weights (0 when they are all zero)."""
    dropped = total = 0.0
    for delta in deltas:
        d, t = tail_error(torch.linalg.svdvals(delta.double()), rank=rank)
        dropped, total = dropped + d, total + t
    return math.sqrt(dropped / total) if total > 0 else 0.0


def zero_pad(*, lora_A: torch.Tensor, lora_B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA: factors padded with zeros to ``rank`` components."""
    r = lora_A.shape[0]
    return (torch.nn.functional.pad(lora_A, (0, 0, 0, rank - r)),
            torch.nn.functional.pad(lora_B, (0, rank - r)))
