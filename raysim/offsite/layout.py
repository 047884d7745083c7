"""Which blocks an emulator keeps, before any weight is looked at: the part of a spec that needs no model.

A model of ``n_layer`` blocks is cut into ``bottom`` adapter blocks, a middle of ``n_layer - bottom - top``
blocks and ``top`` adapter blocks (Offsite-Tuning's ``student_l_pad`` and ``student_r_pad``). The middle is what
the model owner compresses; :func:`uniform` is Offsite-Tuning's ``uniform_choose_layers``, :func:`groups` the
contiguous groups ScaleOT keeps one block of each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.errors import ConfigError
from raysim.registry import Registry

# emulators.<name>.kind names one; each is built by the method of that name of raysim.offsite.build's owner
KINDS: Registry[str] = Registry("emulator kind")
KINDS.register("uniform")("keep evenly spaced middle blocks (Offsite-Tuning's baseline)")
KINDS.register("distilled")("uniform, then its kept blocks trained to the full model's middle output")
KINDS.register("importance")("keep the middle blocks whose removal raises the public loss most")
KINDS.register("harmonizer")("ScaleOT's LayerReplace: the other middle blocks become trained residual MLPs")


@dataclass(frozen=True)
class Layout:
    n_layer: int
    bottom: int
    top: int
    keep: int  # middle blocks kept whole

    @property
    def middle(self) -> tuple[int, ...]:
        return tuple(range(self.bottom, self.n_layer - self.top))

    @property
    def adapters(self) -> tuple[int, ...]:
        """The blocks the device trains: the bottom and the top ones."""
        return tuple(range(self.bottom)) + tuple(range(self.n_layer - self.top, self.n_layer))


def layout(spec, n_layer: int) -> tuple[Layout | None, tuple[str, str] | None]:
    """The spec's layout on a model of ``n_layer`` blocks, or (None, (key, message)) for its first bad key."""
    if spec.bottom < 0 or spec.top < 0:
        return None, ("bottom" if spec.bottom < 0 else "top", "must be >= 0")
    middle = n_layer - spec.bottom - spec.top
    if middle < 1:
        return None, ("top", f"bottom + top ({spec.bottom} + {spec.top}) must leave a middle block of the model's "
                             f"{n_layer}")
    if spec.bottom + spec.top < 1:
        return None, ("bottom", "bottom + top must be >= 1: the device trains its adapter blocks")
    keep = -(-middle // 2) if spec.keep is None else spec.keep
    if not 1 <= keep <= middle:
        return None, ("keep", f"must be in [1, {middle}] (the middle blocks bottom and top leave of {n_layer})")
    return Layout(n_layer=n_layer, bottom=spec.bottom, top=spec.top, keep=keep), None


def checked(spec, n_layer: int, *, name: str) -> Layout:
    """:func:`layout`, or one ConfigError naming ``emulators.<name>.<key>``."""
    lay, bad = layout(spec, n_layer)
    if bad is not None:
        raise ConfigError(bad[1], field=f"emulators.{name}.{bad[0]}")
    return lay


def uniform(lay: Layout) -> tuple[int, ...]:
    """``keep`` of the middle blocks evenly spaced from its first to its last: middle index
    ``round(i * (L_mid - 1) / (keep - 1))`` for ``i = 0 .. keep-1`` (Python's round, half to even, as the
    Offsite-Tuning code's), as block indices."""
    n, k = len(lay.middle), lay.keep
    if k == 1:
        return (lay.middle[0],)
    stride = (n - 1) / (k - 1)
    return tuple(lay.middle[round(i * stride)] for i in range(k))


def groups(lay: Layout) -> list[tuple[int, ...]]:
    """The middle in ``keep`` contiguous groups of near-equal size (the first ones one larger)."""
    return [tuple(int(b) for b in g) for g in np.array_split(np.array(lay.middle), lay.keep)]


def most_important(scores: dict[int, float], blocks: tuple[int, ...], k: int) -> tuple[int, ...]:
    """The ``k`` blocks of ``blocks`` with the highest score (ties: the lower block), in block order."""
    ranked = sorted(blocks, key=lambda b: (-scores[b], b))
    return tuple(sorted(ranked[:k]))
