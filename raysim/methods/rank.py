"""The LoRA rank per device (Hu et al. 2021): 0 trains the targeted weights themselves.

Devices of different ranks are aggregated by the run's LoRA rule
(``aggregation.lora``, :mod:`raysim.aggregation.lora`, over the factor math of
:mod:`raysim.methods.lora`); the state holds what the rule needs at the
largest listed rank.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raysim.methods.base import Method, register

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig, MethodsConfig
    from raysim.models.architectures import Sizes

ADAPTERS_ONLY = "local DP-SGD trains LoRA adapters only: no rank 0, no partial embeddings"


@register
class LoraRank(Method):
    """The rank of the LoRA adapter a device trains; 0: the targeted weights themselves; None: its adapter family
    has no rank."""

    key = "lora_rank"
    type = int
    default = 8
    dtype = pa.int32()
    feature_slot = 1

    def full(self) -> int:
        return 0  # full fine-tuning trains the targeted weights themselves

    def check(self, value: int, cfg: ExperimentConfig) -> str | None:
        width = cfg.model.n_embd
        return None if 0 <= value <= width else f"rank {value} must be in [0, layer width {width}]"

    def check_all(self, values: list, cfg: ExperimentConfig) -> tuple[str, str] | None:
        from raysim.aggregation.lora import LORA_RULES

        if cfg.privacy.local.enabled and 0 in values:
            return "privacy.local.enabled", ADAPTERS_ONLY
        rule = LORA_RULES.get(cfg.aggregation.lora)
        if rule is not None and not rule.dense and 0 in values:
            dense = " or ".join(name for name, r in LORA_RULES.items() if r.dense)
            return (f"methods.{self.key}", f"rank 0 (full weights) needs a LoRA rule that holds ΔW "
                    f"(aggregation.lora={dense}): {cfg.aggregation.lora} aggregates factors")
        return None

    def check_model(self, value: int, sizes: Sizes) -> str | None:
        return None if value <= sizes.width else f"rank {value} must be in [0, the model's layer width {sizes.width}]"

    def shape(self, value: int | None, structure: dict, space: Any) -> None:
        structure["rank"] = value

    def canonical(self, config: Any) -> Any:
        from raysim.methods.adapter import FAMILIES

        if config.lora_rank is None or FAMILIES[config.adapter].ranked:
            return config
        return dataclasses.replace(config, lora_rank=None)  # a family without ranks: one config, not one per rank

    def order(self, value: int | None) -> int:
        return -1 if value is None else value

    def column(self, value: int | None) -> int:
        return -1 if value is None else value

    def feature(self, values: np.ndarray) -> np.ndarray:
        ranks = np.array([0 if v is None else v for v in values], dtype=np.float64)
        return ranks / max(1.0, ranks.max())


def max_rank(methods: MethodsConfig) -> int:
    """The largest rank listed: the rank factor-holding LoRA rules keep in the state."""
    return max(methods.lora_rank)


def truncation_rank(methods: MethodsConfig) -> int:
    """The smallest adapter rank listed (0: none, or no family with ranks): the rank whose truncation error
    rounds.parquet reports."""
    from raysim.methods.adapter import FAMILIES

    if not any(FAMILIES[name].ranked for name in methods.adapter):
        return 0
    return min((r for r in methods.lora_rank if r > 0), default=0)
