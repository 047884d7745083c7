import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.methods.lora import product, refactor, relative_truncation_error, zero_pad


def _factors(rank, seed, out=6, inp=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g, dtype=torch.float64), torch.randn(out, rank, generator=g,
                                                                                 dtype=torch.float64)


def test_averaging_factors_is_not_averaging_products():
    one, zero = torch.ones(1, 1), torch.zeros(1, 1)
    exact = (product(lora_A=one, lora_B=one, scale=1.0) + product(lora_A=zero, lora_B=zero, scale=1.0)) / 2
    naive = product(lora_A=(one + zero) / 2, lora_B=(one + zero) / 2, scale=1.0)
    assert float(exact) == 0.5 and float(naive) == 0.25


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 5), true_rank=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_refactor_gives_the_truncated_svd_product(rank, true_rank, seed):
    a, b = _factors(true_rank, seed)
    delta = b @ a
    fallback = torch.randn(5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    new_a, new_b = refactor(delta, rank=rank, scale=2.0, fallback_A=fallback)
    assert new_a.shape == (rank, 5) and new_b.shape == (6, rank)
    u, s, vh = torch.linalg.svd(delta)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    torch.testing.assert_close(product(lora_A=new_a, lora_B=new_b, scale=2.0), best, atol=1e-9, rtol=1e-9)
    assert (new_a.norm(dim=1) > 0).all()  # every direction can still learn


def test_truncation_error_is_the_relative_tail_of_the_singular_values():
    delta = torch.diag(torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64))
    assert relative_truncation_error([delta], rank=1) == 3.0 / 5.0
    assert relative_truncation_error([delta], rank=2) == 0.0
    assert relative_truncation_error([torch.zeros(2, 2)], rank=1) == 0.0


def test_hetlora_zero_padding_is_inexact_for_mixed_ranks():
    factors = [_factors(r, s) for r, s in [(1, 0), (2, 1), (3, 2)]]
    padded = [zero_pad(lora_A=a, lora_B=b, rank=3) for a, b in factors]
    het = product(lora_A=sum(a for a, _ in padded) / 3, lora_B=sum(b for _, b in padded) / 3, scale=1.0)
    exact = sum(b @ a for a, b in factors) / 3  # the product-space mean flexlora aggregates
    assert float((het - exact).norm() / exact.norm()) > 0.3
    same = product(lora_A=padded[1][0], lora_B=padded[1][1], scale=1.0)
    torch.testing.assert_close(same, factors[1][1] @ factors[1][0])
