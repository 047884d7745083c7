"""Local (record-level) DP-SGD on each device, through Opacus.

A device that trains with DP-SGD samples each step's batch by Poisson
sampling of its own examples (rate batch_size / examples), clips every
example's gradient of the trainable (LoRA) parameters to ``clip_norm``, and
adds Gaussian noise of std ``noise_multiplier * clip_norm`` to their sum:
Opacus's ``GradSampleModule`` and ``DPOptimizer`` do the per-example work.
Its ε, for one round's local training at ``privacy.local.delta``, is what
Opacus's accountant gives for (z, q, local steps); a device that takes part
in k rounds composes k of them.
"""

from __future__ import annotations

import functools
import warnings

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from raysim.config import LocalPrivacyConfig, TrainConfig
from raysim.privacy import accounting

# Opacus's per-example hooks on LoRA layers whose inputs (frozen activations) need no grad: expected, harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def poisson_batches(num_examples: int, *, steps: int, batch_size: int,
                    generator: torch.Generator) -> list[torch.Tensor]:
    """Each step's batch: every example independently with rate batch_size / num_examples (may be empty)."""
    q = min(1.0, batch_size / num_examples)
    return [torch.nonzero(torch.rand(num_examples, generator=generator) < q).flatten() for _ in range(steps)]


def device_epsilon(*, num_examples: int, cfg: LocalPrivacyConfig, train: TrainConfig) -> float:
    """Record-level ε of one round's DP-SGD on a device holding ``num_examples`` examples."""
    return _epsilon(cfg.noise_multiplier, min(1.0, train.batch_size / num_examples), train.local_steps, cfg.delta)


@functools.lru_cache(maxsize=4096)
def _epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    return accounting.epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, rounds=steps, delta=delta)


class LocalDPSGD:
    """A worker's model and optimizer wrapped once for DP-SGD; used device after device."""

    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: LocalPrivacyConfig,
                 batch_size: int):
        self.model = GradSampleModule(model)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=cfg.noise_multiplier, max_grad_norm=cfg.clip_norm,
                                     expected_batch_size=batch_size)

    def train(self, data: torch.Tensor, *, steps: int, batch_size: int, device: torch.device,
              batch_generator: torch.Generator, noise_generator: torch.Generator) -> float:
        """``steps`` DP-SGD steps on one device's examples; the mean loss over non-empty batches.

        An empty Poisson batch is still a step: the noise alone moves the weights,
        as the accountant assumes.
        """
        self.optimizer.generator = noise_generator
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for index in poisson_batches(len(data), steps=steps, batch_size=batch_size, generator=batch_generator):
            if len(index):
                x = data[index].to(device)
                loss = self.model(input_ids=x, labels=x).loss
                loss.backward()
                losses.append(loss.detach())
            else:
                for p in self.optimizer.params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).mean().item() if losses else float("nan")
