"""What a round reports: the device actors' records, and the rows of rounds.parquet and devices.parquet.

:class:`DeviceRecords` is what training reports per trained device, the one
type actors return and the pool gathers. :func:`device_columns` and
:func:`round_row` turn a round's cohort, costs, statuses, records and the
aggregator's stats into the files' rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from raysim.config import ExperimentConfig
from raysim.emulation.clock import DROPPED, OK, OOM, OVER_BUDGET, STRAGGLER, UNAVAILABLE, RoundOutcome
from raysim.emulation.costmodel import DeviceCosts, Limits
from raysim.io.results import ROW_FIELDS, RoundRow
from raysim.methods import base as methods
from raysim.privacy import local
from raysim.types import DeviceConfig, DeviceDraws


@dataclass(frozen=True)
class DeviceRecords:
    """Per trained device, as columns in one order."""

    device_id: np.ndarray  # int64
    train_loss: np.ndarray  # float64: mean loss over its local steps
    num_examples: np.ndarray  # int64: its training sequences
    update_norm: np.ndarray  # float64: L2 norm of its decoded update, before any processor (clipping)
    utility: np.ndarray  # float64: first-order held-out utility of its update (NaN unless asked)
    crossing: np.ndarray  # object: what crossed a split device's cut (raysim.split.protocol.Crossing), else None

    def __len__(self) -> int:
        return len(self.device_id)

    @classmethod
    def concat(cls, parts: list[DeviceRecords]) -> DeviceRecords:
        if not parts:
            return cls(np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64), np.empty(0), np.empty(0),
                       np.empty(0, object))
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    def by_device_id(self) -> DeviceRecords:
        order = np.argsort(self.device_id, kind="stable")
        return DeviceRecords(*(getattr(self, f.name)[order] for f in fields(self)))


def device_columns(rnd: int, draws: DeviceDraws, configs: list[DeviceConfig], costs: DeviceCosts,
                   status: np.ndarray, trained: np.ndarray, records: DeviceRecords,
                   cfg: ExperimentConfig, limits: Limits | None = None) -> dict[str, np.ndarray]:
    """One row per selected device; traffic and compute only where they happened.

    Available devices download the state unless their config is over their budgets; OOM devices stop before
    computing; only aggregated devices' uploads are accepted (the round is closed to stragglers; dropped
    devices never finish).
    """
    n = len(status)
    reached = (status != UNAVAILABLE) & (status != OVER_BUDGET)
    unlimited = np.full(n, math.inf)
    computed = reached & (status != OOM)
    ok = status == OK

    def per_device(values: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[trained] = values
        return out

    local_eps = np.full(n, math.nan)
    if cfg.privacy.local.enabled:
        local_eps[trained] = [local.device_epsilon(num_examples=int(k), cfg=cfg.privacy.local, train=cfg.train)
                              for k in records.num_examples]
    return {
        "round": np.full(n, rnd, dtype=np.int32),
        "device_id": draws.device_id,
        "device_class": draws.device_class.astype(str),
        **methods.columns(configs),
        "status": status.astype(str),
        "flops": np.where(computed, costs.flops, 0.0),
        "compute_s": np.where(computed, costs.compute_s, 0.0),
        "download_s": np.where(reached, costs.download_s, 0.0),
        "upload_s": np.where(ok, costs.upload_s, 0.0),
        "server_compute_s": np.where(computed, costs.server_compute_s, 0.0),
        "wire_s": np.where(computed, costs.wire_s, 0.0),
        "finish_s": np.where(computed, costs.total_s, math.nan),
        "bytes_up": np.where(ok, costs.bytes_up, 0),
        "bytes_down": np.where(reached, costs.bytes_down, 0),
        "wire_bytes_up": np.where(computed, costs.wire_bytes_up, 0),
        "wire_bytes_down": np.where(computed, costs.wire_bytes_down, 0),
        "setup_bytes_down": np.where(reached, costs.setup_bytes_down, 0),
        "peak_memory_bytes": costs.peak_memory_bytes,
        "memory_bytes": draws.memory_bytes.astype(np.int64),
        "memory_budget_bytes": unlimited if limits is None else limits.memory_bytes,
        "compute_budget_s": unlimited if limits is None else limits.compute_s,
        "upload_budget_bytes": unlimited if limits is None else limits.upload_bytes,
        "num_examples": per_device(records.num_examples, 0, np.int64).astype(np.int32),
        "train_loss": per_device(records.train_loss, math.nan, np.float64),
        "update_norm": per_device(records.update_norm, math.nan, np.float64),
        "utility": per_device(records.utility, math.nan, np.float64),
        "local_epsilon": local_eps,
    }


def round_row(rnd: int, *, sim_time_s: float, outcome: RoundOutcome, devices: dict[str, np.ndarray],
              costs: DeviceCosts, records: DeviceRecords, stats: dict) -> RoundRow:
    """The round's row: its clock, its devices' totals and the aggregator's stats (evaluation comes later)."""
    n = {s: int((outcome.status == s).sum()) for s in (OK, OOM, DROPPED, STRAGGLER, UNAVAILABLE, OVER_BUDGET)}
    examples = records.num_examples
    return RoundRow(
        round=rnd,
        sim_time_s=sim_time_s,
        round_duration_s=outcome.duration_s,
        train_loss=float(np.average(records.train_loss, weights=examples)) if len(examples) else math.nan,
        bytes_up=int(devices["bytes_up"].sum()),
        bytes_down=int(devices["bytes_down"].sum()),
        wire_bytes_up=int(devices["wire_bytes_up"].sum()),
        wire_bytes_down=int(devices["wire_bytes_down"].sum()),
        n_selected=len(outcome.status),
        n_completed=n[OK],
        n_dropped=n[DROPPED],
        n_oom=n[OOM],
        n_stragglers=n[STRAGGLER],
        n_unavailable=n[UNAVAILABLE],
        n_over_budget=n[OVER_BUDGET],
        mean_device_flops=float(costs.flops[devices["compute_s"] > 0].mean()) if n[OK] else math.nan,
        mean_peak_memory_bytes=float(costs.peak_memory_bytes.mean()) if len(outcome.status) else math.nan,
        **{k: v for k, v in stats.items() if k in ROW_FIELDS},  # update norm, truncation, the processors' (DP)
    )
