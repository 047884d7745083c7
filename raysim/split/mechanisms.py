"""How a split device hides its labels from the server: ``split.mechanism`` names one (:data:`MECHANISMS`).

A mechanism decides how many adapter sets the server runs for a device (each a full set of the server's
adapters, run on the same activations from the cut) and the device's loss on what the sets send down.
Everything it adds to the loss reaches the server only through the gradients the device sends up.

- ``plain``: split LoRA as it is, one adapter set; the server's output feeds the head.
- ``dcor``: plus ``split.dcor_weight`` times log dCor² between the server's outputs and the labels in the
  batch (Sun et al. 2022, as P³EFT's code ``dc_regularizing_loss`` computes it, with one-hot labels where the
  code takes the label index as a number: the same for two labels, and no false order among more).
- ``p3eft``: ``split.adapter_sets`` sets (:class:`P3EFT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raysim import rng
from raysim.registry import Registry
from raysim.split.leakage import logistic


def log_dcor2(x: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """log of the squared sample distance correlation between the rows of ``x`` and the one-hot ``labels``."""
    def centred(d: torch.Tensor) -> torch.Tensor:
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    y = F.one_hot(labels, classes).to(x.dtype)
    a, b = centred(torch.cdist(x, x)), centred(torch.cdist(y, y))
    return torch.log((a * b).mean() / torch.sqrt((a * a).mean() * (b * b).mean()))


@dataclass(frozen=True)
class Mechanism:
    """Split LoRA with one adapter set: the device's loss is its head's cross-entropy."""

    classes: int

    def loss(self, head: nn.Module, outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The device's task loss on the server's outputs (one tensor per adapter set, each (batch, d))."""
        return F.cross_entropy(head(outputs[0]).float(), labels)

    def regulariser(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor | None:
        """What the mechanism adds to the task loss to hide the labels (None: nothing)."""
        return None


@dataclass(frozen=True)
class DistanceCorrelation(Mechanism):
    weight: float = 0.0

    def regulariser(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor | None:
        if self.weight == 0 or len(labels.unique()) < 2:  # no distance correlation with one label in the batch
            return None
        return self.weight * log_dcor2(outputs[0].float(), labels, self.classes)


@dataclass(frozen=True)
class P3EFT(Mechanism):
    """P³EFT (Zmushko et al., arXiv 2412.16669; ``ModelWithMultipleLoras`` in its code): the server runs ``n``
    adapter sets on the activations from the cut; the device mixes their outputs with private per-dimension
    coefficients ``c_i = 1/n + Σ_j A_ij``, A antisymmetric with ``A_ij ~ N(0, σ²)`` per dimension, so that
    ``Σ_i c_i = 1`` and the server sees each set's output gradient scaled by a secret ``c_i``. Each step the
    device also fits a logistic probe to each set's outputs in the batch and adds ``adversary_weight`` times the
    probe's cross-entropy against the flipped labels (binary: ``1 - y``; more labels: the probe's negated
    logits), pushing every set's outputs away from what a probe reads.

    As in the code, the coefficients are drawn once and never change, and the probe is refit from scratch on
    each batch (scikit-learn's ``LogisticRegression(max_iter=150)`` there; L-BFGS on the same L2-penalised
    objective here, :func:`raysim.split.leakage.logistic`). Left out, as the code leaves it out: the paper's
    private backpropagation (several noisy backward passes that the device combines into the true gradient).
    """

    coefficients: torch.Tensor | None = None  # (n, d): one row per adapter set
    adversary_weight: float = 0.0

    def mix(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        c = self.coefficients.to(outputs[0].device, outputs[0].dtype)
        return sum(c[i] * out for i, out in enumerate(outputs))

    def loss(self, head: nn.Module, outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(self.mix(outputs)).float(), labels)

    def regulariser(self, outputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor | None:
        if self.adversary_weight == 0 or len(labels.unique()) < self.classes:  # the code's skip: a class missing
            return None
        return self.adversary_weight * sum(self._adversarial(out, labels) for out in outputs)

    def _adversarial(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = logistic(out.detach().double(), labels, self.classes).to(out.dtype)
        logits = out @ w[:-1] + w[-1]
        if self.classes == 2:  # the code's binary probe: one logit, its binary cross-entropy against 1 - y
            margin = logits[:, 1] - logits[:, 0]
            return F.binary_cross_entropy_with_logits(margin.float(), 1.0 - labels.float())
        return F.cross_entropy(-logits.float(), labels)


def p3eft_coefficients(*, sets: int, width: int, std: float, seed: int) -> torch.Tensor:
    """``c_i = 1/n + Σ_j A_ij`` per dimension, A antisymmetric with N(0, std²) entries, keyed by (seed,
    "p3eft-coefficients"): shape (sets, width), every column summing to 1."""
    g = rng.generator(seed, "p3eft-coefficients")
    a = torch.zeros(sets, sets, width, dtype=torch.float64)
    for i in range(sets):
        for j in range(i + 1, sets):
            a[i, j] = torch.randn(width, generator=g, dtype=torch.float64) * std
            a[j, i] = -a[i, j]
    return (1.0 / sets + a.sum(1)).float()


MECHANISMS: Registry = Registry("split mechanism")  # name -> (split config, classes) -> Mechanism
# split.mechanism names one: (experiment, labels, the model's hidden size) -> Mechanism
MECHANISMS.register("plain")(lambda cfg, classes, width: Mechanism(classes=classes))
MECHANISMS.register("dcor")(lambda cfg, classes, width: DistanceCorrelation(classes=classes,
                                                                           weight=cfg.split.dcor_weight))
MECHANISMS.register("p3eft")(lambda cfg, classes, width: P3EFT(
    classes=classes, adversary_weight=cfg.split.adversary_weight,
    coefficients=p3eft_coefficients(sets=cfg.split.adapter_sets, width=width, std=cfg.split.coefficient_std,
                                    seed=cfg.seed)))


def build(cfg, *, classes: int, width: int) -> Mechanism:
    """The mechanism ``split.mechanism`` names, set up from the experiment."""
    return MECHANISMS[cfg.split.mechanism](cfg, classes, width)


def adapter_sets(cfg) -> int:
    """How many adapter sets the server keeps per split device: ``split.adapter_sets`` under P³EFT, else 1."""
    return cfg.split.adapter_sets if cfg.split.mechanism == "p3eft" else 1
