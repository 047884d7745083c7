"""Shared by the benchmarks: the workloads, a plain PyTorch federated loop, raysim runs.

The plain loop is what a careful researcher writes without a framework:
transformers + peft, one AdamW per device, persistent worker processes fed a
shard of the cohort per round over pipes, weighted deltas summed in float64.
It uses raysim's synthetic data generator only so that both sides train on
identical tokens; no other raysim code runs in it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))


@dataclass(frozen=True)
class Workload:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    rank: int
    alpha: int
    population: int
    examples: int
    seq_len: int
    batch_size: int
    local_steps: int
    cohort: int
    rounds: int
    lr: float = 1e-3

    def overrides(self, *, num_actors: int | None, population: int | None = None) -> list[str]:
        """raysim keys for this workload; evaluation off, all devices available, none drop."""
        out = [
            f"name={self.name}", "seed=0", f"rounds={self.rounds}", "progress=false",
            f"population={BENCH_DIR / 'profiles' / 'populations' / 'bench.yaml'}",
            f"population_size={population or self.population}",
            f"cohort.size={self.cohort}", "cohort.sampling=fixed", "cohort.over_selection=1.0",
            f"train.local_steps={self.local_steps}", f"train.batch_size={self.batch_size}", f"train.lr={self.lr}",
            f"model.n_layer={self.n_layer}", f"model.n_embd={self.n_embd}", f"model.n_head={self.n_head}",
            f"model.vocab_size={self.vocab_size}", f"model.n_positions={self.n_positions}",
            "model.dropout=0.1",  # GPT2Config's default, which the workloads and the plain loop use
            "data.source=synthetic", f"data.seq_len={self.seq_len}", f"data.examples_per_user={self.examples}",
            f"methods.lora_rank=[{self.rank}]", f"methods.lora_alpha_per_rank={self.alpha / self.rank}",
            "eval.every=0",
        ]
        if num_actors:
            out.append(f"ray.num_actors={num_actors}")
        return out


W1 = Workload("W1", n_layer=4, n_embd=256, n_head=4, vocab_size=8192, n_positions=128, rank=8, alpha=16,
              population=1000, examples=64, seq_len=128, batch_size=16, local_steps=4, cohort=32, rounds=4)
W2 = Workload("W2", n_layer=1, n_embd=64, n_head=2, vocab_size=1024, n_positions=32, rank=4, alpha=8,
              population=100_000, examples=8, seq_len=32, batch_size=8, local_steps=1, cohort=500, rounds=5)


def median_rounds(times: list[float], *, skip: int = 1) -> float:
    """Median seconds per round, leaving out the first ``skip`` (warm-up) rounds."""
    return statistics.median(times[skip:])


# ---- the plain loop -------------------------------------------------------


def _build(wl: Workload):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=wl.n_layer, n_embd=wl.n_embd, n_head=wl.n_head,
                                       vocab_size=wl.vocab_size, n_positions=wl.n_positions,
                                       bos_token_id=0, eos_token_id=0))
    lora = LoraConfig(r=wl.rank, lora_alpha=wl.alpha, target_modules=["c_attn"], fan_in_fan_out=True)
    return get_peft_model(model, lora)


def _data(wl: Workload):
    from raysim.config import DataConfig
    from raysim.data.synthetic import SyntheticTokens

    return SyntheticTokens(DataConfig(examples_per_user=wl.examples, seq_len=wl.seq_len),
                           vocab_size=wl.vocab_size, seed=0)


def _train_shard(model, data, wl: Workload, state: dict, ids: list[int], rnd: int):
    import torch

    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    sums = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    total = 0
    for device_id in ids:
        model.load_state_dict(state, strict=False)
        opt = torch.optim.AdamW(params.values(), lr=wl.lr)
        x_all = data.device_examples(device_id)
        g = torch.Generator().manual_seed(rnd * 1_000_003 + device_id)
        need = wl.local_steps * wl.batch_size
        order = torch.cat([torch.randperm(len(x_all), generator=g) for _ in range(-(-need // len(x_all)))])
        for step in range(wl.local_steps):
            x = x_all[order[step * wl.batch_size:(step + 1) * wl.batch_size]]
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            for k, p in params.items():
                sums[k] += len(x_all) * (p.double() - state[k].double())
        total += len(x_all)
    return sums, total


def _worker(conn, wl: Workload, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    model, data = _build(wl), _data(wl)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        conn.send(_train_shard(model, data, wl, *msg))


def plain_loop(wl: Workload, *, processes: int, threads: int) -> list[float]:
    """Seconds per round of the plain loop with ``processes`` workers of ``threads`` each."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(processes):
        a, b = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(b, wl, threads), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    for a in pipes:
        assert a.recv() == "ready"
    model = _build(wl)
    state = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    times = []
    for rnd in range(1, wl.rounds + 1):
        t0 = time.perf_counter()
        ids = np.sort(np.random.default_rng(rnd).choice(wl.population, size=wl.cohort, replace=False)).tolist()
        for i, a in enumerate(pipes):
            a.send((state, ids[i::processes], rnd))
        results = [a.recv() for a in pipes]
        total = sum(n for _, n in results)
        state = {k: (v.double() + sum(s[k] for s, _ in results) / total).float() for k, v in state.items()}
        times.append(time.perf_counter() - t0)
    for a in pipes:
        a.send(None)
    for p in procs:
        p.join()
    return times


def best_plain(wl: Workload, *, cores: int) -> tuple[float, str, dict[str, float]]:
    """The faster of one process on all cores and one single-threaded process per core."""
    variants = {
        f"1 process x {cores} threads": median_rounds(plain_loop(wl, processes=1, threads=cores)),
        f"{cores} processes x 1 thread": median_rounds(plain_loop(wl, processes=cores, threads=1)),
    }
    name = min(variants, key=variants.get)
    return variants[name], name, variants


# ---- raysim ---------------------------------------------------------------


def raysim_rounds(wl: Workload, *, num_actors: int | None = None, population: int | None = None) -> list[float]:
    """Wall seconds per round of the same workload run through raysim."""
    import pyarrow.parquet as pq

    from raysim.config import load_experiment
    from raysim.engine.run import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_experiment(None, [*wl.overrides(num_actors=num_actors, population=population),
                                     f"output_dir={tmp}/run"])
        run_dir = run_experiment(cfg)
        return pq.read_table(run_dir / "rounds.parquet").column("wall_time_s").to_pylist()


def report(name: str, raysim_s: float, plain_s: float, plain_name: str, variants: dict[str, float]) -> None:
    for k, v in variants.items():
        print(f"plain loop, {k}: {v:.3f} s/round")
    print(f"plain loop, best ({plain_name}): {plain_s:.3f} s/round")
    print(f"raysim: {raysim_s:.3f} s/round")
    ratio = raysim_s / plain_s
    print(f"{name}: raysim / plain = {ratio:.3f}")
    print(f"ratio={ratio:.3f}")


def compare(wl: Workload) -> None:
    """Run ``wl`` through the best plain loop and through raysim, in this one run, and print the ratio."""
    if "--cohort" in sys.argv:  # a smaller cohort for a quick check
        wl = replace(wl, cohort=int(sys.argv[sys.argv.index("--cohort") + 1]))
    n = cores()
    print(f"{wl.name} on {n} cores, cohort {wl.cohort}, {wl.rounds} rounds")
    plain_s, plain_name, variants = best_plain(wl, cores=n)
    raysim_s = median_rounds(raysim_rounds(wl))
    report(wl.name, raysim_s, plain_s, plain_name, variants)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
