"""Faster ways to compute the same thing, applied where raysim trains: same functions, fewer passes over memory.

Each one leaves what is computed unchanged up to float rounding (or exactly,
where said), and each was measured on a W2 round (``bench/breakdown.py``).
"""

from __future__ import annotations

import ctypes
import platform

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.activations import FastGELUActivation, NewGELUActivation

from raysim.models.grouped import per_device_loss


class TanhGELU(nn.Module):
    """GPT-2's tanh-approximated GELU as one fused kernel forward and one backward.

    transformers' ``NewGELUActivation`` (``gelu_new``, GPT-2's) and ``FastGELUActivation`` write that same
    function as eight elementwise ops, each a pass over the MLP's activations, and as many again backward.
    ``F.gelu(approximate="tanh")`` computes it in one; outputs differ by rounding (at most 2.4e-7 absolute
    on [-10, 10] in float32, ``tests/test_fastops.py``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


def fuse_activations(model: nn.Module) -> None:
    """Swap every tanh-approximated GELU module of ``model`` for :class:`TanhGELU`."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, TanhGELU())


# Models whose logits are exactly ``lm_head(base_model(...).last_hidden_state)``: no scaling, capping or bias.
HEAD_LOSS_MODELS = (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
CHUNK_ROWS = 512  # positions per chunk: a W2 chunk's logits (512 x 1024 floats, 2 MiB) stay in cache


class _NextTokenHeadLoss(torch.autograd.Function):
    """Each device's mean next-token loss through a frozen output head, and its gradient, chunk by chunk.

    The loss is the last node of the graph and its gradient is known in the forward pass (one per device,
    scaled in backward by the caller's), so the gradient with respect to the hidden states is taken right
    there, a chunk of positions at a time: logits, log-softmax, the loss, the log-softmax gradient (the
    kernels ``F.cross_entropy`` runs backward) and its product with the head, while the chunk is in cache.
    The full (positions, vocab) logits, their log-softmax and their gradient never exist; the last position
    of each sequence, which predicts nothing, gets no logits at all.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, devices: int) -> torch.Tensor:
        rows, length, width = hidden.shape
        count = rows // devices * (length - 1)  # positions with a next token, per device
        nll = torch.empty(rows, length - 1, dtype=torch.float32, device=hidden.device)
        grad = torch.zeros_like(hidden)
        step = max(1, CHUNK_ROWS // (length - 1))  # whole sequences per chunk
        for start in range(0, rows, step):
            end = min(rows, start + step)
            h = hidden[start:end, :-1].reshape(-1, width)
            target = tokens[start:end, 1:].reshape(-1, 1)
            log_probs = torch.log_softmax((h @ weight.T).float(), dim=-1)
            nll[start:end] = -log_probs.gather(1, target).view(end - start, length - 1)
            grad_out = torch.zeros_like(log_probs).scatter_(1, target, -1.0 / count)
            grad_logits = torch._log_softmax_backward_data(grad_out, log_probs, 1, log_probs.dtype)
            grad[start:end, :-1] = (grad_logits.to(weight.dtype) @ weight).view(end - start, length - 1, width)
        ctx.save_for_backward(grad)
        ctx.devices = devices
        return nll.view(devices, -1).sum(1) / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        per_row = grad_loss.to(grad.dtype).repeat_interleave(grad.shape[0] // ctx.devices)
        return grad * per_row.view(-1, 1, 1), None, None, None


def device_losses(model: nn.Module, tokens: torch.Tensor, *, devices: int, chunked: bool = True) -> torch.Tensor:
    """Each device's mean next-token loss over its rows of ``tokens`` (``devices`` equal row blocks), as
    transformers' causal-LM loss; through :class:`_NextTokenHeadLoss` where the model's head allows, unless
    ``chunked`` is off (``speedups.chunked_loss``)."""
    head = model.get_output_embeddings() if chunked and isinstance(model, HEAD_LOSS_MODELS) else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return per_device_loss(model(input_ids=tokens).logits, tokens, devices=devices)
    hidden = model.base_model(input_ids=tokens).last_hidden_state
    return _NextTokenHeadLoss.apply(hidden, head.weight, tokens, devices)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory in the process instead of returning it to the kernel at once.

    A pass allocates and frees the same large tensors (the logits, their gradient) every time. By default
    glibc serves allocations above its threshold from fresh ``mmap`` pages and unmaps them on free, so each
    pass pays a page fault per 4 KiB page and the kernel's zeroing of it: a fifth of a W2 actor's time on
    an AMD EPYC (``bench/breakdown.py``). With both thresholds at 1 GiB the heap keeps those pages: the
    process's RSS stays near its peak instead of dropping between passes. Results are unchanged, bit for
    bit. Returns whether it applied (Linux with glibc only; elsewhere the allocator is left as it is).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
