"""The model owner's side of offsite-tuning: emulators built on the public split before round 1, cached.

Per ``methods.emulator`` name, :func:`build` makes the :class:`~raysim.offsite.emulator.Emulator` its spec
(``emulators.<name>``) describes from the pre-trained base model:

- ``uniform``: the middle blocks at Offsite-Tuning's evenly spaced indices (:func:`layout.uniform`);
- ``distilled``: the uniform emulator's kept blocks trained so that the emulator's middle output matches the full
  model's: loss = next-token loss + ``kd_weight`` · KD, KD = mean(((h_full − h_emu) / rms(h_full))²), the
  Offsite-Tuning code's ``get_kd_loss`` (its scripts: weight 30); only the middle trains;
- ``importance``: each middle block scored by how much the public loss rises when it is dropped; the ``keep``
  highest kept;
- ``harmonizer``: ScaleOT's LayerReplace with a simpler estimator than its reinforcement learning (the README
  says how they differ): every middle block gets a harmonizer trained to reproduce that block's output from its
  input; a block's importance is how much the public loss rises when its trained harmonizer stands in for it; in
  each of ``keep`` contiguous groups the most important block stays and the others become their harmonizers,
  which are then trained together with the distillation loss above;
- ``svd_fraction``: then every kept middle block's attention projections at that fraction of their rank.

Nothing here reads a user's text: its only data is the public split. Built emulators are cached under
``pretrain.cache_dir/emulators`` keyed by everything that decides them (:func:`cache_key`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from raysim import rng
from raysim.config import EmulatorConfig, ExperimentConfig
from raysim.io.results import atomic_write
from raysim.methods.emulator import listed
from raysim.models.build import BaseModel, instantiate
from raysim.models.pretrain import hashed, lr_at
from raysim.offsite import layout as layouts
from raysim.offsite.emulator import Emulator, Harmonizer, Skip, attention_projections, install, low_rank, svd_rank

# Bump whenever a change to this module changes what an emulator is (its training, its scores, its choice).
RECIPE_VERSION = 1


def build_emulators(cfg: ExperimentConfig, base: BaseModel, public: torch.Tensor, *, seed: int) -> BaseModel:
    """``base`` with the emulators ``methods.emulator`` names (built, or loaded from the cache)."""
    names = listed(cfg.methods)
    if not names:
        return base
    built = {n: build(n, cfg.emulators[n], base, public, cache_dir=cfg.pretrain.cache_dir, seed=seed,
                      progress=cfg.progress) for n in names}
    return dataclasses.replace(base, emulators=built)


def cache_key(base: BaseModel, public: torch.Tensor, spec: EmulatorConfig, *, seed: int) -> str:
    h = hashed(base, public, recipe=RECIPE_VERSION)
    h.update(repr((sorted(dataclasses.asdict(spec).items()), seed)).encode())
    return h.hexdigest()[:16]


def build(name: str, spec: EmulatorConfig, base: BaseModel, public: torch.Tensor, *, cache_dir: str, seed: int,
          progress: bool) -> Emulator:
    """The emulator ``spec`` describes on ``base`` (a bad spec for the model's sizes: one ConfigError)."""
    lay = layouts.checked(spec, base.sizes.n_layer, name=name)
    key = cache_key(base, public, spec, seed=seed)
    path = Path(cache_dir).expanduser() / "emulators" / f"{key}.pt"
    if path.is_file():
        return _from_file(torch.load(path, weights_only=True), name=name, spec=spec, lay=lay, key=key)
    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    try:
        trainer = _Owner(base, public, spec, lay, seed=seed, progress=progress, name=name)
        emulator = dataclasses.replace(trainer.make(), name=name, key=key)
    finally:
        torch.set_num_threads(threads)
    record = {"kept": list(emulator.kept), "harmonized": list(emulator.harmonized),
              "ranks": [list(r) for r in emulator.ranks], "scores": [list(s) for s in emulator.scores],
              "state": emulator.state}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(record, tmp))
    return emulator


def _from_file(record: dict, *, name: str, spec: EmulatorConfig, lay: layouts.Layout, key: str) -> Emulator:
    return Emulator(name=name, kind=spec.kind, layout=lay, kept=tuple(record["kept"]),
                    harmonized=tuple(record["harmonized"]), harmonizer_rank=spec.harmonizer_rank,
                    ranks=tuple((str(n), int(r)) for n, r in record["ranks"]),
                    scores=tuple((int(b), float(s)) for b, s in record["scores"]), state=record["state"], key=key)


