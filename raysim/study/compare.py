"""Comparison studies: ``raysim compare STUDY.yaml [key=value ...]``.

A study is a base experiment (a path or an inline mapping) and axes: lists of
values for experiment keys (``policy``, ``seed``, ``population``, or any other
key such as ``cohort.size``). Every combination is one run; runs that share a
seed share their device draws, cohorts' randomness, data and model, since all
of these are keyed by the seed, so policies meet identical conditions.

The study folder holds ``runs/<run id>/`` and, once all runs are done,
``comparison.parquet`` (one row per run) and ``report.md`` with plots. Every
row of a run's tables carries its axis values (``axis.<key>``, see
:class:`raysim.io.results.RunIdentity`), so the runs' parts read as one labelled
table. A study started again skips every run whose summary says it stopped cleanly under the
same resolved config, resumes unfinished ones from their checkpoints, and moves any other run it replaces to
``superseded/<timestamp>/runs/``. With ``parallel: N > 1`` up to N runs share the Ray
cluster at once, each with its share of the CPUs as device actors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, ListConfig, OmegaConf

from raysim.config import (
    ExperimentConfig,
    first_difference,
    load_experiment,
    load_mapping,
    parse_override,
    result_keys,
    to_yaml,
    with_defaults,
)
from raysim.errors import ConfigError
from raysim.io import checkpoint as ckpt
from raysim.io.caches import Caches
from raysim.io.paths import absolute
from raysim.io.results import COMPLETE, RunIdentity, atomic_write, label_parts
from raysim.policies import policy_identity, read_policy
from raysim.study.report import run_label, run_metrics, write_report

STUDY_KEYS = ("name", "description", "output_dir", "parallel", "experiment", "axes")
LABELS = ("policy", "seed", "population")


@dataclass(frozen=True)
class StudyRun:
    run_id: str
    values: dict[str, Any]  # axis key -> value
    cfg: ExperimentConfig


@dataclass(frozen=True)
class Study:
    name: str
    output_dir: Path
    parallel: int
    axes: dict[str, list]
    runs: list[StudyRun]


def run_id(values: dict[str, Any]) -> str:
    """A folder name for one combination of axis values, e.g. ``policy-rl_seed-0``."""
    parts = []
    for key, value in values.items():
        text = Path(value).stem if isinstance(value, str) and value.endswith((".yaml", ".yml")) else str(value)
        if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            text = "+".join(str(v["name"]) for v in value)  # a list of named items (pretrain.sources)
        parts.append(f"{key.split('.')[-1]}-{text}")
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", "_".join(parts)) or "run"


def load_study(path: str | Path, overrides: list[str] | None = None) -> Study:
    """Read a study and resolve every run's config; bad input is a ConfigError naming the field.

    Overrides whose key starts with a study key (``axes.seed=[0]``,
    ``parallel=2``) change the study; others change the base experiment.
    """
    path = Path(path)
    study = load_mapping(path, kind="study")
    experiment_overrides = []
    for item in overrides or []:
        if item.split("=", 1)[0].split(".")[0] in STUDY_KEYS:
            study = OmegaConf.merge(study, parse_override(item))
        else:
            experiment_overrides.append(parse_override(item))
    unknown = sorted(set(study) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"unknown key (accepted: {', '.join(STUDY_KEYS)})", file=str(path), field=unknown[0])
    axes = study.get("axes")
    if not isinstance(axes, DictConfig) or not axes:
        raise ConfigError("needs a mapping of experiment keys to lists of values", file=str(path), field="axes")
    axes = _flatten(axes)
    for key, values in axes.items():
        if not isinstance(values, ListConfig) or not values:
            raise ConfigError("expected a non-empty list of values", file=str(path), field=f"axes.{key}")
    parallel = study.get("parallel", 1)
    if not isinstance(parallel, int) or parallel < 1:
        raise ConfigError("must be an integer >= 1", file=str(path), field="parallel")
    name = str(study.get("name") or path.stem)
    output_dir = Path(study.get("output_dir") or Path("runs") / name).expanduser().absolute()

    base = study.get("experiment")
    base_path, layers = None, []
    if isinstance(base, str):
        base_path = path.parent / base if not Path(base).is_absolute() and (path.parent / base).is_file() else base
    elif isinstance(base, DictConfig):
        layers.append((f"{path}: experiment", base))
    elif base is not None:
        raise ConfigError("expected a path or a mapping of experiment keys", file=str(path), field="experiment")
    layers += [("override", o) for o in experiment_overrides]

    plain_axes = {k: OmegaConf.to_container(v) for k, v in axes.items()}
    runs = []
    for combo in itertools.product(*plain_axes.values()):
        values = dict(zip(plain_axes, combo))
        rid = run_id(values)
        axis_layer = OmegaConf.create()
        for key, value in values.items():
            OmegaConf.update(axis_layer, key, value)
        run_layer = OmegaConf.create({"name": f"{name}-{rid}", "output_dir": str(output_dir / "runs" / rid),
                                      "study_axes": axis_labels(values)})
        cfg = load_experiment(base_path, None, layers=[*layers, (f"{path}: axes", axis_layer), ("compare", run_layer)])
        cfg = absolute(cfg)  # runs may execute as Ray tasks in another working directory
        read_policy(cfg.policy)  # a bad policy fails before any run starts
        runs.append(StudyRun(run_id=rid, values=values, cfg=cfg))
    if len({r.run_id for r in runs}) != len(runs):
        raise ConfigError("two combinations of axis values share a run folder name", file=str(path), field="axes")
    return Study(name=name, output_dir=output_dir, parallel=parallel, axes=plain_axes, runs=runs)


def axis_labels(values: dict[str, Any]) -> dict[str, str]:
    """A run's axis values as text, as its rows (``axis.<key>``) and comparison.parquet give them."""
    return {key: str(value) for key, value in values.items()}


