import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from raysim.fastops import TanhGELU, fuse_activations
from raysim.grouped import KeyedDropout, keyed

EPS = torch.finfo(torch.float32).eps


def test_fused_gelu_is_gpt2s_gelu_up_to_rounding():
    """Both evaluate 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) in float32: about eight rounded steps each,
    tanh within a couple of ulp, so they may differ by a few ε relative to the larger of |x| and 1."""
    x = torch.linspace(-12, 12, 200_001, requires_grad=True)
    ours, theirs = TanhGELU()(x), NewGELUActivation()(x)
    bound = 16 * EPS * torch.clamp(x.detach().abs(), min=1.0)
    assert torch.all((ours - theirs).abs() <= bound)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    assert torch.all((g_ours - g_theirs).abs() <= bound)


def test_fusing_swaps_every_gelu_of_a_gpt2_and_keeps_its_function():
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8)).eval()
    x = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=x).logits
    fuse_activations(model)
    assert sum(type(m) is TanhGELU for m in model.modules()) == 2
    assert not any(type(m) is NewGELUActivation for m in model.modules())
    torch.testing.assert_close(model(input_ids=x).logits, before, rtol=1e-5, atol=1e-5)


def test_keyed_dropout_keeps_each_element_with_probability_q_scaled_by_one_over_q():
    drop = KeyedDropout(0.1)
    x = torch.full((4, 250_000), 3.0)
    with keyed([torch.Generator().manual_seed(s) for s in range(4)]):
        y = drop(x)
    kept = y != 0
    assert torch.all(y[kept] == 3.0 * (torch.tensor(1.0) / 0.9))  # x · (1/q), as F.dropout scales
    n, q = x.numel(), 0.9
    assert abs(kept.sum().item() - q * n) < 5 * (n * q * (1 - q)) ** 0.5  # binomial: within 5 sigma


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_serves_a_freed_large_tensor_again_without_page_faults():
    """A 64 MiB tensor freed and allocated again: from fresh mmap pages (16,384 faults each time) by default,
    from the kept heap (none) once :func:`keep_freed_memory` applied. In a fresh process: the setting is
    process-wide."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from raysim.fastops import keep_freed_memory
        applied = keep_freed_memory()
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(16 << 20); x.fill_(1.0); del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        for _ in range(3):  # the first ones grow the heap
            faults()
        print(applied, faults())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "False":
        pytest.skip("not glibc")
    assert int(out[1]) < 1000  # 64 MiB is 16,384 pages of 4 KiB
