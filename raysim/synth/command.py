"""``raysim synth EXPERIMENT``: run the synth steps an experiment (or every run of a study) names, print what
each made, and with ``--out`` write each step's texts (``<step>.parquet``, a ``text`` column) and a
``manifest.json`` of how they were made."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raysim.config import ExperimentConfig, load_experiment, load_mapping, to_yaml
from raysim.errors import ConfigError
from raysim.io.results import COMPLETE, atomic_write
from raysim.synth.sources import run_models
from raysim.synth.steps import Made, Synth

FIRST = ("generated", "filtered", "transformed")  # the steps that need no DP run


def configs(path: str, overrides: list[str]) -> list[ExperimentConfig]:
    """The experiment's config, or a study's runs' configs."""
    from raysim.io import shipped
    from raysim.study.compare import load_study

    file = shipped.experiment(path)
    if "axes" in load_mapping(file, kind="experiment or study"):
        runs = [r.cfg for r in load_study(file, overrides).runs]
    else:
        runs = [load_experiment(file, overrides)]
    return runs


def _synth_part(cfg: ExperimentConfig) -> ExperimentConfig:
    """What decides the first steps' texts: synth's settings, the cache and the corpus (its public split)."""
    return ExperimentConfig(synth=cfg.synth, data=cfg.data,
                            pretrain=type(cfg.pretrain)(cache_dir=cfg.pretrain.cache_dir))


def synthesize(cfg: ExperimentConfig, *, progress: bool, first: bool = True) -> dict[str, Made]:
    """The first steps (unless ``first`` is false: made already), then a re-filter for every refiltered source
    whose run has finished."""
    synth = Synth(cfg, progress=progress)
    made = {}
    for step in FIRST if first else ():
        print(f"raysim synth: {step}", file=sys.stderr)
        made[step] = getattr(synth, step)()
    for i, src in enumerate(cfg.pretrain.sources or []):
        if src.name != "refiltered":
            continue
        summary = Path(src.run) / "summary.json"
        status = json.loads(summary.read_text()).get("status") if summary.is_file() else "not run"
        if status not in COMPLETE:
            print(f"raysim synth: refiltered: skipped, {src.run} is {status} (run it, then synth again)",
                  file=sys.stderr)
            continue
        made[f"refiltered-{Path(src.run).name}"] = synth.refiltered(run_models(src.run,
                                                                           field=f"pretrain.sources[{i}].run"))
    return made


def synth_command(path: str, overrides: list[str], *, out: str | None, overwrite: bool, progress: bool) -> int:
    out_dir = Path(out).expanduser() if out else None
    if out_dir is not None:
        _check_out(out_dir, overwrite=overwrite)
    made: dict[str, Made] = {}
    settings = set()  # the synth settings whose first steps are made: a study's runs mostly share them
    for cfg in configs(path, overrides):
        setting = to_yaml(_synth_part(cfg))
        made |= synthesize(cfg, progress=progress, first=setting not in settings)
        settings.add(setting)
    print(f"{'step':<32} {'texts':>7} {'chars':>10}  sha256")
    for step, m in made.items():
        print(f"{step:<32} {m.about['texts']:>7} {m.about['chars']:>10}  {m.about['sha256']}")
        print(f"    {m.texts[0][:100]!r}" if m.texts else "    (empty)")
    if out_dir is not None:
        for old in _written(out_dir):
            old.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        for step, m in made.items():
            atomic_write(out_dir / f"{step}.parquet", lambda tmp, m=m: pq.write_table(pa.table({"text": m.texts}), tmp))
        manifest = json.dumps({step: m.about for step, m in made.items()}, indent=2)
        atomic_write(out_dir / "manifest.json", lambda tmp: Path(tmp).write_text(manifest))
        print(f"written: {out_dir} (each step's texts as <step>.parquet; a file source reads them)")
    return 0


def _written(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("*.parquet")) + sorted(out_dir.glob("manifest.json")) if out_dir.is_dir() else []


def _check_out(out_dir: Path, *, overwrite: bool) -> None:
    """An empty or new folder; with ``overwrite``, also one holding only what ``raysim synth --out`` wrote."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{out_dir} is not empty: pass --overwrite to replace raysim synth's texts there",
                          field="--out")
    others = sorted(p.name for p in set(out_dir.iterdir()) - set(_written(out_dir)))
    if others or not (out_dir / "manifest.json").is_file():
        held = ", ".join(others[:3]) or "no manifest.json"
        raise ConfigError(f"{out_dir} is not a raysim synth output folder (it holds {held}): --overwrite "
                          "replaces only what raysim synth wrote", field="--out")
