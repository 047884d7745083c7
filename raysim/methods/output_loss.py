"""Output losses that score k sampled tokens instead of the whole vocabulary (Xu et al., arXiv 2207.08988).

The full softmax (``methods.output_loss: softmax``) computes a (positions, V) logits tensor, its
log-softmax and its gradient: with a large vocabulary that is most of a device's memory and FLOPs. The two
sampled losses score each position's target and ``k = methods.noise_samples`` noise tokens drawn with
replacement from a proposal ``q``: public-data unigram counts plus one (every token has ``q > 0``). One
sample set per device and local step, shared by all of that device's positions, keyed by (seed, round,
device): the negatives' logits are one (positions, d) x (d, k) matmul, and a device's draws do not depend
on the devices it shares a pass with. Evaluation always uses the full softmax.

- ``sampled_softmax`` (Bengio & Senécal 2008; Jean et al. 2015): a softmax over the target and the samples,
  each logit corrected by ``-log(k q(w))`` (its expected count among the k draws); a sample equal to the
  position's target is dropped (an accidental hit). With a uniform ``q`` and the samples all V tokens once,
  the corrections are ``log(V / V) = 0`` and no other token is dropped: exactly the full softmax.
- ``nce`` (Gutmann & Hyvärinen 2010; Mnih & Teh 2012): logistic regression of data against noise, the
  logit ``s`` read as a self-normalised log-probability, ``P(data | w) = sigmoid(s_w - log(k q(w)))``. Per
  position: ``softplus(-(s_t - log k q_t)) + sum_j softplus(s_j - log k q_j)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysim.registry import Registry

# ``methods.output_loss`` names one of these, or ``softmax`` (the full softmax, no sampling); each is a loss per
# position from the corrected logits of the targets, of the samples, and where a sample is the target
SAMPLED: Registry[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("output loss")


def proposal(counts: torch.Tensor) -> torch.Tensor:
    """The noise distribution ``q``: unigram ``counts`` plus one, normalised (float64)."""
    q = counts.double() + 1.0
    return q / q.sum()


def corrected_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                     samples: torch.Tensor, log_kq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets' and samples' logits less ``log(k q)``.

    ``hidden`` (devices, n, d), ``targets`` (devices, n), ``samples`` (devices, k), ``log_kq`` (V,): returns
    (devices, n) and (devices, n, k).
    """
    true = (hidden * weight[targets]).sum(-1) - log_kq[targets]
    negative = torch.bmm(hidden, weight[samples].transpose(1, 2)) - log_kq[samples].unsqueeze(1)
    if bias is not None:
        true = true + bias[targets]
        negative = negative + bias[samples].unsqueeze(1)
    return true, negative


@SAMPLED.register("nce")
def nce(true: torch.Tensor, negative: torch.Tensor, hits: torch.Tensor | None = None) -> torch.Tensor:
    """Per position NCE loss: the target classified as data, each sample as noise (a sample equal to the target
    too: ``hits`` is not used)."""
    return F.softplus(-true) + F.softplus(negative).sum(-1)


@SAMPLED.register("sampled_softmax")
def sampled_softmax(true: torch.Tensor, negative: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
    """Per position ``-log softmax`` of the target among {target} and the samples not equal to it (``hits``)."""
    logits = torch.cat([true.unsqueeze(-1), negative.masked_fill(hits, -math.inf)], dim=-1)
    return torch.logsumexp(logits, dim=-1) - true


@dataclass(frozen=True)
class OutputLoss:
    """A sampled output loss (``kind``: nce | sampled_softmax) with ``samples`` draws from ``q`` per step."""

    kind: str
    samples: int
    q: torch.Tensor  # (V,) float64, sums to 1

    def draw(self, generators: list[torch.Generator]) -> torch.Tensor:
        """(devices, k) token ids: each device's sample set for one step, from its own generator."""
        return torch.stack([torch.multinomial(self.q, self.samples, replacement=True, generator=g)
                            for g in generators])

    def losses(self, model: nn.Module, tokens: torch.Tensor, *, devices: int, samples: torch.Tensor) -> torch.Tensor:
        """Each device's mean next-token loss over its rows of ``tokens`` (``devices`` equal row blocks), each
        device scoring its row of ``samples`` (devices, k)."""
        head = model.get_output_embeddings()
        hidden = model.base_model(input_ids=tokens).last_hidden_state[:, :-1]
        rows, length, width = hidden.shape
        hidden = hidden.reshape(devices, -1, width)
        targets = tokens[:, 1:].reshape(devices, -1)
        samples = samples.to(tokens.device)
        log_kq = (math.log(self.samples) + self.q.log()).to(device=hidden.device, dtype=hidden.dtype)
        true, negative = corrected_logits(hidden, head.weight, head.bias, targets, samples, log_kq)
        hits = samples.unsqueeze(1) == targets.unsqueeze(-1)
        return SAMPLED[self.kind](true.float(), negative.float(), hits).mean(1)
