"""Layer-subset fine-tuning: a device trains only the top k blocks.

Freezing the lower blocks removes their activation storage and their
backward FLOPs (nothing below needs a gradient), which LoRA on every block
does not (Pfeiffer et al., arXiv 2411.07826). Blocks a device did not train
are left out of its update, so the server averages each block over the
devices that trained it.
"""

from __future__ import annotations


def trained_blocks(n_layer: int, k: int | None) -> tuple[int, ...]:
    """Indices of the top ``k`` of ``n_layer`` blocks (None: all of them)."""
    k = n_layer if k is None else k
    return tuple(range(n_layer - k, n_layer))
