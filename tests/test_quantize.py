import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.methods.quantize import decode, encode, pack, unpack

BITS = st.sampled_from([1, 2, 3, 4, 7, 8, 12, 16])


def _tensor(seed, shape=(6, 5)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@settings(max_examples=40, deadline=None)
@given(bits=BITS, n=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_pack_then_unpack_gives_the_levels_back(bits, n, seed):
    levels = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    buffer = pack(levels, bits=bits)
    assert buffer.dtype == torch.uint8 and buffer.numel() == -(-n * bits // 8)
    assert torch.equal(unpack(buffer, bits=bits, count=n), levels)


@settings(max_examples=20, deadline=None)
@given(bits=BITS, per_row=st.booleans(), seed=st.integers(0, 2**31))
def test_reported_bytes_are_the_buffer_and_scales_actually_produced(bits, per_row, seed):
    x = _tensor(seed)
    e = encode(x, bits=bits, per_row=per_row, generator=torch.Generator().manual_seed(seed))
    scales = 6 if per_row else 1
    assert e.nbytes == len(e.buffer.numpy().tobytes()) + 8 * scales
    assert len(e.buffer.numpy().tobytes()) == -(-x.numel() * bits // 8)


@settings(max_examples=8, deadline=None)
@given(bits=st.sampled_from([1, 2, 4]), per_row=st.booleans(), seed=st.integers(0, 2**31))
def test_quantizer_is_unbiased_and_within_its_variance_bound(bits, per_row, seed):
    x, n = _tensor(seed).double(), 1000
    g = torch.Generator().manual_seed(seed + 1)
    draws = torch.stack([decode(encode(x, bits=bits, per_row=per_row, generator=g)) for _ in range(n)]).double()
    step = encode(x, bits=bits, per_row=per_row, generator=g).step.double()
    delta = (step.reshape(-1, 1) if per_row else step.reshape(1, 1)).expand(x.shape)
    # Var <= Δ²/4 bounds the sampling error of the mean of n draws by Δ / (2 sqrt n).
    assert ((draws.mean(0) - x).abs() <= 5 * delta / (2 * n**0.5) + 1e-6).all()
    assert (draws.var(0) <= delta**2 / 4 * 1.2 + 1e-9).all()
    assert ((draws - x).abs() <= delta * (1 + 1e-5) + 1e-6).all()


def test_thirty_two_bits_sends_the_float32_values_unchanged():
    x = _tensor(0)
    e = encode(x, bits=32, per_row=False, generator=torch.Generator())
    assert torch.equal(decode(e), x) and e.nbytes == 4 * x.numel()


def test_a_constant_tensor_is_decoded_exactly():
    x = torch.full((3, 4), 0.25)
    assert torch.equal(decode(encode(x, bits=2, per_row=True, generator=torch.Generator())), x)
