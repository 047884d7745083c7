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
from transformers.activations import FastGELUActivation, NewGELUActivation


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
