"""Structured width submodels: which heads and MLP units a device holds.

A device with pruning ratio p holds ``⌈(1 - p) K⌉`` of a layer's K units
(attention heads, MLP hidden units); the model's input and output widths
stay full. HeteroFL (Diao et al. 2021) keeps a static prefix; FedRolex (Alam
et al. 2022) rolls the window each round, ``roll(arange(K), round)[:⌈(1-p)K⌉]``,
so every unit is trained over time. Federated dropout (Caldas et al. 2018)
draws a fresh random subset per device and round from a keyed generator.

A submodel's tensors are slices of the full ones (:func:`extract`); a
device's update goes back with :func:`scatter`, which also returns the mask
of elements it held, so the server averages each element over the devices
that held it and elements nobody held keep their value.
"""

from __future__ import annotations

import math

import torch

from raysim.registry import Registry


def kept(total: int, ratio: float) -> int:
    """Units kept at ``ratio``: ``⌈(1 - ratio) total⌉``, at least one."""
    return max(1, math.ceil(round((1.0 - ratio) * total, 9)))


class HeteroFL:
    """A static prefix of the units (Diao et al. 2021)."""

    rolls = False  # the same slices every round

    def units(self, total: int, ratio: float, *, round: int) -> torch.Tensor:
        return torch.arange(kept(total, ratio))


class FedRolex:
    """A window that rolls by one unit each round (Alam et al. 2022): every unit is trained over time."""

    rolls = True  # the frozen slices change every round, so they travel down again

    def units(self, total: int, ratio: float, *, round: int) -> torch.Tensor:
        return torch.roll(torch.arange(total), round)[: kept(total, ratio)].sort().values


PRUNING: Registry[HeteroFL | FedRolex] = Registry("pruning window")  # methods.pruning names one
PRUNING.register("heterofl")(HeteroFL())
PRUNING.register("fedrolex")(FedRolex())


def dropout(units: torch.Tensor, rate: float, *, generator: torch.Generator) -> torch.Tensor:
    """A random subset of ``units`` of size ``⌈(1 - rate) len⌉``, in ascending order."""
    pick = torch.randperm(len(units), generator=generator)[: kept(len(units), rate)]
    return units[pick.sort().values]


def head_columns(heads: torch.Tensor, *, head_dim: int, width: int, parts: int) -> torch.Tensor:
    """Feature indices of ``heads`` in a projection holding ``parts`` stacked blocks (q, k, v: 3)."""
    per_block = (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)
    return torch.cat([per_block + p * width for p in range(parts)])


def extract(full: torch.Tensor, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """``full[rows][:, cols]`` (None: all)."""
    if rows is not None:
        full = full.index_select(0, rows)
    if cols is not None:
        full = full.index_select(1, cols)
    return full


def scatter(sub: torch.Tensor, *, shape: tuple[int, ...], rows: torch.Tensor | None = None,
            cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``sub`` placed back at (rows, cols) of a zero tensor of ``shape``, and the held mask.

    The mask broadcasts against ``shape``: 1 where the device held the element.
    """
    full = torch.zeros(shape, dtype=sub.dtype, device=sub.device)
    mask = torch.ones([1] * len(shape), dtype=torch.float64, device=sub.device)
    if rows is None and cols is None:
        full.copy_(sub)
        return full, mask
    index = [slice(None)] * len(shape)
    if rows is not None:
        index[0] = rows.unsqueeze(1) if len(shape) > 1 and cols is not None else rows
        row_mask = torch.zeros(shape[0], dtype=torch.float64, device=sub.device)
        row_mask[rows] = 1.0
        mask = mask * row_mask.reshape(-1, *[1] * (len(shape) - 1))
    if cols is not None:
        index[1] = cols
        col_mask = torch.zeros(shape[1], dtype=torch.float64, device=sub.device)
        col_mask[cols] = 1.0
        mask = mask * col_mask.reshape(1, -1)
    full[tuple(index)] = sub
    return full, mask
