import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from raysim.models import fastops
from raysim.models.fastops import TanhGELU, device_losses, fuse_activations
from raysim.models.grouped import DropoutKeys, KeyedDropout, keyed, per_device_loss

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
    keys = DropoutKeys()
    drop = KeyedDropout(0.1, keys)
    x = torch.full((4, 250_000), 3.0)
    with keyed(keys, [torch.Generator().manual_seed(s) for s in range(4)]):
        y = drop(x)
    kept = y != 0
    assert torch.all(y[kept] == 3.0 * (torch.tensor(1.0) / 0.9))  # x · (1/q), as F.dropout scales
    n, q = x.numel(), 0.9
    assert abs(kept.sum().item() - q * n) < 5 * (n * q * (1 - q)) ** 0.5  # binomial: within 5 sigma


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_serves_a_freed_large_tensor_again_without_page_faults():
    """A 64 MiB tensor freed and allocated again, 20 times: by default each one comes from fresh mmap pages
    (16,384 faults of 4 KiB pages every time); once :func:`keep_freed_memory` applied, from the kept heap,
    with no faults once the heap has grown (within a few allocations). Fresh processes: the setting is
    process-wide."""
    code = textwrap.dedent("""
        import resource, sys, torch
        from raysim.models.fastops import keep_freed_memory
        applied = keep_freed_memory() if sys.argv[1] == "keep" else None
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            x = torch.empty(16 << 20); x.fill_(1.0); del x
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print(applied, *[faults() for _ in range(20)][-5:])
    """)

    def last_faults(mode: str) -> tuple[str, list[int]]:
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True)
        applied, *faults = out.stdout.split()
        return applied, [int(f) for f in faults]

    applied, kept = last_faults("keep")
    if applied == "False":
        pytest.skip("not glibc")
    _, default = last_faults("default")
    assert all(f >= 16_000 for f in default)  # the test can tell: glibc's default maps and unmaps each time
    assert all(f < 1_000 for f in kept)


def _tiny_gpt2(**kw) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=12, bos_token_id=0,
                                      eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)).eval()


def _reference(model, tokens, devices):
    return per_device_loss(model(input_ids=tokens).logits, tokens, devices=devices)


@pytest.mark.parametrize("rows_per_chunk", [3, 512])  # chunks that cut a device's rows, and one chunk
def test_head_loss_is_the_causal_lm_loss_and_its_gradient(monkeypatch, rows_per_chunk):
    """Same kernels per position as ``F.cross_entropy`` on the full logits, so loss and gradients agree to
    float32 rounding of sums taken in another order (relative 1e-6, a few ε times the terms' count)."""
    monkeypatch.setattr(fastops, "CHUNK_ROWS", rows_per_chunk)
    model = _tiny_gpt2()
    model.lm_head.weight.requires_grad_(False)  # tied to the input embedding: frozen, as under LoRA
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, 40, (6, 12), generator=torch.Generator().manual_seed(1))
    weights = torch.tensor([1.0, -2.0, 0.5])  # an upstream gradient other than ones reaches each device
    ours = device_losses(model, tokens, devices=3)
    g_ours = torch.autograd.grad((ours * weights).sum(), trainable)
    theirs = _reference(model, tokens, 3)
    g_theirs = torch.autograd.grad((theirs * weights).sum(), trainable)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_a_trainable_head_takes_the_plain_loss():
    model = _tiny_gpt2()  # the tied embedding trains (partial embeddings): the head's gradient is needed
    tokens = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    loss = device_losses(model, tokens, devices=1)
    assert loss.grad_fn.name() != "_NextTokenHeadLossBackward"
    loss.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    torch.testing.assert_close(loss, _reference(model, tokens, 1))
