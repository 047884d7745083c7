"""Fingerprints of a set of small runs that cover every path of the round: to show a refactor changes no bit.

    python .ci/same_results.py --write before.json     (on the commit before the change)
    python .ci/same_results.py --check before.json     (after it: exits 1 and names what differs)

Each run's fingerprint is the SHA-256 of ``final_state.pt``, of every column of ``devices.parquet`` and
``rounds.parquet`` by value (``column_digest``) but ``wall_time_s``, and of ``summary.json`` less what measures
the machine (wall time, versions, actor counts). Float results depend on the CPU, so compare on one machine.

``run_id``, the run folder's name, is fingerprinted like any column: this script names each run's folder for
its key in ``RUNS``, so two invocations agree on it, and a change in what labels a row is a change users see.
(Two runs fingerprinted from folders of different names differ in ``run_id`` alone.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

TINY = ["rounds=3", "population_size=1000", "progress=false", "cohort.size=4", "cohort.over_selection=1.5",
        "train.local_steps=2", "train.batch_size=4", "model.n_layer=2", "model.n_embd=32", "model.n_head=2",
        "model.vocab_size=128", "model.n_positions=16", "data.seq_len=16", "data.examples_per_user=8",
        "data.eval_users=4", "eval.every=2", "eval.batch_size=8", "methods.lora_rank=[4]", "data.source=synthetic",
        "ray.tokens_per_pass=128", "ray.cpus_per_actor=0.5"]
LLAMA = ["model.family=llama", "model.n_head=4", "model.n_kv_head=2", "model.n_inner=64"]
DP = ["cohort.sampling=poisson", "cohort.size=6", "privacy.clip_norm=0.02", "privacy.noise_multiplier=1.0"]
RUNS = {
    "mixed-random": ["policy=random", "methods.lora_rank=[4,2]", "methods.bits=[32,8]", "cohort.deadline_s=0.12"],
    "dp-adaptive-budget": [*DP, "rounds=4", "privacy.adaptive_clipping.enabled=true", "privacy.max_epsilon=2.0",
                           "privacy.adaptive_clipping.count_std=2.0"],
    "dp-target-prv": [*DP, "privacy.noise_multiplier=0", "privacy.target_epsilon=8", "privacy.accountant=prv"],
    "hetlora-fedadam": ["methods.lora_rank=[4,2]", "policy=random", "aggregation.lora=hetlora",
                        "aggregation.server_optimizer=fedadam", "aggregation.server_lr=0.01"],
    "methods-heterofl": ["policy=random", "methods.lora_rank=[4,0]", "methods.prune_ratio=[0.0,0.5]",
                         "methods.dropout_rate=[0.0,0.25]", "methods.trainable_layers=[null,1]",
                         "methods.partial_embeddings=[false,true]", "methods.embedding_rows=16",
                         "methods.bits=[32,4]", "methods.quantization=row", "model.dropout=0.1"],
    "methods-fedrolex": ["policy=greedy_fit", "methods.lora_rank=[4,2]", "methods.prune_ratio=[0.0,0.5]",
                         "methods.pruning=fedrolex", "methods.partial_embeddings=[false,true]"],
    "rl": ["policy=rl", "methods.lora_rank=[4,2]", "methods.bits=[32,8]", "rounds=4"],
    "local-dp": ["privacy.local.enabled=true", "rounds=2"],
    "stop-at-target": ["rounds=5", "eval.target_accuracy=0.0", "eval.stop_at_target=true"],
    "llama-methods": [*LLAMA, "policy=random", "methods.lora_rank=[4,0]", "methods.prune_ratio=[0.0,0.5]",
                      "methods.trainable_layers=[null,1]", "methods.partial_embeddings=[false,true]",
                      "methods.embedding_rows=16", "methods.bits=[32,8]", "model.tie_embeddings=false",
                      "methods.lora_target_modules=[q_proj,v_proj,down_proj]"],
    "llama-dp-rl": [*LLAMA, *DP, "policy=rl", "methods.lora_rank=[4,2]", "rounds=4",
                    "methods.partial_embeddings=[false,true]", "methods.embedding_selection=server_frequent",
                    "methods.embedding_rows=16"],
}
MACHINE = ("wall_time_s", "versions", "num_actors", "actor_nodes", "checkpoint")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def column_digest(column: pa.ChunkedArray) -> str:
    """A column's type and values, by value: which rows are null, then fixed-width values (numbers, booleans)
    as their bytes (NaN payloads and -0.0 included; nulls as 0), strings as UTF-8 each after its length, so
    that ["ab", "c"] and ["a", "bc"] differ, as do a null and "" (not object pointers, which two reads of
    one file do not share)."""
    array = column.combine_chunks()
    kind = array.type
    sha = hashlib.sha256(f"{kind}\n{len(array)}\n".encode())
    sha.update(array.is_null().to_numpy(zero_copy_only=False).tobytes())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        for value in array.to_pylist():
            data = b"" if value is None else value.encode()
            sha.update(len(data).to_bytes(8, "little") + data)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        filled = pc.fill_null(array, pa.scalar(0).cast(kind))
        sha.update(np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).tobytes())
    else:  # a new column type: say so rather than hash something that is not its value
        raise TypeError(f"no by-value fingerprint for a column of type {kind}")
    return sha.hexdigest()[:16]


def fingerprint(run_dir: Path) -> dict[str, str]:
    out = {}
    if (run_dir / "final_state.pt").exists():
        out["final_state.pt"] = digest((run_dir / "final_state.pt").read_bytes())
    for table in ("devices", "rounds"):
        columns = pq.read_table(run_dir / f"{table}.parquet")  # a file, or a folder of parts: the same table
        for name in columns.column_names:
            if name != "wall_time_s":
                out[f"{table}.{name}"] = column_digest(columns[name])
    summary = json.loads((run_dir / "summary.json").read_text())
    out["summary"] = digest(json.dumps({k: v for k, v in summary.items() if k not in MACHINE}, sort_keys=True).encode())
    return out


def differences(expected: dict[str, dict[str, str]], results: dict[str, dict[str, str]]) -> list[str]:
    """``run: key`` for every fingerprint that differs or is missing, and ``run: key (new)`` for one that
    ``expected`` lacks."""
    differ = [f"{run}: {key}" for run in expected for key in expected[run]
              if results.get(run, {}).get(key) != expected[run][key]]
    return differ + [f"{run}: {key} (new)" for run in results for key in results[run]
                     if key not in expected.get(run, {})]


def run_all() -> dict[str, dict[str, str]]:
    from raysim import cluster
    from raysim.config import load_experiment
    from raysim.engine.run import run_experiment

    connection = cluster.connect(address=None, num_cpus=2)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            cfg = load_experiment(None, [*TINY, *overrides, f"output_dir={Path(tmp) / name}"])
            results[name] = fingerprint(run_experiment(cfg))
            print(f"{name}: done", file=sys.stderr)
    connection.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    args = parser.parse_args()
    results = run_all()
    if args.write:
        args.write.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"{len(results)} runs fingerprinted -> {args.write}")
        return 0
    expected = json.loads(args.check.read_text())
    differ = differences(expected, results)
    print("\n".join(differ) if differ else f"identical: {len(results)} runs, "
          f"{sum(len(v) for v in results.values())} fingerprints")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
