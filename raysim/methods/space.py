"""The method space: every ``DeviceConfig`` an experiment's ``methods.*`` lists allow."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from raysim.methods.base import METHODS, canonical, device_config_class

if TYPE_CHECKING:
    from raysim.config import MethodsConfig
    from raysim.methods import DeviceConfig


def method_space(methods: MethodsConfig) -> list[DeviceConfig]:
    """The product of the ``methods.*`` lists, in list order (the first is the default), each config in its
    canonical form, once."""
    values = [list(dict.fromkeys(getattr(methods, key))) for key in METHODS]
    config = device_config_class()
    configs = (canonical(config(**dict(zip(METHODS, combo)))) for combo in itertools.product(*values))
    return list(dict.fromkeys(configs))


def full_config() -> DeviceConfig:
    """Full fine-tuning: every method at the value that trains the whole model (device budgets stated as a
    fraction are fractions of its costs), whatever the method space holds."""
    return canonical(device_config_class()(**{key: m.full() for key, m in METHODS.items()}))


def default_config(methods: MethodsConfig) -> DeviceConfig:
    """The first value of every axis."""
    return canonical(device_config_class()(**{key: getattr(methods, key)[0] for key in METHODS}))
