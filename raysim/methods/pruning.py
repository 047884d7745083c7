"""Structured width pruning per device: the share of every block's heads and MLP units it does not hold.

Which units a device holds is the window ``methods.pruning`` keeps (HeteroFL's
static prefix, FedRolex's rolling window; :mod:`raysim.methods.width`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysim.methods.base import Method, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig


def kept(total: int, ratio: float) -> int:
    """Units kept at ``ratio``: ``⌈(1 - ratio) total⌉``, at least one."""
    return max(1, math.ceil(round((1.0 - ratio) * total, 9)))


class WidthRatio(Method):
    """A share of every block's units a device does not hold."""

    type = float
    default = 0.0
    dtype = pa.float32()

    def check(self, value: float, cfg: ExperimentConfig) -> str | None:
        return None if 0.0 <= value < 1.0 else "must be in [0, 1)"

    def shape(self, value: float, structure: dict, space: Any) -> None:
        structure["heads"] = kept(structure["heads"], value)
        structure["mlp"] = kept(structure["mlp"], value)


@register
class PruneRatio(WidthRatio):
    """The share of heads and MLP units cut, in the window ``methods.pruning`` keeps."""

    key = "prune_ratio"
    feature_slot = 2
