"""What an actor computes on the global model itself: held-out evaluation, and each update's utility.

:class:`HeldOut` scores the held-out sequences on the round's global state
(every adapter family's state applied, :meth:`Submodel.frozen_weights`).
:class:`Utility` turns the gradient of that loss into each device update's
first-order utility, the feedback the ``rl`` policy learns from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from raysim.data.base import FederatedDataset
from raysim.methods.coordinates import Space, Structure
from raysim.methods.submodel import Submodel
from raysim.models import classifier
from raysim.split.mechanisms import Mechanism

Tensors = dict[str, torch.Tensor]
UTILITY_EXAMPLES = 128  # held-out sequences the utility gradient is taken on


class HeldOut:
    """The held-out sequences (loaded on first use) and the global model they are scored on."""

    def __init__(self, *, space: Space, base, cfg, dataset: FederatedDataset, device: torch.device,
                 mixing: Mechanism | None = None):
        self.space, self.dataset, self.device = space, dataset, device
        self.batch_size = cfg.eval.batch_size
        whole = Structure(rank=0, heads=space.units, mlp=space.inner, blocks=(), embeddings=False,
                          adapter=space.adapters[0])
        self.model = Submodel(space=space, base=base, cfg=cfg, device=device, structure=whole)
        # offsite-tuning: the method space's first emulator alone, with the global adapters in its adapter blocks
        self.emulator = None if not space.emulators else Submodel(
            space=space, base=base, cfg=cfg, device=device, structure=replace(whole, emulator=space.emulators[0][0]))
        self._examples: torch.Tensor | None = None
        self.mixing = mixing  # the split mechanism: under P³EFT (space.sets > 1) how the head mixes the sets

    def examples(self) -> torch.Tensor:
        if self._examples is None:
            self._examples = self.dataset.eval_examples()
        return self._examples

    def num_batches(self) -> int:
        return -(-len(self.examples()) // self.batch_size)

    def evaluate(self, state: Tensors, batches: list[int]) -> np.ndarray:
        """Per held-out batch (``eval.batch_size`` sequences each): summed next-token loss, tokens, top-1 and
        top-3 hits (classification: summed cross-entropy, sequences, and the label's hits among the top 1 and 3
        logits); with an emulator, four more columns: the same of the emulator alone. A batch's numbers do not
        depend on which others were evaluated with it."""
        rows, size = self.examples(), self.batch_size
        models = [self.model] if self.emulator is None else [self.model, self.emulator]
        totals = np.zeros((len(batches), 4 * len(models)), dtype=np.float64)
        with torch.no_grad():
            chunks = [rows[b * size:(b + 1) * size].to(self.device) for b in batches]
            for j, model in enumerate(models):
                model.lm.eval()
                for i, (logits, target) in enumerate(self._scores(state, chunks, [b * size for b in batches],
                                                                  model)):
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten(),
                                                             reduction="sum")
                    top3 = logits.topk(min(3, logits.shape[-1]), dim=-1).indices
                    totals[i, 4 * j:4 * j + 4] = [loss.item(), target.numel(), (top3[..., 0] == target).sum().item(),
                                                  (top3 == target.unsqueeze(-1)).any(-1).sum().item()]
        return totals

    def _scores(self, state: Tensors, chunks: list[torch.Tensor], starts: list[int],
                model: Submodel) -> Iterator[tuple]:
        """Each chunk's logits and targets on ``state`` in ``model``; under P³EFT, the head on the adapter sets'
        outputs mixed with the devices' coefficients (each set's state loaded in turn)."""
        state = {k: v.to(self.device) for k, v in state.items()}
        if self.space.sets == 1:  # one chunk's logits at a time
            model.load_frozen(state, None, version=object())
            yield from (self._scored(model.lm, chunk, start) for chunk, start in zip(chunks, starts))
            return
        outputs = []
        for i in range(self.space.sets):
            model.load_frozen(self.space.view(state, i), None, version=object())
            outputs.append([classifier.features(model.lm, chunk, self.dataset.pad_id) for chunk in chunks])
        head = getattr(model.lm, classifier.HEAD)
        labels = self.dataset.eval_labels
        for j, (chunk, start) in enumerate(zip(chunks, starts)):
            target = labels[start:start + len(chunk)].to(self.device)
            yield head(self.mixing.mix([o[j] for o in outputs])).float(), target

    def _scored(self, lm: torch.nn.Module, batch: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits the held-out loss scores and their targets, for the sequences from ``start`` on."""
        if not self.space.classes:
            return lm(input_ids=batch).logits[:, :-1].float(), batch[:, 1:]
        labels = self.dataset.eval_labels[start:start + len(batch)].to(self.device)
        return classifier.logits(lm, batch, self.dataset.pad_id), labels

    def loss_gradient(self, state: Tensors) -> tuple[Tensors, float]:
        """The held-out loss per token at ``state``, and its gradient with respect to every state entry, taken
        through the same composition of adapter families the devices start from (on the first
        ``UTILITY_EXAMPLES`` held-out sequences, the data the eval loss is measured on)."""
        model = self.model
        model.load_frozen(state, None, version=object())
        model.lm.eval()
        with torch.enable_grad():  # called from inside the update loop's no_grad
            leaves = {k: v.detach().requires_grad_(True) for k, v in state.items()}
            weights = {}  # the targeted projections' weights as functions of the state
            for name, _, _ in self.space.projections():
                if model.adapted(name):
                    weights[f"{name}.weight"], bias = model.frozen_weights(leaves, name, None, None)
                    if bias is not None:
                        weights[f"{name}.bias"] = bias
            if self.space.embedding in leaves:
                weights[self.space.embedding] = leaves[self.space.embedding]
            if classifier.HEAD_WEIGHT in leaves:
                weights[classifier.HEAD_WEIGHT] = leaves[classifier.HEAD_WEIGHT]
            batch = self.examples()[:UTILITY_EXAMPLES].to(self.device)
            if self.space.classes:
                logits = torch.func.functional_call(_Classify(model.lm, self.dataset.pad_id),
                                                    {f"lm.{k}": v for k, v in weights.items()}, args=(batch,))
                target = self.dataset.eval_labels[:len(batch)].to(self.device)
            else:
                logits = torch.func.functional_call(model.lm, weights, args=(), kwargs={"input_ids": batch}).logits
                logits, target = logits[:, :-1].float(), batch[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten())
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        return {k: g for k, g in zip(leaves, grads) if g is not None}, loss.item()


