"""Unbiased stochastic uniform quantization of an update, packed for real.

A tensor (or each row of it) is mapped onto ``2**bits`` evenly spaced levels
between its minimum ``lo`` and maximum; with step ``Δ = (hi - lo) / (2**bits - 1)``
a value rounds up with probability equal to its fractional position between
the two neighbouring levels, so ``E[Q(x)] = x`` and the per-coordinate variance
is ``Δ² f (1 - f) <= Δ² / 4``. The level indices are bit-packed into a
``uint8`` buffer; what a device uploads is that buffer plus one float32
``(lo, Δ)`` pair per tensor or per row, and ``nbytes`` is their real length.
32 bits sends the float32 values as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raysim.methods.bits import UNQUANTIZED
from raysim.registry import Registry

__all__ = ["UNQUANTIZED", "GRANULARITY", "decode", "encode", "pack", "unpack"]
# methods.quantization: one (lo, step) pair per tensor, or per row of a matrix (whether encode works per row)
GRANULARITY: Registry[bool] = Registry("quantization granularity")
GRANULARITY.register("tensor")(False)
GRANULARITY.register("row")(True)


@dataclass(frozen=True)
class Encoded:
    """One tensor's payload: packed level indices (or raw float32) and scales."""

    buffer: torch.Tensor  # uint8
    lo: torch.Tensor  # float32, one per row (per-row) or one in all
    step: torch.Tensor  # float32, same shape as lo
    shape: tuple[int, ...]
    bits: int

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() + 4 * (self.lo.numel() + self.step.numel())


def pack(levels: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Bit-pack non-negative integers below ``2**bits`` into ``ceil(n * bits / 8)`` bytes."""
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((levels.reshape(-1, 1).to(torch.int32) >> shifts) & 1).to(torch.uint8).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, -stream.numel() % 8))
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack(buffer: torch.Tensor, *, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``count`` integers, as int64."""
    stream = (buffer.reshape(-1, 1).to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
    stream = stream.reshape(-1)[: count * bits].reshape(count, bits).to(torch.int64)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(dim=1)


def encode(x: torch.Tensor, *, bits: int, per_row: bool, generator: torch.Generator) -> Encoded:
    """Quantize ``x`` to ``bits`` (per tensor, or per row of a 2-D tensor) and pack it."""
    x = x.detach().to("cpu", torch.float32)
    empty = torch.zeros(0)
    if bits == UNQUANTIZED:
        return Encoded(x.contiguous().view(-1).view(torch.uint8).clone(), empty, empty, tuple(x.shape), bits)
    rows = x.reshape(x.shape[0], -1) if per_row and x.dim() == 2 else x.reshape(1, -1)
    lo = rows.min(dim=1, keepdim=True).values
    step = (rows.max(dim=1, keepdim=True).values - lo) / (2**bits - 1)
    scaled = torch.where(step > 0, (rows - lo) / step.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    low = scaled.floor()
    up = torch.rand(scaled.shape, generator=generator) < (scaled - low)
    levels = (low + up).clamp_(0, 2**bits - 1)
    return Encoded(pack(levels, bits=bits), lo.reshape(-1), step.reshape(-1), tuple(x.shape), bits)


def decode(encoded: Encoded) -> torch.Tensor:
    """The float32 tensor an :class:`Encoded` payload stands for."""
    if encoded.bits == UNQUANTIZED:
        return encoded.buffer.view(torch.float32).reshape(encoded.shape).clone()
    n = 1
    for d in encoded.shape:
        n *= d
    levels = unpack(encoded.buffer, bits=encoded.bits, count=n).reshape(encoded.lo.numel(), -1).to(torch.float32)
    return (encoded.lo.unsqueeze(1) + levels * encoded.step.unsqueeze(1)).reshape(encoded.shape)
