"""The Python API: run an experiment and read back what runs and studies wrote, from a script or a notebook.

``raysim.run(experiment, *overrides)`` is ``raysim run``: the same experiment
names and files, the same ``key=value`` overrides validated by the same code
(:func:`raysim.config.load_experiment`), the same ``resume`` and ``overwrite``.
:func:`load_run` and :func:`load_study` read a run directory and a study
folder as pyarrow tables and dicts, without torch or Ray.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from raysim.config import QUICKSTART, ExperimentConfig, load_experiment, parse_override
from raysim.errors import ConfigError
from raysim.io import shipped
from raysim.io.results import DEVICES_SCHEMA, ROUNDS_SCHEMA, part_files

OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")  # ``raysim run``'s rule: a first argument like this is an override


def experiment_config(experiment: str | Path | ExperimentConfig | None, overrides: list[str], *,
                      resume: str | Path | None = None) -> ExperimentConfig:
    """The validated config ``raysim run`` would run: ``experiment`` (a file, a shipped experiment's name, a
    config built in code, or None: the quickstart) under ``overrides``; with ``resume``, the run's own config."""
    if isinstance(experiment, str) and OVERRIDE.match(experiment):  # no experiment, only overrides
        experiment, overrides = None, [experiment, *overrides]
    if resume is not None:
        if experiment is not None:
            raise ConfigError("give an experiment or resume=RUN_DIR (which runs the run's config), not both")
        config = Path(resume) / "config.yaml"
        if not config.is_file():
            raise ConfigError("not a run directory (no config.yaml)", file=str(resume))
        # the run continues where it is, even if its folder moved (or its config left output_dir to the default)
        return load_experiment(config, overrides, layers=[("resume", {"output_dir": str(Path(resume).absolute())})])
    if isinstance(experiment, ExperimentConfig):
        layers = [("ExperimentConfig", dataclasses.asdict(experiment)),
                  *(("override", parse_override(item)) for item in overrides)]
        return load_experiment(None, None, layers=layers)
    return load_experiment(QUICKSTART if experiment is None else shipped.experiment(experiment), overrides)


def run(experiment: str | Path | ExperimentConfig | None = None, *overrides: str, resume: str | Path | None = None,
        overwrite: bool = False) -> Path:
    """Run an experiment to its end, as ``raysim run`` does; return its run directory.

    ``experiment``: a YAML file, a shipped experiment's name (``"quickstart"``; a file of that name in the working
    directory wins), an :class:`~raysim.config.ExperimentConfig`, or None (the quickstart). ``overrides``:
    ``key=value`` strings applied after it. ``resume``: a run directory to continue from its checkpoint (with its
    own config; then give no experiment); ``overwrite``: replace the run in ``output_dir``. Bad input raises
    :class:`~raysim.errors.ConfigError` before anything runs.
    """
    from raysim.engine.run import run_experiment

    if resume is not None and overwrite:
        raise ConfigError("resume continues a run and overwrite replaces it: give one")
    cfg = experiment_config(experiment, list(overrides), resume=resume)
    return run_experiment(cfg, resume=resume is not None, overwrite=overwrite)


@dataclass(frozen=True)
class RunResults:
    """A run directory read back (:func:`load_run`)."""

    path: Path
    config: dict  # config.yaml: the fully resolved config
    summary: dict  # summary.json (inf and NaN are None)
    rounds: pa.Table  # rounds.parquet: one row per finished round, labelled with the run's identity
    devices: pa.Table  # devices.parquet: one row per (round, selected device), labelled alike


@dataclass(frozen=True)
class StudyResults:
    """A comparison study's folder read back (:func:`load_study`)."""

    path: Path
    runs: dict[str, RunResults]  # run id -> run, every run that has started
    comparison: pa.Table | None  # comparison.parquet, one row per run; None until every run is done

    @property
    def rounds(self) -> pa.Table:
        """Every run's rounds as one table; ``run_id``, ``policy``, ``seed`` and the ``axis.*`` columns tell
        them apart."""
        return _concat([r.rounds for r in self.runs.values()], ROUNDS_SCHEMA)

    @property
    def devices(self) -> pa.Table:
        """Every run's device rows as one table, labelled as :attr:`rounds`."""
        return _concat([r.devices for r in self.runs.values()], DEVICES_SCHEMA)


def load_run(path: str | Path) -> RunResults:
    """The run in ``path``, finished or not: its config, summary and the tables of its finished rounds."""
    path = Path(path)
    for name in ("config.yaml", "summary.json"):
        if not (path / name).is_file():
            raise ConfigError(f"not a run directory (no {name})", file=str(path))
    return RunResults(path=path, config=OmegaConf.to_container(OmegaConf.load(path / "config.yaml")),
                      summary=json.loads((path / "summary.json").read_text()),
                      rounds=_table(path, "rounds.parquet", ROUNDS_SCHEMA),
                      devices=_table(path, "devices.parquet", DEVICES_SCHEMA))


def load_study(path: str | Path) -> StudyResults:
    """The study in ``path`` (what ``raysim compare`` writes): its runs so far, and its comparison once done."""
    path = Path(path)
    if not (path / "runs").is_dir():
        raise ConfigError("not a study folder (no runs/)", file=str(path))
    runs = {d.name: load_run(d) for d in sorted(p.parent for p in (path / "runs").glob("*/summary.json"))}
    comparison = path / "comparison.parquet"
    return StudyResults(path=path, runs=runs, comparison=pq.read_table(comparison) if comparison.is_file() else None)


def _table(run_dir: Path, name: str, schema: pa.Schema) -> pa.Table:
    """One of a run's tables with every column its parts hold; empty, with ``schema``, before its first round."""
    path = run_dir / name
    return pq.read_table(path) if path.is_file() or part_files(run_dir, name) else schema.empty_table()


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables(tables, promote_options="default") if tables else schema.empty_table()
