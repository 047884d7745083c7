import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim import rng


def test_uniform_draw_of_a_device_does_not_depend_on_its_neighbours():
    ids = np.array([5, 17, 999_999])
    together = rng.uniform(3, "x", ids=ids)
    alone = np.array([rng.uniform(3, "x", ids=np.array([i]))[0] for i in ids])
    assert np.array_equal(together, alone)


def test_keys_differ_by_seed_purpose_and_round():
    ids = np.arange(100)
    a = rng.uniform(0, "dropout", 1, ids=ids)
    assert not np.array_equal(a, rng.uniform(1, "dropout", 1, ids=ids))
    assert not np.array_equal(a, rng.uniform(0, "dropout", 2, ids=ids))
    assert not np.array_equal(a, rng.uniform(0, "avail", 1, ids=ids))


def test_uniform_moments_match_u01():
    u = rng.uniform(0, "m", ids=np.arange(200_000))
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002


def test_normal_moments_match_standard_normal():
    z = rng.normal(0, "n", ids=np.arange(200_000))
    assert abs(z.mean()) < 0.01
    assert abs(z.std() - 1.0) < 0.01


@settings(max_examples=50)
@given(st.integers(0, 2**31), st.text(max_size=8), st.integers(0, 10**6))
def test_key_is_a_pure_function(seed, purpose, part):
    assert rng.key(seed, purpose, part) == rng.key(seed, purpose, part)


def test_torch_generators_with_equal_keys_draw_equal_values():
    import torch

    a = torch.rand(4, generator=rng.generator(1, "t", 7))
    b = torch.rand(4, generator=rng.generator(1, "t", 7))
    c = torch.rand(4, generator=rng.generator(1, "t", 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_scalar_and_vector_mixers_agree():
    x = np.array([0, 1, 2**63 + 5, 2**64 - 1], dtype=np.uint64)
    assert [int(v) for v in rng._mix(x)] == [rng._mix_int(int(v)) for v in x]
