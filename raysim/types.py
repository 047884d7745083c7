"""Frozen dataclasses that cross module boundaries: what every hook sees."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from raysim.methods import DeviceConfig  # noqa: F401  (one field per per-device method: raysim.methods.base)


@dataclass(frozen=True)
class DeviceProfile:
    """One device's draw from its class: what it can do, in SI units."""

    device_id: int
    device_class: str
    train_flops_per_s: float
    memory_bytes: float
    uplink_bps: float
    downlink_bps: float
    rtt_s: float
    dropout_prob: float


@dataclass(frozen=True)
class DeviceDraws:
    """Profile draws for many devices at once, one numpy array per field.

    The columnar twin of :class:`DeviceProfile`: the scheduler and cost model
    work on whole cohorts with array arithmetic; ``row(i)`` gives one profile.
    """

    device_id: np.ndarray  # int64
    device_class: np.ndarray  # str (object)
    train_flops_per_s: np.ndarray
    memory_bytes: np.ndarray
    uplink_bps: np.ndarray
    downlink_bps: np.ndarray
    rtt_s: np.ndarray
    dropout_prob: np.ndarray

    def __len__(self) -> int:
        return len(self.device_id)

    def row(self, i: int) -> DeviceProfile:
        numbers = {f.name: float(getattr(self, f.name)[i]) for f in fields(self)[2:]}
        return DeviceProfile(device_id=int(self.device_id[i]), device_class=str(self.device_class[i]), **numbers)


@dataclass(frozen=True)
class RoundState:
    """What a policy sees of the run when it assigns configs."""

    round: int
    sim_time_s: float
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    epsilon: float | None = None
    target: int | None = None  # updates that close the round (None: every selected device's)
