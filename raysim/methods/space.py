"""The method space: every ``DeviceConfig`` an experiment's ``methods.*`` lists allow."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from raysim.methods import DeviceConfig
from raysim.methods.base import METHODS, canonical

if TYPE_CHECKING:
    from raysim.config import MethodsConfig


def method_space(methods: MethodsConfig) -> list[DeviceConfig]:
    """The product of the ``methods.*`` lists, in list order (the first is the default), each config in its
    canonical form, once."""
    values = [list(dict.fromkeys(getattr(methods, key))) for key in METHODS]
    configs = (canonical(DeviceConfig(**dict(zip(METHODS, combo)))) for combo in itertools.product(*values))
    return list(dict.fromkeys(configs))


def default_config(methods: MethodsConfig) -> DeviceConfig:
    """The first value of every axis."""
    return canonical(DeviceConfig(**{key: getattr(methods, key)[0] for key in METHODS}))