class _Classify(torch.nn.Module):
    """A classifier's logits as a module's output (what ``functional_call`` differentiates)."""

    def __init__(self, lm: torch.nn.Module, pad_id: int):
        super().__init__()
        self.lm, self.pad_id = lm, pad_id

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return classifier.logits(self.lm, tokens, self.pad_id)


class Utility:
    """Each update's utility in one round: the first-order relative drop of the held-out loss if the decoded
    update (in full coordinates) were applied alone, ``-<gradient, update> / loss``.

    FedAvg applies a weighted mean of the updates, so the round's first-order
    progress is the same mean of the utilities. The gradient is taken on the
    first update that needs it (an actor without devices skips it); NaN unless
    asked, and under a LoRA rule that holds factors rather than ``ΔW``.
    """

    def __init__(self, held_out: HeldOut):
        self.held_out = held_out
        self._state: Tensors = {}
        self._wanted = False
        self._gradient: tuple[Tensors, float] | None = None

    def begin_round(self, state: Tensors, *, wanted: bool) -> None:
        self._state, self._gradient = state, None
        self._wanted = wanted and self.held_out.space.rule.dense  # the gradient is taken with respect to ΔW

    def __call__(self, update: Tensors) -> float:
        if not self._wanted:
            return float("nan")
        if self._gradient is None:
            self._gradient = self.held_out.loss_gradient(self._state)
        grads, loss = self._gradient
        return -sum(float((grads[k] * update[k]).sum()) for k in grads if k in update) / loss
