"""Layer-subset fine-tuning: a device trains only the top k blocks.

Freezing the lower blocks removes their activation storage and their
backward FLOPs (nothing below needs a gradient), which LoRA on every block
does not (Pfeiffer et al., arXiv 2411.07826). Blocks a device did not train
are left out of its update, so the server averages each block over the
devices that trained it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysim.methods.base import Method, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig
    from raysim.models.architectures import Sizes


def trained_blocks(n_layer: int, k: int | None) -> tuple[int, ...]:
    """Indices of the top ``k`` of ``n_layer`` blocks (None: all of them)."""
    k = n_layer if k is None else k
    return tuple(range(n_layer - k, n_layer))


@register
class TrainableLayers(Method):
    """How many of the top blocks a device trains (None: all)."""

    key = "trainable_layers"
    type = int | None
    default = None
    dtype = pa.int32()

    def check(self, value: int | None, cfg: ExperimentConfig) -> str | None:
        n = cfg.model.n_layer
        return None if value is None or 1 <= value <= n else f"must be null (all) or in [1, model.n_layer={n}]"

    def check_model(self, value: int | None, sizes: Sizes) -> str | None:
        if value is None or value <= sizes.n_layer:
            return None
        return f"must be null (all) or in [1, the model's {sizes.n_layer} blocks]"

    def shape(self, value: int | None, structure: dict, space: Any) -> None:
        structure["blocks"] = trained_blocks(space.n_layer, value)

    def order(self, value: int | None) -> int:
        return -1 if value is None else value  # None (all blocks) sorts first

    def column(self, value: int | None) -> int:
        return -1 if value is None else value
