"""W2: raysim vs a plain PyTorch federated loop, overhead-bound rounds.

GPT-2 (1 layer, 64 wide, vocab 1024), LoRA r=4, a population of 100,000
devices of 8 sequences x 32 tokens, 500 devices per round, 1 AdamW step of
batch 8, FedAvg, 5 rounds (median of rounds 2-5). Per-device dispatch,
records and cost-model work dominate. The plain loop gives each per-core
process one shard of the cohort per round. Prints ``ratio=<raysim/plain>``
last; target <= 1.0.

    python bench/device_overhead.py [--cohort N]
"""

from common import W2, compare

if __name__ == "__main__":
    compare(W2)
