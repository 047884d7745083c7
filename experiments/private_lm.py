"""Run experiments/private_lm.yaml's arms and print the README's table (Private LM fine-tuning).

    python experiments/private_lm.py [--out runs/private_lm] [--only A-dense,D-256] [key=value ...]

Each arm is one ``raysim run`` of the experiment with its overrides (extra ``key=value`` go to every arm),
into ``OUT/<arm>``. An arm whose folder holds a run that stopped cleanly is read, not run again; any other
existing folder is left to ``raysim run`` (which refuses to overwrite it). Numbers come from each run's
``summary.json`` and ``rounds.parquet``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

EXPERIMENT = Path(__file__).with_name("private_lm.yaml")
PEU = ["methods.partial_embeddings=[true]"]
ARMS = {
    "A-dense": [],
    "A-factors": ["aggregation.lora=ffa", "privacy.noise_space=factors"],
    "B-full": [*PEU, "methods.embedding_selection=server_random", "methods.embedding_rows=2048"],
    "C-seen": [*PEU, "methods.embedding_selection=device_seen"],
    "D-256": [*PEU, "methods.embedding_selection=server_frequent", "methods.embedding_rows=256"],
    "D-1024": [*PEU, "methods.embedding_selection=server_frequent", "methods.embedding_rows=1024"],
    "E-nce": [*PEU, "methods.embedding_selection=server_frequent", "methods.embedding_rows=256",
              "methods.output_loss=nce"],
    "E-ssm": [*PEU, "methods.embedding_selection=server_frequent", "methods.embedding_rows=256",
              "methods.output_loss=sampled_softmax"],
}
CLEAN = ("finished", "target_reached", "privacy_budget_spent")


def run_arm(name: str, out: Path, extra: list[str]) -> Path:
    run_dir = out / name
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("status") in CLEAN:
        print(f"{name}: done before, read from {run_dir}", file=sys.stderr)
        return run_dir
    command = ["raysim", "run", str(EXPERIMENT), f"name=private-lm-{name}", f"output_dir={run_dir}",
               *ARMS[name], *extra]
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)
    return run_dir


def row(name: str, run_dir: Path) -> str:
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pylist()
    completed = sum(r["n_completed"] for r in rounds)
    snr = [r["signal_to_noise"] for r in rounds]
    peak = max(r["mean_peak_memory_bytes"] for r in rounds)
    final = summary["final"]
    return (f"| {name} | {final['eval_loss']:.3f} / {final['eval_accuracy']:.4f} | {min(snr):.3f}–{max(snr):.3f} "
            f"| {summary['privacy']['noised_dims']:,} | {sum(r['bytes_up'] for r in rounds) / completed:,.0f} "
            f"| {peak / 1e6:.1f} | {sum(r['n_oom'] for r in rounds)} | {summary['epsilon']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/private_lm"))
    parser.add_argument("--only", default=",".join(ARMS), help="comma-separated arms (default: all)")
    args, extra = parser.parse_known_args()
    arms = args.only.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]} (arms: {', '.join(ARMS)})")
    dirs = {name: run_arm(name, args.out, extra) for name in arms}
    print("| arm | eval loss / accuracy (last round) | signal_to_noise (min–max) | noised_dims | bytes up / device "
          "| peak memory / device (MB) | n_oom | ε |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, run_dir in dirs.items():
        print(row(name, run_dir))


if __name__ == "__main__":
    main()
