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

from typing import Any

import torch

from raysim import rng
from raysim.methods.pruning import kept
from raysim.registry import Registry


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


Slices = tuple[tuple[torch.Tensor, torch.Tensor], ...] | None  # per block (attention units, MLP units); None: all


def slices(config: Any, *, n_layer: int, units: int, inner: int, pruning: str, seed: int, round: int,
           device_id: int, with_dropout: bool = True) -> Slices:
    """The heads and MLP units each block of the device's submodel holds in ``round``. ``with_dropout`` False: the
    whole pruning window, of which federated dropout keeps a random part."""
    rate = config.dropout_rate if with_dropout else 0.0
    if config.prune_ratio == 0 and rate == 0:
        return None
    out = []
    for layer in range(n_layer):
        held = []
        for part, total in (("heads", units), ("mlp", inner)):
            window = PRUNING[pruning].units(total, config.prune_ratio, round=round)
            if rate > 0:
                g = rng.generator(seed, "federated-dropout", round, device_id, layer, part)
                window = dropout(window, rate, generator=g)
            held.append(window)
        out.append(tuple(held))
    return tuple(out)


def rolls(configs: Any, pruning: str) -> bool:
    """Whether some of ``configs`` holds a pruning window that moves from round to round."""
    return PRUNING[pruning].rolls and any(c.prune_ratio > 0 for c in configs)


def frozen_changes(config: Any, pruning: str) -> bool:
    """Whether the frozen weights a device holds change every round (a rolling window, or dropout's draw): they
    travel down with the state."""
    return config.dropout_rate > 0 or rolls([config], pruning)


def narrowed(config: Any) -> bool:
    """Whether a device of ``config`` holds less than every unit of its blocks."""
    return config.prune_ratio > 0 or config.dropout_rate > 0


def own_slices(config: Any) -> bool:
    """Whether every device of ``config`` holds slices of its own (federated dropout): none shares a pass."""
    return config.dropout_rate > 0
