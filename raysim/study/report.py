"""Tables and plots from finished runs: ``raysim report RUN_DIR...`` and every comparison study.

One row of metrics per run (:func:`run_metrics`, read back from its run
directory), runs grouped by policy (and population when several), and
``report.md`` with a mean ± std table and PNG plots of the eval metric
against simulated time, bytes and ε, a line per group with a band of ± one
standard deviation over seeds.

A run that did not finish (``running``, ``interrupted``, ``failed``) is left
out of the means and the plots by default and listed as left out; with
``unfinished="mark"`` it is averaged in and its group is marked with the
count of such runs. A report never averages a partial run unannounced.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from raysim.errors import ConfigError
from raysim.io.results import COMPLETE, DEVICES_SCHEMA, ROUNDS_SCHEMA, atomic_write, read_parts

METRIC = "eval_accuracy"
REPORT = "report.md"
PLOTS = {  # file: (x column, x label, x scale)
    "accuracy_vs_time.png": ("sim_time_s", "simulated time (s)", 1.0),
    "accuracy_vs_bytes.png": ("bytes_total", "bytes sent and received (MB)", 1e-6),
    "accuracy_vs_epsilon.png": ("epsilon", "privacy spent ε", 1.0),
}
TABLE = (  # column, header, scale, digits
    ("final_eval_accuracy", "final eval accuracy", 1.0, 4),
    ("final_eval_loss", "final eval loss", 1.0, 3),
    ("time_to_target_s", "time to target (s)", 1.0, 1),
    ("bytes_to_target", "bytes to target (MB)", 1e-6, 1),
    ("sim_time_s", "simulated time (s)", 1.0, 1),
    ("bytes_total", "bytes (MB)", 1e-6, 1),
    ("epsilon", "ε", 1.0, 2),
    ("oom_rate", "oom rate", 1.0, 3),
    ("over_budget_rate", "over budget rate", 1.0, 3),
    ("dropout_rate", "dropout rate", 1.0, 3),
    ("straggler_rate", "straggler rate", 1.0, 3),
)


def read_run(run_dir: Path) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """A run's resolved config, summary and rounds table (columns)."""
    files = [run_dir / name for name in ("config.yaml", "summary.json", "rounds.parquet")]
    for f in files:
        if not f.exists():
            raise ConfigError(f"not a run directory (no {f.name})", file=str(run_dir))
    config = OmegaConf.to_container(OmegaConf.load(files[0]))
    summary = json.loads(files[1].read_text())
    rounds = {k: np.asarray(v) for k, v in read_parts(files[2], ROUNDS_SCHEMA).to_pydict().items()}
    return config, summary, rounds


