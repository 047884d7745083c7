"""Frozen dataclasses that cross module boundaries: what every hook sees."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raysim.methods import DeviceConfig  # noqa: F401  (one field per per-device method: raysim.methods.base)


@dataclass(frozen=True)
class DeviceDraws:
    """One profile draw per device of a cohort, in SI units: one numpy array per field, so that the scheduler
    and the cost model work on whole cohorts with array arithmetic."""

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


@dataclass(frozen=True)
class RoundState:
    """What a policy sees of the run when it assigns configs."""

    round: int
    sim_time_s: float
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    epsilon: float | None = None
    target: int | None = None  # updates that close the round (None: every selected device's)