class _Owner:
    """The model owner building one emulator: the full model (the teacher), the public split, the spec."""

    def __init__(self, base: BaseModel, public: torch.Tensor, spec: EmulatorConfig, lay: layouts.Layout, *,
                 seed: int, progress: bool, name: str):
        self.base, self.public, self.spec, self.lay, self.seed = base, public, spec, lay, seed
        self.progress, self.name = progress, name
        self.arch = base.architecture
        self.scoring = public[:spec.score_sequences]

    @functools.cached_property
    def teacher(self) -> nn.Module:
        """The full model, frozen (built on first use: a uniform emulator needs none)."""
        return instantiate(self.base).eval().requires_grad_(False)

    def make(self) -> Emulator:
        if self.spec.kind != "uniform":
            print(f"raysim: building the {self.spec.kind} emulator {self.name!r} on {len(self.public):,} public "
                  f"sequences (cached)", file=sys.stderr)
        emulator = getattr(self, self.spec.kind)()  # every name of layouts.KINDS is a method here
        return self.compressed(emulator) if self.spec.svd_fraction is not None else emulator

    def uniform(self) -> Emulator:
        return self.emulator(kept=layouts.uniform(self.lay))

    def importance(self) -> Emulator:
        """The ``keep`` middle blocks whose removal raises the public loss most."""
        lay = self.lay
        scores = self.scores({b: Skip() for b in lay.middle})
        return self.emulator(kept=layouts.most_important(scores, lay.middle, lay.keep), scores=scores)

    def emulator(self, *, kept: tuple[int, ...], harmonized: tuple[int, ...] = (), scores: dict | None = None,
                 state: dict | None = None) -> Emulator:
        return Emulator(name=self.name, kind=self.spec.kind, layout=self.lay, kept=kept, harmonized=harmonized,
                        harmonizer_rank=self.spec.harmonizer_rank if harmonized else 0, state=state or {},
                        scores=tuple(sorted((scores or {}).items())))

    def model(self, emulator: Emulator) -> nn.Module:
        model = install(instantiate(self.base), emulator, self.arch, width=self.base.sizes.width)
        return model.eval().requires_grad_(False)

    def public_loss(self, model: nn.Module) -> float:
        """The mean next-token loss on the scoring sequences."""
        with torch.no_grad():
            return sum(model(input_ids=x, labels=x).loss.item() * len(x) for x in self.scoring.split(16)) / len(
                self.scoring)

    def scores(self, stand_ins: dict[int, nn.Module]) -> dict[int, float]:
        """Per middle block, how much the public loss rises when ``stand_ins[block]`` replaces it alone."""
        full, blocks, out = self.public_loss(self.teacher), self.teacher.get_submodule(self.arch.blocks), {}
        for b, stand_in in stand_ins.items():
            original, blocks[b] = blocks[b], stand_in
            try:
                out[b] = self.public_loss(self.teacher) - full
            finally:
                blocks[b] = original
        return out

    def distilled(self) -> Emulator:
        """The uniform emulator's kept middle blocks trained to the distillation loss."""
        emulator = self.emulator(kept=layouts.uniform(self.lay))
        student = self.model(emulator)
        names = [n for n, _ in student.named_parameters()
                 if any(n.startswith(f"{self.arch.block(b)}.") for b in emulator.kept)]
        self.train(student, names, desc="distilling")
        params = dict(student.named_parameters())
        return dataclasses.replace(emulator, state={n: params[n].detach().clone() for n in names})

    def harmonizer(self) -> Emulator:
        """ScaleOT's LayerReplace (see the module's docstring): harmonizers fitted per block, scored, chosen per
        group, then trained together."""
        lay, spec = self.lay, self.spec
        torch.manual_seed(rng.torch_seed(self.seed, "emulator", "harmonizers"))
        stand_ins = {b: Harmonizer(self.base.sizes.width, spec.harmonizer_rank) for b in lay.middle}
        self.fit_blockwise(stand_ins)
        scores = self.scores(stand_ins)
        kept = tuple(sorted(b for g in layouts.groups(lay) for b in layouts.most_important(scores, g, 1)))
        harmonized = tuple(b for b in lay.middle if b not in kept)
        state = {f"{self.arch.block(b)}.{n}": p.detach().clone() for b in harmonized
                 for n, p in stand_ins[b].named_parameters()}
        emulator = self.emulator(kept=kept, harmonized=harmonized, scores=scores, state=state)
        student = self.model(emulator)
        names = [n for n in state]
        self.train(student, names, desc="training harmonizers")
        params = dict(student.named_parameters())
        return dataclasses.replace(emulator, state={n: params[n].detach().clone() for n in names})

    def compressed(self, emulator: Emulator) -> Emulator:
        """Selective rank compression: the kept middle blocks' attention projections by their truncated SVD."""
        weights = self.model(emulator).state_dict()
        state, ranks = dict(emulator.state), []
        for b in emulator.kept:
            for name in attention_projections(self.arch, b):
                w = weights[f"{name}.weight"]
                shape = tuple(w.shape[::-1]) if self.arch.transposed else tuple(w.shape)
                rank = svd_rank(shape, self.spec.svd_fraction)
                factors = low_rank(w, weights.get(f"{name}.bias"), rank=rank, transposed=self.arch.transposed)
                for k in (f"{name}.weight", f"{name}.bias"):
                    state.pop(k, None)
                state |= {f"{name}.{k}": v for k, v in factors.items()}
                ranks.append((name, rank))
        return dataclasses.replace(emulator, ranks=tuple(ranks), state=state)

    def fit_blockwise(self, stand_ins: dict[int, Harmonizer]) -> None:
        """Each harmonizer trained to map its block's input to its output in the full model (normalised squared
        error, the KD loss's form), all from one teacher pass per step."""
        blocks = self.teacher.get_submodule(self.arch.blocks)
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [blocks[b].register_forward_hook(_keep_io(seen, b)) for b in stand_ins]
        params = [p for h in stand_ins.values() for p in h.parameters()]
        try:
            def loss(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    self.teacher(input_ids=x)
                return sum(kd(out, stand_ins[b](inp)) for b, (inp, out) in seen.items())

            self.optimise(params, loss, desc="fitting harmonizers", purpose="blockwise")
        finally:
            for hook in hooks:
                hook.remove()

    def train(self, student: nn.Module, names: list[str], *, desc: str) -> None:
        """``student``'s parameters ``names`` trained to next-token loss + kd_weight · KD at the middle's output."""
        last = self.lay.middle[-1]
        taught: dict[int, tuple] = {}
        learnt: dict[int, tuple] = {}
        hooks = [self.teacher.get_submodule(self.arch.block(last)).register_forward_hook(_keep_io(taught, last)),
                 student.get_submodule(self.arch.block(last)).register_forward_hook(_keep_io(learnt, last))]
        params = dict(student.named_parameters())
        for n in names:
            params[n].requires_grad_(True)

        def loss(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.teacher(input_ids=x)
            lm = student(input_ids=x, labels=x).loss
            return lm + self.spec.kd_weight * kd(taught[last][1], learnt[last][1])

        try:
            self.optimise([params[n] for n in names], loss, desc=desc, purpose=desc)
        finally:
            for hook in hooks:
                hook.remove()
            student.requires_grad_(False)

    def optimise(self, params: list[nn.Parameter], loss: Callable[[torch.Tensor], torch.Tensor], *, desc: str,
                 purpose: str) -> None:
        """AdamW on ``loss`` over batches of the public split, pretrain's schedule, gradients clipped at 1."""
        spec = self.spec
        opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        g = rng.generator(self.seed, "emulator", purpose)
        bar = tqdm(range(spec.steps), desc=f"emulator {self.name}: {desc}", disable=not self.progress,
                   file=sys.stderr, dynamic_ncols=True)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps=spec.steps, lr=spec.lr)
            value = loss(self.public[torch.randint(len(self.public), (spec.batch_size,), generator=g)])
            if not torch.isfinite(value):
                raise ArithmeticError(f"emulator {self.name}: {desc} diverged at step {step} (loss {value.item()}); "
                                      f"lower emulators.{self.name}.lr")
            value.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


def kd(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Offsite-Tuning's distillation loss: mean(((T − S) / rms(T))²), rms over every element of T."""
    return ((teacher - student) / teacher.pow(2).mean().sqrt()).pow(2).mean()


def _keep_io(into: dict, block: int) -> Callable:
    def hook(module: nn.Module, args: Iterable, output: torch.Tensor) -> None:
        into[block] = (args[0], output)
    return hook