def curve(summary: dict, rounds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The eval metric at every evaluated round (and before round 1), with time, bytes and ε there."""
    bytes_total = np.cumsum(rounds["bytes_up"] + rounds["bytes_down"]).astype(np.float64)
    evaluated = ~np.isnan(rounds[METRIC].astype(np.float64))
    initial = (summary.get("initial") or {}).get(METRIC)
    start = [] if initial is None else [0.0]
    epsilon = np.array([math.inf if e is None else e for e in rounds["epsilon"]], dtype=np.float64)
    return {
        METRIC: np.array([*([initial] if start else []), *rounds[METRIC][evaluated]], dtype=np.float64),
        "sim_time_s": np.array([*start, *rounds["sim_time_s"][evaluated]], dtype=np.float64),
        "bytes_total": np.array([*start, *bytes_total[evaluated]]),
        "epsilon": np.array([*start, *epsilon[evaluated]]),
    }


def run_metrics(run_dir: Path, *, target: float | None = None) -> dict:
    """One run's final metrics, time- and bytes-to-target, ε and failure rates.

    The target is the run's ``eval.target_accuracy`` unless ``target`` is given.
    """
    config, summary, rounds = read_run(run_dir)
    target = config["eval"]["target_accuracy"] if target is None else target
    c = curve(summary, rounds)
    reached = np.flatnonzero(c[METRIC] >= target) if target is not None else np.empty(0, dtype=np.int64)
    selected = max(1, int(rounds["n_selected"].sum()))
    available = int(rounds["n_selected"].sum() - rounds["n_unavailable"].sum())
    took_part = available - int(rounds["n_over_budget"].sum() + rounds["n_oom"].sum())
    last = lambda key: float(c[key][-1]) if len(c[key]) else math.nan  # noqa: E731
    epsilon = [e for e in rounds["epsilon"] if e is not None]
    return {
        "status": summary["status"],
        "rounds_completed": int(summary["rounds_completed"]),
        "final_eval_accuracy": last(METRIC),
        "final_eval_loss": float((summary.get("final") or {}).get("eval_loss", math.nan)),
        "final_train_loss": float((summary.get("final") or {}).get("train_loss", math.nan)),
        "sim_time_s": float(rounds["sim_time_s"][-1]) if len(rounds["round"]) else 0.0,
        "bytes_up": int(rounds["bytes_up"].sum()),
        "bytes_down": int(rounds["bytes_down"].sum()),
        "bytes_total": int(rounds["bytes_up"].sum() + rounds["bytes_down"].sum()),
        "target_accuracy": math.nan if target is None else float(target),
        "time_to_target_s": float(c["sim_time_s"][reached[0]]) if len(reached) else math.nan,
        "bytes_to_target": float(c["bytes_total"][reached[0]]) if len(reached) else math.nan,
        "epsilon": float(epsilon[-1]) if epsilon else math.inf,
        "oom_rate": int(rounds["n_oom"].sum()) / selected,
        "over_budget_rate": int(rounds["n_over_budget"].sum()) / selected,
        "took_part_rate": took_part / max(1, available),  # of the available devices selected
        "dropout_rate": int(rounds["n_dropped"].sum()) / selected,
        "straggler_rate": int(rounds["n_stragglers"].sum()) / selected,
        "wall_time_s": float(summary["wall_time_s"]),
        **aggregated_means(run_dir),
    }


def aggregated_means(run_dir: Path) -> dict[str, float]:
    """Per device whose update was aggregated, its mean peak training memory, training FLOPs and bytes sent up."""
    columns = ("status", "peak_memory_bytes", "flops", "bytes_up")
    devices = read_parts(run_dir / "devices.parquet", DEVICES_SCHEMA).select(columns).to_pydict()
    ok = np.asarray(devices["status"], dtype=object) == "ok"
    mean = lambda key: float(np.mean(np.asarray(devices[key], dtype=np.float64)[ok])) if ok.any() else math.nan  # noqa: E731
    return {"device_peak_memory_bytes": mean("peak_memory_bytes"), "device_flops": mean("flops"),
            "device_bytes_up": mean("bytes_up")}


def run_label(config: dict) -> dict:
    """What identifies a run in a comparison: its policy, seed and population."""
    name = lambda v: Path(v).stem if str(v).endswith((".yaml", ".yml")) else str(v)  # noqa: E731
    return {"policy": name(config["policy"]), "seed": int(config["seed"]), "population": name(config["population"])}


def group_name(label: dict, *, populations: int) -> str:
    return label["policy"] if populations <= 1 else f"{label['policy']} @ {label['population']}"


def mean_std(values: list[float], *, scale: float, digits: int) -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    finite = v[np.isfinite(v)]
    if len(finite) == 0:
        return "∞" if len(v) and np.isinf(v).all() else "—"
    text = f"{finite.mean():.{digits}f} ± {finite.std():.{digits}f}"
    return text if len(finite) == len(v) else f"{text} ({len(finite)}/{len(v)})"


UNFINISHED = ("leave-out", "mark")  # what a report does with a run that did not finish


def write_report(run_dirs: list[Path], *, out_dir: Path, title: str = "raysim report",
                 target: float | None = None, unfinished: str = "leave-out", overwrite: bool = False) -> Path:
    """Write report.md and the PNG plots for ``run_dirs`` into ``out_dir``; return report.md.

    ``target`` replaces the runs' own ``eval.target_accuracy`` for time- and bytes-to-target;
    ``unfinished`` says whether runs that did not finish are left out of the groups or averaged in and marked;
    an earlier report in ``out_dir`` is replaced only with ``overwrite`` (else nothing is written).
    """
    if unfinished not in UNFINISHED:
        raise ValueError(f"unfinished must be one of {UNFINISHED}, not {unfinished!r}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file; the report is a folder", field="--out")
    earlier = [name for name in (REPORT, *PLOTS) if (out_dir / name).exists()]
    if earlier and not overwrite:
        raise ConfigError(f"{out_dir} holds a report ({', '.join(earlier)}): pass --overwrite to replace it",
                          field="--out")
    runs = _read_runs(run_dirs, target=target, unfinished=unfinished)
    populations = len({r["label"]["population"] for r in runs})
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if not r["left_out"]:
            groups.setdefault(group_name(r["label"], populations=populations), []).append(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(runs, groups, out_dir=out_dir)
    report = out_dir / REPORT
    text = _markdown(runs, groups, title=title, unfinished=unfinished)
    atomic_write(report, lambda tmp: tmp.write_text(text))
    return report


def _read_runs(run_dirs: list[Path], *, target: float | None, unfinished: str) -> list[dict]:
    """Per run: its folder, label, metrics and curve, and whether it finished or is left out."""
    runs = []
    for d in run_dirs:
        config, summary, rounds = read_run(d)
        metrics = run_metrics(d, target=target)
        complete = metrics["status"] in COMPLETE
        runs.append({"dir": d, "label": run_label(config), "metrics": metrics, "curve": curve(summary, rounds),
                     "complete": complete, "left_out": not complete and unfinished == "leave-out"})
    return runs


def _plot(runs: list[dict], groups: dict[str, list[dict]], *, out_dir: Path) -> None:
    """One PNG per x axis of :data:`PLOTS`: each group's mean curve with a ±std band."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    for file, (x_key, x_label, scale) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        drawn = False
        for name, members in groups.items():
            curves = [(m["curve"][x_key] * scale, m["curve"][METRIC]) for m in members]
            drawn |= _group_curve(ax, name, [(x, y) for x, y in curves if len(x) and np.isfinite(x).all()])
        targets = {r["metrics"]["target_accuracy"] for r in runs}
        if x_key != "epsilon" and len(targets) == 1 and math.isfinite(target_line := targets.pop()):
            ax.axhline(target_line, color="grey", linestyle=":", linewidth=1, label="target")
        ax.set_xlabel(x_label)
        ax.set_ylabel(METRIC.replace("_", " "))
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no finite values: no privacy mechanism in these runs (ε = ∞)"
                    if x_key == "epsilon" else "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_write(out_dir / file, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110))
        plt.close(fig)


def _group_curve(ax, name: str, curves: list[tuple[np.ndarray, np.ndarray]]) -> bool:
    """A group's mean and band on ``ax``, where every run has data; past the first run's end (a stop at the
    target, a spent budget) a dashed mean of the runs still going, without a band. False: nothing to draw."""
    if not curves:
        return False
    grid = np.linspace(0.0, max(x[-1] for x, _ in curves), 200)
    ys = np.stack([np.where(grid <= x[-1], np.interp(grid, x, y), np.nan) for x, y in curves])
    mean, std = np.nanmean(ys, axis=0), np.nanstd(ys, axis=0)  # the longest run covers the whole grid
    every = grid <= min(x[-1] for x, _ in curves)
    line, = ax.plot(grid[every], mean[every], label=f"{name} (n={len(curves)})")
    ax.fill_between(grid[every], (mean - std)[every], (mean + std)[every], alpha=0.2, color=line.get_color())
    tail = ~every | np.roll(~every, -1)  # joins the solid part
    if (~every).any():
        ax.plot(grid[tail], mean[tail], linestyle="--", linewidth=1, color=line.get_color())
    return True


def _markdown(runs: list[dict], groups: dict[str, list[dict]], *, title: str, unfinished: str) -> str:
    """report.md: the groups' table (mean ± std over seeds), the target, the plots and the runs."""
    left_out = sum(r["left_out"] for r in runs)
    header = ["group", "runs", *(h for _, h, _, _ in TABLE)]
    lines = [f"# {title}", "", f"{len(runs) - left_out} runs; mean ± std over seeds; "
             "a count (k/n) marks a column only k of n runs reached."]
    if left_out:
        lines.append(f"{left_out} run{'s' * (left_out > 1)} that did not finish "
                     f"{'are' if left_out > 1 else 'is'} left out (listed below as left out).")
    if unfinished == "mark" and any(not r["complete"] for r in runs):
        lines.append("A group marked † averages in runs that did not finish (their count follows the mark).")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, members in groups.items():
        cells = [mean_std([m["metrics"][key] for m in members], scale=s, digits=d) for key, _, s, d in TABLE]
        partial = sum(not m["complete"] for m in members)
        mark = f" † {partial}" if partial else ""
        lines.append(f"| {name}{mark} | {len(members)} | " + " | ".join(cells) + " |")
    targets = sorted({r["metrics"]["target_accuracy"] for r in runs if math.isfinite(r["metrics"]["target_accuracy"])})
    lines += ["", f"Target {METRIC}: {', '.join(map(str, targets)) or 'none set (eval.target_accuracy)'}.", ""]
    lines += [f"![{METRIC} vs {label}]({file})" for file, (_, label, _) in PLOTS.items()]
    lines += ["", "## Runs", "", "| run | policy | seed | population | status | final eval accuracy |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        lab, met = r["label"], r["metrics"]
        status = met["status"] if r["complete"] else (
            f"{met['status']} after {met['rounds_completed']} rounds" + (", left out" if r["left_out"] else ""))
        lines.append(f"| {r['dir']} | {lab['policy']} | {lab['seed']} | {lab['population']} | {status} "
                     f"| {met['final_eval_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"
