"""W2: raysim vs a plain PyTorch federated loop, overhead-bound rounds.

GPT-2 (1 layer, 64 wide, vocab 1024), LoRA r=4, a population of 100,000
devices of 8 sequences x 32 tokens, 500 devices per round, 1 AdamW step of
batch 8, FedAvg, 5 rounds (median of rounds 2-5). Per-device dispatch,
records and cost-model work dominate. The plain loop gives each per-core
process one shard of the cohort per round. Prints ``ratio=<raysim/plain>``
last; target <= 1.0.

    python bench/device_overhead.py [--cohort N]
"""

from dataclasses import replace

from common import W2, best_plain, cohort_option, cores, median_rounds, raysim_rounds, report

if __name__ == "__main__":
    wl = replace(W2, cohort=cohort_option(W2.cohort))
    n = cores()
    print(f"W2 on {n} cores, cohort {wl.cohort}, {wl.rounds} rounds")
    plain_s, plain_name, variants = best_plain(wl, cores=n)
    raysim_s = median_rounds(raysim_rounds(wl))
    report("W2", raysim_s, plain_s, plain_name, variants)