def _flatten(mapping: DictConfig, prefix: str = "") -> dict[str, Any]:
    """Nested axis keys (``axes.cohort.size=[...]`` on the command line) as dotted ones."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, DictConfig):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _stored(run: StudyRun) -> tuple[dict, str | None] | None:
    """A run folder's summary and the first key in which its run differs from the study's (``policy`` when its
    file changed since; None: the same run); None when the folder holds no run."""
    run_dir = Path(run.cfg.output_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except (OSError, ValueError):
        return None
    key = first_difference(result_keys(with_defaults(stored)),
                           result_keys(OmegaConf.to_container(OmegaConf.structured(run.cfg))))
    if key is None and summary.get("policy") != policy_identity(read_policy(run.cfg.policy)):
        key = "policy"
    return summary, key


def is_finished(run: StudyRun) -> bool:
    """Stopped cleanly under the same resolved config and policy: a resumed study skips it."""
    stored = _stored(run)
    return stored is not None and stored[1] is None and stored[0].get("status") in COMPLETE


def resumes(run: StudyRun) -> bool:
    """An unfinished run continues from its checkpoint if it has one under the same config and policy."""
    stored = _stored(run)
    return stored is not None and stored[1] is None and (Path(run.cfg.output_dir) / ckpt.FILE).is_file()


def supersede(todo: list[StudyRun], *, study_dir: Path) -> None:
    """Move the folders of runs the study is about to run anew (a run under another config or policy, or one
    that cannot resume) to ``superseded/<timestamp>/runs/``, saying so in one line each: a study deletes no
    result, and reads (as ``raysim report`` and ``raysim.load_study`` do) only ``runs/``."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for run in todo:
        run_dir = Path(run.cfg.output_dir)
        if resumes(run) or not run_dir.is_dir() or not any(run_dir.iterdir()):
            continue
        stored = _stored(run)
        if stored is None:
            why = "holds no readable run"
        else:
            summary, key = stored
            why = f"its {summary.get('status')} run " + (f"differs in {key}" if key else "has no checkpoint")
        moved = study_dir / "superseded" / stamp / "runs" / run.run_id
        moved.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(moved)
        print(f"raysim compare: {run.run_id}: {why}; moved to {moved}", file=sys.stderr)


def comparison_table(study: Study) -> pa.Table:
    """One row per run, in study order: its label, its axis values and its metrics."""
    rows = []
    for run in study.runs:
        config = OmegaConf.to_container(OmegaConf.structured(run.cfg))
        extra = {k: v for k, v in axis_labels(run.values).items() if k not in LABELS}
        rows.append({"run_id": run.run_id, **run_label(config), **extra, **run_metrics(Path(run.cfg.output_dir))})
    return pa.Table.from_pylist(rows)


