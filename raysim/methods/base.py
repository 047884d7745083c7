"""The method seam: one class per per-device method, registered by name.

A per-device method is an axis of the method space. Its :class:`Method`
owns everything about it, so that nothing else in raysim lists the methods:

- its config axis: ``methods.<key>`` is a list of values (the first is the
  default), their type and their checks, with one-line errors;
- the :class:`DeviceConfig` field of the same name, one value per device;
- how a value shapes the device's submodel (:meth:`Method.shape`, the fields
  of :class:`raysim.methods.coordinates.Structure` it sets);
- its ``devices.parquet`` column, how configs sort into work groups, and what
  the ``rl`` policy's network sees of it.

:data:`METHODS` lists them in registration order, which is the order of the
method space's product, of a config's work key, and of the device columns.
:mod:`raysim.methods` imports every method's module in that order. What a
method does to the submodel beyond its shape (the coordinates its update
maps back to, the rows it sends) lives in its module, next to its class.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig
    from raysim.models.architectures import Sizes


class Method:
    """One per-device method: an axis of the method space. Subclasses set the class attributes."""

    key: str  # methods.<key> (a list), the DeviceConfig field, the devices.parquet column
    type: Any  # one value's type
    default: Any  # the value of DeviceConfig's default, and methods.<key>'s default list [default]
    dtype: pa.DataType  # the devices.parquet column's type
    # the place of this method's feature in the rl policy's per-config features (None: it has none). Shipped
    # policy checkpoints were trained on this order: a new method's feature goes after the existing ones
    feature_slot: int | None = None

    def full(self) -> Any:
        """The value full fine-tuning takes (device budgets stated as a fraction are fractions of its costs)."""
        return self.default

    def check(self, value: Any, cfg: ExperimentConfig) -> str | None:
        """What is wrong with one listed value in this experiment (None: nothing): the message of the one-line
        error naming ``methods.<key>[i]``."""
        return None

    def check_all(self, values: list, cfg: ExperimentConfig) -> tuple[str, str] | None:
        """What is wrong with the listed values together with the rest of the config: (the key to name, the
        message); None: nothing."""
        return None

    def check_model(self, value: Any, sizes: Sizes) -> str | None:
        """What is wrong with one value on the model the run really builds (``model.path`` decides its sizes)."""
        return None

    def shape(self, value: Any, structure: dict[str, Any], space: Any) -> None:
        """Set the submodel structure's fields this value decides (``structure`` starts full width, every block,
        no adapter rank, no embedding)."""

    def canonical(self, config: Any) -> Any:
        """The config with this method's value fixed where other methods make it meaningless."""
        return config

    def order(self, value: Any) -> Any:
        """The value's place in the total order on configs (work groups are formed in that order)."""
        return value

    def column(self, value: Any) -> Any:
        """The value as its ``devices.parquet`` column holds it."""
        return value

    def feature(self, values: np.ndarray) -> np.ndarray:
        """The ``rl`` policy's feature of each config of the method space, from this method's ``values``."""
        return np.asarray(values, dtype=np.float64)


METHODS: Registry[Method] = Registry("per-device method")


def register(cls: type[Method]) -> type[Method]:
    """Register a :class:`Method` subclass under its ``key`` (one instance: methods hold no state)."""
    METHODS.register(cls.key)(cls())
    return cls


@functools.cache
def device_config_class() -> type:
    """:class:`DeviceConfig` as the registered methods define it: one frozen, hashable field per method (made once,
    after :mod:`raysim.methods` has registered them all)."""
    cls = dataclasses.make_dataclass(
        "DeviceConfig", [(m.key, m.type, dataclasses.field(default=m.default)) for m in METHODS.values()],
        frozen=True)
    cls.__module__ = "raysim.methods"  # pickled by that name (Ray ships configs to the actors)
    cls.__doc__ = ("The method and configuration one device trains with in one round: one field per per-device "
                   "method (raysim.methods.base.METHODS). Hashable: the cost model caches measurements per config.")
    return cls


def column_schema() -> list[tuple[str, pa.DataType]]:
    """The ``devices.parquet`` columns of the methods, in registration order."""
    return [(m.key, m.dtype) for m in METHODS.values()]


def columns(configs: list) -> dict[str, np.ndarray]:
    """Per method, its column over ``configs``."""
    return {m.key: np.array([m.column(getattr(c, m.key)) for c in configs],
                            dtype=m.dtype.to_pandas_dtype()) for m in METHODS.values()}


def config_key(config: Any) -> tuple:
    """A total order on configs, method by method in registration order."""
    return tuple(m.order(getattr(config, m.key)) for m in METHODS.values())


def features(space: list) -> list[np.ndarray]:
    """The methods' ``rl`` features of each config of ``space``, in feature-slot order."""
    slotted = sorted((m for m in METHODS.values() if m.feature_slot is not None), key=lambda m: m.feature_slot)
    return [m.feature(np.array([getattr(c, m.key) for c in space], dtype=object)) for m in slotted]


def structure_fields(config: Any, space: Any, start: dict[str, Any]) -> dict[str, Any]:
    """The submodel structure's fields ``config`` gives, each method shaping ``start`` in turn."""
    fields = dict(start)
    for m in METHODS.values():
        m.shape(getattr(config, m.key), fields, space)
    return fields


def canonical(config: Any) -> Any:
    """``config`` with every method's value fixed where the others make it meaningless."""
    for m in METHODS.values():
        config = m.canonical(config)
    return config
