"""Offsite-tuning per device (Xiao et al. 2023; ScaleOT, Yao et al. 2024): the device trains adapter blocks on a
compressed stand-in of a model it never receives.

``methods.emulator`` lists names of ``emulators.<name>`` specs (null: the device holds the full model). A device
with an emulator trains only its ``bottom`` and ``top`` adapter blocks (intersected with
``methods.trainable_layers``); the middle is the emulator's, fixed as the model owner shipped it
(:mod:`raysim.offsite`). Its update is in the full model's coordinates, so the server plugs it into the full model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysim.methods.base import Method, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig


def listed(methods: Any) -> list[str]:
    """The emulators the method space names, in list order, once each."""
    return [v for v in dict.fromkeys(methods.emulator) if v is not None]


@register
class EmulatorName(Method):
    """The emulator a device trains on (None: the full model)."""

    key = "emulator"
    type = str | None
    default = None
    dtype = pa.string()

    def check(self, value: str | None, cfg: ExperimentConfig) -> str | None:
        if value is None or value in cfg.emulators:
            return None
        defined = ", ".join(cfg.emulators) or "none"
        return f"names no emulator: define emulators.{value} (defined: {defined})"

    def check_all(self, values: list, cfg: ExperimentConfig) -> tuple[str, str] | None:
        if all(v is None for v in values):
            return None
        m = cfg.methods
        if any(v is not None for v in m.split):
            return ("methods.split", "emulator devices train their own adapter blocks: they are not split too")
        from raysim.methods import space, width  # (they import the registry this module registers with)

        if any(c.emulator is not None and width.narrowed(c) for c in space.method_space(m)):
            return ("methods.emulator", "emulator devices hold their blocks at full width: no config with an "
                                        "emulator may prune or drop units")
        return None

    def shape(self, value: str | None, structure: dict, space: Any) -> None:
        if value is None:
            return
        structure["emulator"] = value
        adapters = space.emulator_layout(value).adapters
        structure["blocks"] = tuple(b for b in structure["blocks"] if b in adapters)

    def order(self, value: str | None) -> str:
        return "" if value is None else value
