"""W1: raysim vs a plain PyTorch federated loop, compute-bound rounds.

GPT-2 (4 layers, 256 wide, vocab 8192), LoRA r=8 on c_attn, 1000 devices of
64 sequences x 128 tokens, 32 devices per round, 4 AdamW steps of batch 16,
FedAvg, 4 rounds. Prints the median wall seconds per round over rounds 2-4 of
each side, measured in this one run, and last ``ratio=<raysim/plain>``.
Target on 2 cores: <= 1.10. ``--cohort 8`` runs a smaller cohort quickly.

    python bench/round_overhead.py [--cohort N]
"""

from common import W1, compare

if __name__ == "__main__":
    compare(W1)
