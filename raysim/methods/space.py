"""The method space: every ``DeviceConfig`` an experiment's ``methods.*`` lists allow."""

from __future__ import annotations

import itertools

from raysim.config import MethodsConfig
from raysim.types import DeviceConfig

AXES = ("lora_rank", "prune_ratio", "dropout_rate", "trainable_layers", "partial_embeddings", "bits")


def method_space(methods: MethodsConfig) -> list[DeviceConfig]:
    """The product of the ``methods.*`` lists, in list order (the first is the default)."""
    values = [list(dict.fromkeys(getattr(methods, axis))) for axis in AXES]
    return [DeviceConfig(**dict(zip(AXES, combo))) for combo in itertools.product(*values)]


def default_config(methods: MethodsConfig) -> DeviceConfig:
    """The first value of every axis."""
    return DeviceConfig(**{axis: getattr(methods, axis)[0] for axis in AXES})
