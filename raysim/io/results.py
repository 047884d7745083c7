"""The run directory: config.yaml, rounds.parquet, devices.parquet, summary.json.

Parquet files are written a part per round as the run goes, each atomically,
so a run stopped at any moment (kill -9 included) keeps every finished round. Schemas are fixed here (a round's
row is the typed :class:`RoundRow`); the column names are a contract
(README, *The run directory*) that users script against. Every row also carries its run's
:class:`RunIdentity` (run id, name, seed, policy, a study's axis values), so
that the parts of many runs read as one labelled table.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysim.methods import base as methods

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig

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
    wire_bytes_up: int = _column(pa.int64(), 0, doc="split devices' per-step traffic up (activations, gradients)")
    wire_bytes_down: int = _column(pa.int64(), 0, doc="split devices' per-step traffic down")
    n_selected: int = _column(pa.int32())
    n_completed: int = _column(pa.int32())
    n_dropped: int = _column(pa.int32())
    n_oom: int = _column(pa.int32())
    n_stragglers: int = _column(pa.int32())
    n_unavailable: int = _column(pa.int32())
    n_over_budget: int = _column(pa.int32(), 0, doc="available devices whose config exceeds a budget they state")
    update_norm: float = _column(pa.float64())
    clip_norm: float = _column(pa.float64(), math.nan, doc="DP-FedAvg's clip norm this round (NaN without central DP)")
    noise_std: float = _column(pa.float64(), 0.0, doc="std of the noise on the sum of clipped updates (z * C)")
    signal_to_noise: float = _column(pa.float64(), math.inf, doc="||sum of clipped updates|| / ||noise||")
    noised_dims: int = _column(pa.int64(), 0, doc="coordinates the noise covered: those some config can change")
    off_support_norm: float = _column(pa.float64(), math.nan, doc="L2 norm of what devices sent outside the noised "
                                      "coordinates, discarded before release: 0.0, or the run fails (NaN without "
                                      "central DP)")
    mean_device_flops: float = _column(pa.float64(), doc="training FLOPs per device that computed")
    mean_peak_memory_bytes: float = _column(pa.float64(), doc="peak training memory of the selected devices' configs")
    lora_truncation_error: float = _column(pa.float64(), doc="‖ΔW - ΔW_r‖/‖ΔW‖ at the space's lowest LoRA rank")
    label_leakage: float = _column(pa.float64(), math.nan, doc="the best attack below on what crossed split devices' "
                                   "cuts this round (NaN: nothing was split)")
    leakage_kmeans_activations: float = _column(pa.float64(), math.nan, doc="k-means on the server's outputs, "
                                                "best-permutation accuracy")
    leakage_spectral_activations: float = _column(pa.float64(), math.nan, doc="top singular direction of the "
                                                  "server's outputs, max(AUC, 1 - AUC); binary labels")
    leakage_norm_activations: float = _column(pa.float64(), math.nan, doc="their L2 norm as a score, max(AUC, "
                                              "1 - AUC); binary labels")
    leakage_probe_activations: float = _column(pa.float64(), math.nan, doc="a logistic probe on them, 3-fold "
                                               "cross-validated accuracy")
    leakage_kmeans_gradients: float = _column(pa.float64(), math.nan, doc="as above, on the gradients sent up")
    leakage_spectral_gradients: float = _column(pa.float64(), math.nan)
    leakage_norm_gradients: float = _column(pa.float64(), math.nan)
    leakage_probe_gradients: float = _column(pa.float64(), math.nan)
    emulator_eval_loss: float = _column(pa.float64(), math.nan, doc="offsite-tuning: the held-out loss of the "
                                        "method space's first emulator alone with the global adapters (eval_loss "
                                        "is theirs plugged into the full model); NaN without an emulator")
    emulator_eval_accuracy: float = _column(pa.float64(), math.nan, doc="its top-1 accuracy")


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
    *methods.column_schema(),  # one column per per-device method
    ("status", pa.string()),
    ("flops", pa.float64()),
    ("compute_s", pa.float64()),
    ("download_s", pa.float64()),
    ("upload_s", pa.float64()),
    ("server_compute_s", pa.float64()),  # split devices: the server's compute for them (server.train_gflops, shared)
    ("wire_s", pa.float64()),  # split devices: the local steps' round trips and traffic on the device's link
    ("finish_s", pa.float64()),
    ("bytes_up", pa.int64()),
    ("bytes_down", pa.int64()),
    ("wire_bytes_up", pa.int64()),  # split devices: activations and gradients sent up over the round's steps
    ("wire_bytes_down", pa.int64()),  # split devices: the server's outputs and cut gradients sent down
    ("setup_bytes_down", pa.int64()),  # a one-time download before training (an emulator, at the first round with it)
    ("peak_memory_bytes", pa.int64()),
    ("memory_bytes", pa.int64()),
    # the limits the device's budgets set on this round (inf: none; a fraction resolved against full fine-tuning)
    ("memory_budget_bytes", pa.float64()),
    ("compute_budget_s", pa.float64()),
    ("upload_budget_bytes", pa.float64()),
    ("num_examples", pa.int32()),
    ("train_loss", pa.float64()),
    ("update_norm", pa.float64()),  # L2 norm of the decoded update before any clipping
    ("utility", pa.float64()),  # first-order relative held-out loss drop of the update alone (rl; NaN otherwise)
    ("local_epsilon", pa.float64()),  # record-level ε of this local training (local DP-SGD; NaN without)
])


IDENTITY_SCHEMA = pa.schema([("run_id", pa.string()), ("name", pa.string()), ("seed", pa.int64()),
                             ("policy", pa.string())])
AXIS_PREFIX = "axis."  # a study's axis values: one string column per axis key, ``axis.<key>``
TABLES = ("rounds.parquet", "devices.parquet")


@dataclass(frozen=True)
class RunIdentity:
    """What every row of a run's tables says about the run: constant columns appended after the data's."""

    run_id: str  # the run directory's name (a study's run id)
    name: str
    seed: int
    policy: str  # the policy's name, as summary.json records it
    axes: dict[str, str] = field(default_factory=dict)  # a study's axis key -> value (as text)

    @classmethod
    def of(cls, cfg: ExperimentConfig, *, run_dir: Path, policy: str) -> RunIdentity:
        return cls(run_id=run_dir.name, name=cfg.name, seed=cfg.seed, policy=policy, axes=dict(cfg.study_axes))

    def schema(self) -> pa.Schema:
        return pa.schema([*IDENTITY_SCHEMA, *((f"{AXIS_PREFIX}{k}", pa.string()) for k in self.axes)])

    def label(self, table: pa.Table) -> pa.Table:
        """``table`` less any identity columns it had, with this run's appended."""
        values = [self.run_id, self.name, self.seed, self.policy, *self.axes.values()]
        table = table.drop_columns([n for n in table.column_names if n in IDENTITY_SCHEMA.names
                                    or n.startswith(AXIS_PREFIX)])
        for column, value in zip(self.schema(), values):
            table = table.append_column(column, pa.array([value] * table.num_rows, column.type))
        return table


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a file of the same name in a hidden folder of its own beside ``path``, then rename it over
    ``path``: a kill at any moment leaves the old file or the new one, never a part of either, and writers of
    one path at once (runs filling one cache entry) never share a temporary file. Readers skip names that
    start with a dot; the same name keeps formats that record it, as torch.save does, byte-identical."""
    folder = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        tmp = folder / path.name
        write(tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_summary(run_dir: Path) -> dict | None:
    """``run_dir``'s summary.json if raysim wrote it, else None. A run writes it before anything slow and
    always with raysim's version, so a folder that merely holds a config.yaml, or another tool's summary.json,
    is not a run."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    is_run = (isinstance(summary, dict) and isinstance(summary.get("versions"), dict)
              and "raysim" in summary["versions"] and {"status", "rounds", "rounds_completed"} <= summary.keys())
    return summary if is_run else None


