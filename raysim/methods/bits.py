"""The bit-width a device's update travels at: 32 sends float32 values as they are, fewer bits quantize them
stochastically (:mod:`raysim.methods.quantize`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from raysim.methods.base import Method, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig

UNQUANTIZED = 32


@register
class Bits(Method):
    """Bits per value of a device's update (32: unquantized)."""

    key = "bits"
    type = int
    default = UNQUANTIZED
    dtype = pa.int32()
    feature_slot = 0

    def check(self, value: int, cfg: ExperimentConfig) -> str | None:
        return None if 1 <= value <= 16 or value == UNQUANTIZED else "must be in [1, 16] or 32 (unquantized)"

    def feature(self, values: np.ndarray) -> np.ndarray:
        return values.astype(np.float64) / UNQUANTIZED
