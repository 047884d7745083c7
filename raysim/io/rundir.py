"""A run directory is claimed before anything is written: nothing is replaced unasked, and a run resumes only
from its own checkpoint, under its own config (``--overwrite``, ``--resume``)."""

from __future__ import annotations

import json
from pathlib import Path

from raysim.config import ExperimentConfig, first_difference, result_config, result_keys, with_defaults
from raysim.errors import ConfigError
from raysim.io import checkpoint as ckpt
from raysim.io.results import COMPLETE, run_summary


def claim(run_dir: Path, *, overwrite: bool) -> None:
    """Refuse to write a new run where one is, unless asked to replace it (and raysim wrote it: its summary)."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    summary = run_summary(run_dir)
    if overwrite and summary is not None:
        return
    if overwrite:
        raise ConfigError(f"{run_dir} is not a raysim run directory; --overwrite replaces only those (a "
                          f"summary.json that raysim wrote marks one)", field="output_dir")
    what = (f"a run (status {summary['status']}, {summary['rounds_completed']} of {summary['rounds']} rounds)"
            if summary is not None else "files")
    raise ConfigError(f"{run_dir} holds {what}: pass --resume to continue it or --overwrite to replace it",
                      field="output_dir")


def resumable(run_dir: Path, cfg: ExperimentConfig) -> dict[str, ckpt.State]:
    """The checkpoint to resume ``run_dir`` from, checked against ``cfg`` (keys that change results must match)."""
    if not (run_dir / ckpt.FILE).is_file():
        raise ConfigError(f"{run_dir} has no checkpoint to resume from", field="output_dir")
    status = json.loads((run_dir / "summary.json").read_text()).get("status")
    if status in COMPLETE:
        raise ConfigError(f"{run_dir}: the run ended ({status}); there is nothing to resume", field="output_dir")
    parts = ckpt.load(run_dir / ckpt.FILE)
    key = first_difference(result_keys(with_defaults(parts["run"].meta["config"])), result_config(cfg))
    if key is not None:
        raise ConfigError(f"differs from the run's config in {run_dir} (a resumed run keeps its config; only "
                          f"ray.*, progress, checkpoint.* and tracking.* may change)", field=key)
    return parts