def run_study(study: Study) -> Path:
    """Run every unfinished run of ``study``, then write comparison.parquet and the report."""
    from raysim import cluster
    from raysim.engine.run import run_experiment

    todo = []
    for run in study.runs:
        if not is_finished(run):
            todo.append(run)
        else:  # perhaps finished before raysim labelled rows: labelled now, the study's runs read as one table
            run_dir = Path(run.cfg.output_dir)
            label_parts(run_dir, RunIdentity.of(run.cfg, run_dir=run_dir, policy=read_policy(run.cfg.policy).name))
    caches = Caches()  # the study's runs share measurements and built datasets
    print(f"raysim compare: {study.name}: {len(study.runs)} runs, {len(study.runs) - len(todo)} already finished "
          f"-> {study.output_dir}", file=sys.stderr)
    supersede(todo, study_dir=study.output_dir)
    if todo:
        cluster.connect(address=todo[0].cfg.ray.address, include_dashboard=False)
        if study.parallel == 1:
            for i, run in enumerate(todo, 1):
                print(f"raysim compare: [{i}/{len(todo)}] {run.run_id}", file=sys.stderr)
                run_experiment(run.cfg, caches=caches, resume=resumes(run))
        else:
            _run_parallel(todo, parallel=study.parallel, caches=caches)
    study.output_dir.mkdir(parents=True, exist_ok=True)
    table = comparison_table(study)
    atomic_write(study.output_dir / "comparison.parquet", lambda tmp: pq.write_table(table, tmp))
    write_report([Path(r.cfg.output_dir) for r in study.runs], out_dir=study.output_dir,
                 title=f"Comparison study {study.name}", overwrite=True)  # the study's own report, of its runs
    return study.output_dir


def _run_parallel(todo: list[StudyRun], *, parallel: int, caches: Caches) -> None:
    """Up to ``parallel`` runs at once as Ray tasks, each with its share of the device actors.

    The tasks run on the driver's node: a run's driver writes its run directory and reads the
    pre-training and tokenizer caches, which are this node's. Their device actors go wherever
    the cluster places them.
    """
    import ray

    from raysim import cluster
    from raysim.data.build import build_dataset
    from raysim.models.build import base_seed, initial_base_model
    from raysim.synth.sources import pretrained_base

    # Pre-train in the driver first: concurrent runs would race to fill the same cache entry.
    for cfg in {to_yaml(_pretrain_part(r.cfg)): r.cfg for r in todo}.values():
        base = initial_base_model(cfg.model, seed=cfg.seed)
        pretrained_base(cfg, build_dataset(cfg, caches=caches), base, seed=base_seed(cfg.model, seed=cfg.seed),
                        progress=False)
    task = ray.remote(num_cpus=0, scheduling_strategy=cluster.on_this_node())(_run_one)
    pending, queue = [], list(todo)
    while queue or pending:
        while queue and len(pending) < parallel:
            run = queue.pop(0)
            cfg = run.cfg
            share = max(1, cluster.actors_that_fit(cpus_per_actor=cfg.ray.cpus_per_actor,
                                                   gpus_per_actor=cfg.ray.gpus_per_actor) // parallel)
            # The task's process did not start this Ray: it is told how long a placement may take here.
            ray_cfg = dataclasses.replace(cfg.ray, num_actors=cfg.ray.num_actors or share,
                                          placement_timeout_s=cluster.placement_timeout_s(cfg.ray.placement_timeout_s))
            pending.append(task.remote(dataclasses.replace(cfg, ray=ray_cfg, progress=False), resumes(run)))
        done, pending = ray.wait(pending, num_returns=1)
        print(f"raysim compare: finished {ray.get(done[0])}", file=sys.stderr)


def _run_one(cfg: ExperimentConfig, resume: bool) -> str:
    from raysim.engine.run import run_experiment

    return str(run_experiment(cfg, resume=resume))


def _pretrain_part(cfg: ExperimentConfig) -> ExperimentConfig:
    """The fields that decide the pre-trained weights (the cache key's inputs)."""
    from raysim.models.build import base_seed

    return dataclasses.replace(ExperimentConfig(), seed=base_seed(cfg.model, seed=cfg.seed), model=cfg.model,
                               data=cfg.data, pretrain=cfg.pretrain, synth=cfg.synth)
