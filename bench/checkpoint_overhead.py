"""What checkpoints cost: their wall time as a share of round time, on W1 and W2, at checkpoint.every=1.

Runs each workload through raysim once with a checkpoint after every round (the default) and prints,
per workload, the seconds a checkpoint takes (mean over the run's checkpoints, from summary.json), the
median seconds per round (rounds 2 on, as the other benches), and ``<W>_checkpoint_share=<ckpt / round>``.
The issue's bound is 0.05. ``--rounds N`` shortens the runs; ``--only W2`` runs one workload.

    python bench/checkpoint_overhead.py [--rounds N] [--only W1|W2]
"""

import json
import sys
import tempfile
from dataclasses import replace

from common import W1, W2, median_rounds


def measure(wl) -> tuple[float, float]:
    import pyarrow.parquet as pq

    from raysim.config import load_experiment
    from raysim.engine.run import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_experiment(None, [*wl.overrides(num_actors=None), f"output_dir={tmp}/run", "checkpoint.every=1"])
        run_dir = run_experiment(cfg)
        rounds = pq.read_table(run_dir / "rounds.parquet").column("wall_time_s").to_pylist()
        summary = json.loads((run_dir / "summary.json").read_text())
        per_checkpoint = summary["checkpoint"]["wall_time_s"] / summary["rounds_completed"]
        return per_checkpoint, median_rounds(rounds)


if __name__ == "__main__":
    workloads = [W1, W2]
    if "--only" in sys.argv:
        workloads = [w for w in workloads if w.name == sys.argv[sys.argv.index("--only") + 1]]
    if "--rounds" in sys.argv:
        workloads = [replace(w, rounds=int(sys.argv[sys.argv.index("--rounds") + 1])) for w in workloads]
    results = {}
    for wl in workloads:
        results[wl.name] = measure(wl)
        checkpoint_s, round_s = results[wl.name]
        print(f"{wl.name}: checkpoint {checkpoint_s * 1e3:.1f} ms, round {round_s:.3f} s")
    for name, (checkpoint_s, round_s) in results.items():
        print(f"{name}_checkpoint_share={checkpoint_s / round_s:.4f}")