def part_name(rnd: int) -> str:
    return f"round-{rnd:06d}.parquet"


def part_files(run_dir: Path, table: str) -> list[Path]:
    """The finished rounds' files of ``table`` (one of :data:`TABLES`), in round order."""
    return sorted((run_dir / table).glob("round-*.parquet"))


def label_parts(run_dir: Path, identity: RunIdentity) -> None:
    """Give every part of the run's tables ``identity``'s columns, rewriting (atomically) only those without
    them: parts written before raysim labelled its rows, or in a run folder since renamed. The rewritten
    files are the ones this raysim would have written."""
    names = identity.schema().names
    for part in (part for name in TABLES for part in part_files(run_dir, name)):
        table = pq.read_table(part)
        labelled = identity.label(table)
        if table.schema != labelled.schema or not table.select(names).equals(labelled.select(names)):
            atomic_write(part, lambda tmp, labelled=labelled: pq.write_table(labelled, tmp))


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

    def __init__(self, run_dir: Path, *, config_yaml: str | None, identity: RunIdentity | None = None):
        """``config_yaml``: the resolved config of a new run (None: a resumed run keeps its own); ``identity``
        labels every row (None: rows without identity columns, as a hand-made run's)."""
        self.dir, self.identity = run_dir, identity
        self.dir.mkdir(parents=True, exist_ok=True)
        for folder in TABLES:
            (self.dir / folder).mkdir(exist_ok=True)
        if config_yaml is not None:
            atomic_write(self.dir / "config.yaml", lambda tmp: tmp.write_text(config_yaml))

    def write_round(self, result: RoundResult) -> None:
        name = part_name(result.row.round)
        rows = self._label(pa.Table.from_pylist([asdict(result.row)], schema=ROUNDS_SCHEMA))
        devices = self._label(pa.Table.from_pydict(result.devices, schema=DEVICES_SCHEMA))
        atomic_write(self.dir / "devices.parquet" / name, lambda tmp: pq.write_table(devices, tmp))
        atomic_write(self.dir / "rounds.parquet" / name, lambda tmp: pq.write_table(rows, tmp))

    def resume_after(self, rnd: int) -> None:
        """Remove the parts of rounds after ``rnd`` (a resumed run redoes them) and what writes cut short by
        the stop left (:func:`atomic_write`'s folders: this run is the folder's only writer); label the other
        parts as this run's (those written before raysim labelled rows get the columns, so that the folder
        reads as one table)."""
        for folder in (self.dir, *(self.dir / name for name in TABLES)):
            for stale in folder.glob(".tmp*"):
                shutil.rmtree(stale)
        for folder in TABLES:
            for part in part_files(self.dir, folder):
                if int(part.stem.split("-")[1]) > rnd:
                    part.unlink()
        if self.identity is not None:
            label_parts(self.dir, self.identity)

    def _label(self, table: pa.Table) -> pa.Table:
        return table if self.identity is None else self.identity.label(table)

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
