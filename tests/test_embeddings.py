import torch

from raysim.methods.embeddings import fixed_rows, seen_rows
from raysim.methods.layers import trained_blocks


def test_seen_rows_are_the_distinct_tokens():
    assert seen_rows(torch.tensor([[5, 1, 5], [2, 1, 9]])).tolist() == [1, 2, 5, 9]


def test_fixed_rows_hide_how_many_tokens_a_device_saw():
    g = torch.Generator().manual_seed(0)
    few = fixed_rows(torch.tensor([3, 7]), count=5, vocab_size=20, generator=g)
    many = fixed_rows(torch.arange(12), count=5, vocab_size=20, generator=g)
    assert len(few) == len(many) == 5
    assert {3, 7} <= set(few.tolist()) and set(many.tolist()) <= set(range(12))


def test_top_k_blocks_are_the_last_ones():
    assert trained_blocks(4, 2) == (2, 3) and trained_blocks(3, None) == (0, 1, 2)
