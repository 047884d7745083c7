"""Every path in an experiment made absolute in the driver, before anything is scheduled.

A study's runs execute as Ray tasks, whose working directory is the raylet's,
not the driver's: a relative ``output_dir``, data file or policy path, or a
name that the driver's working directory resolves (its ``device_profiles/``
and ``policies/`` shadow the shipped ones), would mean something else there.
:func:`absolute` replaces each with the absolute path the driver means.
Names that designate the shipped files stay names: they mean the same from
any directory, and read better in ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from raysim.config import ExperimentConfig
from raysim.emulation.profiles import is_shipped_population, population_file
from raysim.policies import SHIPPED_POLICIES, resolve_policy_file

DATA_NAMES = ("python-docs", "synthetic")  # data.source values that are not paths


def _path(value: str | None) -> str | None:
    return None if value is None else str(Path(value).expanduser().absolute())


def _population(value: str) -> str:
    if not value.endswith(".yaml") and is_shipped_population(value):
        return value
    return str(population_file(value).absolute())


def _policy(value: str) -> str:
    path = resolve_policy_file(value)
    if not value.endswith((".yaml", ".yml")) and path.absolute() == SHIPPED_POLICIES / path.name:
        return value
    return str(path.absolute())


def absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with every path and every working-directory name absolute (bad names are ConfigErrors)."""
    d, sources = cfg.data, cfg.pretrain.sources
    data = dataclasses.replace(d, source=d.source if d.source in DATA_NAMES else _path(d.source),
                               tokenizer=dataclasses.replace(d.tokenizer, path=_path(d.tokenizer.path)))
    return dataclasses.replace(
        cfg, output_dir=_path(cfg.output_dir), population=_population(cfg.population), policy=_policy(cfg.policy),
        data=data, model=dataclasses.replace(cfg.model, path=_path(cfg.model.path)),
        pretrain=dataclasses.replace(cfg.pretrain, cache_dir=_path(cfg.pretrain.cache_dir), sources=sources and [
            dataclasses.replace(s, path=_path(s.path), run=_path(s.run)) for s in sources]),
        synth=dataclasses.replace(cfg.synth, prompts=_path(cfg.synth.prompts)),
    )
