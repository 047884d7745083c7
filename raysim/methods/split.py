"""Split fine-tuning (split learning): the device keeps its inputs, its labels and the head; a server runs the rest.

``methods.split`` lists cut points: a device with cut ``c`` holds the token embedding, blocks ``0 .. c-1`` and
the classification head; the server holds blocks ``c ..`` and the final norm, with their adapters (P³EFT's
setting, Zmushko et al., arXiv 2412.16669, where the server hosts the whole body: there ``c`` is 0). Each local
step, the activations at the cut go up, the server's output at each sequence's classified position comes down,
its gradient goes up, and the gradient at the cut comes down when the device trains something below it.
:mod:`raysim.split` emulates that inside one actor, exactly, and measures what an honest-but-curious server
learns about the labels from what crosses; ``split.mechanism`` chooses how the device hides them.
null: the device trains the whole model itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raysim.methods.base import Method, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig
    from raysim.models.architectures import Sizes


def any_split(methods: Any) -> bool:
    """Whether some device of the method space trains split."""
    return any(v is not None for v in methods.split)


@register
class Split(Method):
    """The cut: blocks below it run on the device, the rest on the server (None: no split)."""

    key = "split"
    type = int | None
    default = None
    dtype = pa.int32()

    def check(self, value: int | None, cfg: ExperimentConfig) -> str | None:
        n = cfg.model.n_layer
        return None if value is None or 0 <= value < n else f"must be null (no split) or in [0, model.n_layer={n})"

    def check_all(self, values: list, cfg: ExperimentConfig) -> tuple[str, str] | None:
        if all(v is None for v in values):
            return None
        if cfg.data.task != "classification":
            return ("methods.split", "split devices keep the labels and a classification head: "
                                     "set data.task: classification")
        if cfg.privacy.local.enabled:
            return ("privacy.local.enabled", "local DP-SGD is not implemented for split devices (per-example "
                                             "gradients would cross the cut); use central DP (privacy.clip_norm)")
        return None

    def check_model(self, value: int | None, sizes: Sizes) -> str | None:
        if value is None or value < sizes.n_layer:
            return None
        return f"must be null (no split) or below the model's {sizes.n_layer} blocks"

    def shape(self, value: int | None, structure: dict, space: Any) -> None:
        structure["cut"] = value

    def order(self, value: int | None) -> int:
        return -1 if value is None else value

    def column(self, value: int | None) -> int:
        return -1 if value is None else value
