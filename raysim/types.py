"""Frozen dataclasses that cross module boundaries: what every hook sees."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from raysim.methods import DeviceConfig  # noqa: F401  (one field per per-device method: raysim.methods.base)


@dataclass(frozen=True)
class Budgets:
    """What each device of a cohort may spend on one round, as its profile states it (``budgets:`` in a device
    class or population file): one array per budget, ``inf`` where none is stated.

    A budget is stated absolutely (``*_bytes``, ``compute_s``) or as a fraction of what full fine-tuning of the
    experiment's model costs that device (``*_fraction``; Pfeiffer et al. state memory so); a device must keep
    within all of them (:func:`raysim.emulation.costmodel.budget_limits`).
    """

    memory_bytes: np.ndarray  # peak training memory the app may take
    memory_fraction: np.ndarray
    compute_s: np.ndarray  # seconds of local training per round
    compute_fraction: np.ndarray
    upload_bytes: np.ndarray  # bytes sent up per round (the update, and a split device's activations)
    upload_fraction: np.ndarray

    def select(self, index: np.ndarray) -> Budgets:
        return Budgets(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @property
    def fractions(self) -> bool:
        """Whether any device states a budget as a fraction of full fine-tuning."""
        return bool(np.isfinite(self.memory_fraction).any() or np.isfinite(self.compute_fraction).any()
                    or np.isfinite(self.upload_fraction).any())


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
    budgets: Budgets | None = None  # None: no device of the population states a budget

    def __len__(self) -> int:
        return len(self.device_id)

    def select(self, index: np.ndarray) -> DeviceDraws:
        """The draws of the devices at ``index`` (a mask or positions)."""
        arrays = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "budgets"}
        return DeviceDraws(**arrays, budgets=None if self.budgets is None else self.budgets.select(index))


@dataclass(frozen=True)
class RoundState:
    """What a policy sees of the run when it assigns configs."""

    round: int
    sim_time_s: float
    last_train_loss: float | None = None
    last_eval_loss: float | None = None
    epsilon: float | None = None
    target: int | None = None  # updates that close the round (None: every selected device's)
