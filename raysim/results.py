"""The run directory: config.yaml, rounds.parquet, devices.parquet, summary.json.

Parquet files are written a row group per round as the run goes, so a run
stopped early keeps every finished round. Schemas are fixed here; the column
names are a contract (DESIGN.md) that users script against.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROUNDS_SCHEMA = pa.schema([
    ("round", pa.int32()),
    ("sim_time_s", pa.float64()),
    ("round_duration_s", pa.float64()),
    ("wall_time_s", pa.float64()),
    ("train_loss", pa.float64()),
    ("eval_loss", pa.float64()),
    ("eval_accuracy", pa.float64()),
    ("eval_top3_accuracy", pa.float64()),
    ("eval_perplexity", pa.float64()),
    ("epsilon", pa.float64()),
    ("delta", pa.float64()),
    ("bytes_up", pa.int64()),
    ("bytes_down", pa.int64()),
    ("n_selected", pa.int32()),
    ("n_completed", pa.int32()),
    ("n_dropped", pa.int32()),
    ("n_oom", pa.int32()),
    ("n_stragglers", pa.int32()),
    ("n_unavailable", pa.int32()),
    ("update_norm", pa.float64()),
    ("clip_norm", pa.float64()),  # DP-FedAvg's clip norm this round (NaN without central DP)
    ("noise_std", pa.float64()),  # std of the Gaussian noise on the sum of clipped updates (z * C; 0 without DP)
    ("signal_to_noise", pa.float64()),  # ||sum of clipped updates|| / ||noise||; inf without noise
    ("mean_device_flops", pa.float64()),  # training FLOPs per device that computed
    ("mean_peak_memory_bytes", pa.float64()),  # peak training memory of the selected devices' configs
    ("lora_truncation_error", pa.float64()),  # ‖ΔW - ΔW_r‖/‖ΔW‖ at the space's lowest LoRA rank
])

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


class RunWriter:
    """Appends rounds and device records; writes the summary at the end."""

    def __init__(self, run_dir: Path, *, config_yaml: str):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(config_yaml)
        self._rounds = pq.ParquetWriter(self.dir / "rounds.parquet", ROUNDS_SCHEMA)
        self._devices = pq.ParquetWriter(self.dir / "devices.parquet", DEVICES_SCHEMA)

    def write_round(self, row: dict, devices: dict[str, np.ndarray]) -> None:
        self._rounds.write_table(pa.Table.from_pylist([row], schema=ROUNDS_SCHEMA))
        self._devices.write_table(pa.Table.from_pydict(devices, schema=DEVICES_SCHEMA))

    def close(self, summary: dict | None = None) -> None:
        self._rounds.close()
        self._devices.close()
        if summary is not None:
            text = json.dumps(_jsonable(summary), indent=2, sort_keys=True)
            (self.dir / "summary.json").write_text(text + "\n")


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
