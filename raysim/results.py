"""The run directory: config.yaml, rounds.parquet, devices.parquet, summary.json.

Parquet files are written a part per round as the run goes, each atomically,
so a run stopped at any moment (kill -9 included) keeps every finished round. Schemas are fixed here (a round's
row is the typed :class:`RoundRow`); the column names are a contract
(DESIGN.md) that users script against.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# summary.json statuses of a run that stopped cleanly (a study skips them; their final state is written)
COMPLETE = ("finished", "target_reached", "privacy_budget_spent")


def _column(arrow: pa.DataType, default=MISSING, *, doc: str = ""):
    return field(default=default, metadata={"arrow": arrow, "doc": doc})


@dataclass(frozen=True, kw_only=True)
class RoundRow:
    """One row of ``rounds.parquet``; its fields, in order, are the file's columns."""

    round: int = _column(pa.int32())
    sim_time_s: float = _column(pa.float64(), doc="cumulative virtual seconds")
    round_duration_s: float = _column(pa.float64())
    wall_time_s: float = _column(pa.float64(), math.nan)
    train_loss: float = _column(pa.float64())
    eval_loss: float = _column(pa.float64(), math.nan)
    eval_accuracy: float = _column(pa.float64(), math.nan)
    eval_top3_accuracy: float = _column(pa.float64(), math.nan)
    eval_perplexity: float = _column(pa.float64(), math.nan)
    epsilon: float = _column(pa.float64(), math.inf, doc="inf (delta 0): no central DP in this run")
    delta: float = _column(pa.float64(), 0.0)
    bytes_up: int = _column(pa.int64())
    bytes_down: int = _column(pa.int64())
    n_selected: int = _column(pa.int32())
    n_completed: int = _column(pa.int32())
    n_dropped: int = _column(pa.int32())
    n_oom: int = _column(pa.int32())
    n_stragglers: int = _column(pa.int32())
    n_unavailable: int = _column(pa.int32())
    update_norm: float = _column(pa.float64())
    clip_norm: float = _column(pa.float64(), math.nan, doc="DP-FedAvg's clip norm this round (NaN without central DP)")
    noise_std: float = _column(pa.float64(), 0.0, doc="std of the noise on the sum of clipped updates (z * C)")
    signal_to_noise: float = _column(pa.float64(), math.inf, doc="||sum of clipped updates|| / ||noise||")
    noised_dims: int = _column(pa.int64(), 0, doc="coordinates the noise covered: those some config can change")
    mean_device_flops: float = _column(pa.float64(), doc="training FLOPs per device that computed")
    mean_peak_memory_bytes: float = _column(pa.float64(), doc="peak training memory of the selected devices' configs")
    lora_truncation_error: float = _column(pa.float64(), doc="‖ΔW - ΔW_r‖/‖ΔW‖ at the space's lowest LoRA rank")


ROW_FIELDS = frozenset(f.name for f in fields(RoundRow))
ROUNDS_SCHEMA = pa.schema([(f.name, f.metadata["arrow"]) for f in fields(RoundRow)])


@dataclass(frozen=True)
class RoundResult:
    """What a round produced: its row and one record per selected device (``DEVICES_SCHEMA`` columns)."""

    row: RoundRow
    devices: dict[str, np.ndarray]
    started_s: float  # time.perf_counter() when the round began

    def with_metrics(self, metrics: dict[str, float]) -> RoundResult:
        return replace(self, row=replace(self.row, **metrics)) if metrics else self


DEVICES_SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("device_id", pa.int64()),
    ("device_class", pa.string()),
    ("lora_rank", pa.int32()),
    ("prune_ratio", pa.float32()),
    ("dropout_rate", pa.float32()),
    ("trainable_layers", pa.int32()),
    ("partial_embeddings", pa.bool_()),
    ("bits", pa.int32()),
    ("status", pa.string()),
    ("flops", pa.float64()),
    ("compute_s", pa.float64()),
    ("download_s", pa.float64()),
    ("upload_s", pa.float64()),
    ("finish_s", pa.float64()),
    ("bytes_up", pa.int64()),
    ("bytes_down", pa.int64()),
    ("peak_memory_bytes", pa.int64()),
    ("memory_bytes", pa.int64()),
    ("num_examples", pa.int32()),
    ("train_loss", pa.float64()),
    ("update_norm", pa.float64()),  # L2 norm of the decoded update before any clipping
    ("utility", pa.float64()),  # first-order relative held-out loss drop of the update alone (rl; NaN otherwise)
    ("local_epsilon", pa.float64()),  # record-level ε of this local training (local DP-SGD; NaN without)
])


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a file of the same name in a hidden folder beside ``path``, then rename it over ``path``: a
    kill at any moment leaves the old file or the new one, never a part of either (readers skip names that
    start with a dot; the same name keeps formats that record it, as torch.save does, byte-identical)."""
    tmp = path.parent / ".tmp" / path.name
    tmp.parent.mkdir(exist_ok=True)
    write(tmp)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # another write may be using the folder
        tmp.parent.rmdir()


def part_name(rnd: int) -> str:
    return f"round-{rnd:06d}.parquet"


def read_parts(path: Path, schema: pa.Schema) -> pa.Table:
    """A table written a part per round (``rounds.parquet``, ``devices.parquet``: a folder, or one file from
    raysim before 0.2); empty with ``schema`` when no round finished."""
    if path.is_dir() and not any(path.glob("round-*.parquet")):
        return schema.empty_table()
    return pq.read_table(path, schema=schema)


class RunWriter:
    """The run directory, written so that a kill at any moment leaves every finished round readable.

    ``rounds.parquet`` and ``devices.parquet`` are folders of one Parquet file
    per round (``round-000001.parquet``), each written under a hidden name and
    renamed: ``pyarrow.parquet.read_table(run_dir / "rounds.parquet")`` reads
    the finished rounds as one table. ``summary.json`` is replaced the same
    way whenever it changes.
    """

    def __init__(self, run_dir: Path, *, config_yaml: str | None):
        """``config_yaml``: the resolved config of a new run (None: a resumed run keeps its own)."""
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        for folder in ("rounds.parquet", "devices.parquet"):
            (self.dir / folder).mkdir(exist_ok=True)
        if config_yaml is not None:
            atomic_write(self.dir / "config.yaml", lambda tmp: tmp.write_text(config_yaml))

    def write_round(self, result: RoundResult) -> None:
        name = part_name(result.row.round)
        rows = pa.Table.from_pylist([asdict(result.row)], schema=ROUNDS_SCHEMA)
        devices = pa.Table.from_pydict(result.devices, schema=DEVICES_SCHEMA)
        atomic_write(self.dir / "devices.parquet" / name, lambda tmp: pq.write_table(devices, tmp))
        atomic_write(self.dir / "rounds.parquet" / name, lambda tmp: pq.write_table(rows, tmp))

    def forget_after(self, rnd: int) -> None:
        """Remove the parts of rounds after ``rnd`` (a resumed run redoes them)."""
        for folder in ("rounds.parquet", "devices.parquet"):
            for part in (self.dir / folder).glob("round-*.parquet"):
                if int(part.stem.split("-")[1]) > rnd:
                    part.unlink()

    def write_summary(self, summary: dict) -> None:
        text = json.dumps(_jsonable(summary), indent=2, sort_keys=True) + "\n"
        atomic_write(self.dir / "summary.json", lambda tmp: tmp.write_text(text))


def _jsonable(value):
    """JSON has no inf/nan: write them as null."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
