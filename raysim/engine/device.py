"""The device worker: one long-lived process slot that emulates many devices in turn.

A worker holds the base model once, and one real submodel per distinct
structure its devices' configs ask for (:mod:`raysim.methods.submodel`). For
each device it is handed, it loads the device's view of the round's global
state into that submodel, trains for real on the device's data with every
random draw keyed by (seed, round, device id), encodes the update as the
device would send it, maps the decoded update back to full coordinates, runs
it through the update processors' device side (central DP clips there) and
adds it into a float64 partial sum (:meth:`DeviceWorker._accumulate`).

Work arrives as :class:`raysim.engine.work.WorkUnit`s, planned by the driver from the
cohort alone; each unit's groups are trained in order into one partial sum
that leaves the worker with the unit's per-device records. Nothing a worker
computes depends on which other units it was given, so any worker can compute
any unit (:mod:`raysim.engine.work`). :mod:`raysim.engine.pool` runs workers as Ray actors.

What a worker computes on the global model itself, held-out evaluation and
each update's utility, is :mod:`raysim.engine.evaluation`'s; the server's embedding
rows of a round are :class:`raysim.methods.embeddings.ServerRows`.
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass

import numpy as np
import ray
import torch

from raysim import rng
from raysim.aggregation.rules import PartialSum, Tensors, global_norm
from raysim.config import ExperimentConfig
from raysim.data.base import FederatedDataset
from raysim.emulation import costmodel
from raysim.engine.evaluation import HeldOut, Utility
from raysim.engine.processors import DeviceContext, DeviceUpdate, UpdateProcessor, run_on_device
from raysim.engine.records import DeviceRecords
from raysim.engine.training import DPSGD, LocalData, SplitTraining, Trained, train_group
from raysim.engine.work import Group, WorkUnit
from raysim.methods import embeddings, output_loss, width
from raysim.methods.coordinates import Space, Structure
from raysim.methods.quantize import GRANULARITY
from raysim.methods.submodel import Encoding, Submodel, build_model
from raysim.models import classifier, fastops
from raysim.models.build import BaseModel
from raysim.privacy import local
from raysim.split import mechanisms
from raysim.split.protocol import device_parameters, split_step
from raysim.types import DeviceConfig


def batch_indices(num_examples: int, *, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``steps`` batches drawn without replacement, reshuffling at each epoch."""
    need = steps * batch_size
    epochs = -(-need // num_examples)
    order = torch.cat([torch.randperm(num_examples, generator=generator) for _ in range(epochs)])
    return order[:need].view(steps, batch_size)


@dataclass(frozen=True)
class RoundInputs:
    """What every unit of a round is trained from: a ref to the round's global state (fetched once per worker
    and round) and the round's parameters (:meth:`DeviceWorker.begin_round`)."""

    state: object  # ray.ObjectRef, left unresolved: a worker fetches it at its first unit of the round
    round: int
    params: object  # a ray.ObjectRef of Aggregator.round_params (or the list itself, or None): fetched with it
    utility: bool


class DeviceWorker:
    """Trains devices for the driver; wrapped as a Ray actor by the pool."""

    def __init__(
        self,
        *,
        cfg: ExperimentConfig,
        base: BaseModel,
        dataset: FederatedDataset,
        num_threads: int,
        processors: list[UpdateProcessor] = (),
    ):
        torch.set_num_threads(num_threads)
        if cfg.speedups.keep_freed_memory:
            fastops.keep_freed_memory()
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.ray.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        self.dataset = dataset
        self.base = base
        self.vocab_size = base.vocab_size
        self.space = Space.build(cfg, base)
        self._submodels: dict[Structure, Submodel] = {}
        # Devices with one stackable config train together, this many per pass (raysim/models/grouped.py).
        self.devices_per_pass = max(1, cfg.ray.tokens_per_pass // (cfg.train.batch_size * cfg.data.seq_len))
        self.processors = list(processors)
        self._state: Tensors = {}
        self._factors: dict = {}
        self._set_factors: dict[int, dict] = {}  # the round's cache of each further adapter set (P³EFT)
        self._round = -1
        self._params: list[object] = [None] * len(self.processors)
        self._local_dp: dict[Structure, local.LocalDPSGD] = {}
        self._output: output_loss.OutputLoss | None = None  # a sampled output loss, built on first use
        self.split_mechanism = mechanisms.build(cfg, classes=self.space.classes, width=self.space.sizes.width)
        self.held_out = HeldOut(space=self.space, base=base, cfg=cfg, dataset=dataset, device=self.device,
                                mixing=self.split_mechanism)
        self.utility = Utility(self.held_out)
        # the server's embedding rows of a round (methods.embedding_selection: server_*), drawn once per round
        self.server_rows = embeddings.ServerRows(cfg.methods, dataset.public_examples, vocab_size=self.vocab_size,
                                                 seed=cfg.seed)
        # Thousands of long-lived module and tensor objects: keep them out of every
        # cyclic-GC pass the per-device loop's garbage triggers.
        gc.freeze()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def initial_state(self) -> Tensors:
        return self.space.initial_state(self.base, seed=self.cfg.seed)

    def submodel(self, config: DeviceConfig) -> Submodel:
        """The real submodel of ``config``'s structure, built on first use."""
        structure = self.space.structure(config)
        if structure not in self._submodels:
            self._submodels[structure] = Submodel(space=self.space, structure=structure, base=self.base,
                                                  cfg=self.cfg, device=self.device)
            gc.freeze()
        return self._submodels[structure]

    def _encoding(self, config: DeviceConfig) -> Encoding:
        m = self.cfg.methods
        return Encoding(bits=config.bits, per_row=GRANULARITY[m.quantization], embedding_rows=m.embedding_rows,
                        row_indices=not embeddings.server_picks(m.embedding_selection))

    def _slices(self, config: DeviceConfig, *, round: int, device_id: int):
        return self.space.slices(config, pruning=self.cfg.methods.pruning, seed=self.cfg.seed, round=round,
                                 device_id=device_id)

    def measure(self, config: DeviceConfig) -> costmodel.Measurement:
        """Measured costs of one local step of ``config`` as the device computes it (``costs.recipe``), and its
        real payload sizes.

        Measured on the CPU, on a model built for the measurement alone (:func:`build_model`), never on the
        submodel raysim trains with: whatever hardware and kernels raysim runs on, a config costs the same.
        """
        g = rng.generator(self.cfg.seed, "measure")
        batch = torch.randint(0, self.vocab_size, (self.cfg.train.batch_size, self.cfg.data.seq_len), generator=g)
        sub = self.submodel(config)
        zeros = {n: torch.zeros_like(p) for n, p in sub.params.items()}
        rows = embeddings.most_rows(config, self.cfg.methods, vocab_size=self.vocab_size)
        _, bytes_up = sub.encode(zeros, rows=rows, encoding=self._encoding(config), generator=g)
        bytes_down = sum(4 * p.numel() for n, p in sub.params.items() if n in sub.sent)
        if width.frozen_changes(config, self.cfg.methods.pruning):
            bytes_down += sub.width_bytes()  # the frozen slices change every round: they travel too
        loss, output = None, self.output_loss()
        if output is not None:  # the chosen loss, as a device computes it
            def loss(model, tokens):
                return output.losses(model, tokens, devices=1, samples=output.draw([g])).sum()
        structure = self.space.structure(config)
        model = build_model(space=self.space, structure=structure, base=self.base, cfg=self.cfg)
        recipe = costmodel.RECIPES[self.cfg.costs.recipe]
        if self.space.classes:
            batch[:, -1] = self.dataset.pad_id  # every sequence ends in EOS (the position the head reads)
            labels = torch.randint(0, self.space.classes, (len(batch),), generator=g)
            if structure.cut is not None:
                return self._measure_split(model, recipe, batch, labels, cut=structure.cut, bytes_down=bytes_down,
                                           bytes_up=bytes_up)

            def loss(model, tokens):
                return classifier.device_losses(model, tokens, labels, pad_id=self.dataset.pad_id, devices=1).sum()
        # DP-SGD holds every example's own gradient of the trainable weights before clipping them (Opacus)
        per_example = self.cfg.train.batch_size if self.cfg.privacy.local.enabled else 0
        # an emulator device first downloads every frozen weight it holds: the emulator and its adapter blocks
        setup = 0 if structure.emulator is None else sum(
            p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        return dataclasses.replace(
            costmodel.measure(model, recipe=recipe, batch=batch, bytes_down=bytes_down, bytes_up=bytes_up,
                              loss=loss, per_example_gradients=per_example), setup_bytes_down=setup)

    def _measure_split(self, model: torch.nn.Module, recipe: costmodel.Recipe, batch: torch.Tensor,
                       labels: torch.Tensor, *, cut: int, bytes_down: int, bytes_up: int) -> costmodel.Measurement:
        """A split step as device and server compute it, with the mechanism's every adapter set."""
        held = device_parameters(model, self.space.arch.blocks, cut)
        mine = {id(p) for p in held}
        server = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine}
        sets = [{n: torch.nn.Parameter(p.detach().clone()) for n, p in server.items()}
                for _ in range(1, self.space.sets)]

        def step(meter):
            done = split_step(model, self.space.arch.blocks, batch, labels, cut=cut, pad_id=self.dataset.pad_id,
                              mechanism=self.split_mechanism, sets=sets, server=meter)
            return done.wire.up, done.wire.down

        return costmodel.measure_split(model, recipe=recipe, step=step, bytes_down=bytes_down, bytes_up=bytes_up,
                                       device_parameters=held)

    def output_loss(self) -> output_loss.OutputLoss | None:
        """The sampled output loss (``methods.output_loss``) with its public-unigram proposal; None: softmax."""
        m = self.cfg.methods
        if m.output_loss not in output_loss.SAMPLED:
            return None
        if self._output is None:
            counts = embeddings.unigram_counts(self.dataset.public_examples(), vocab_size=self.vocab_size)
            self._output = output_loss.OutputLoss(kind=m.output_loss, samples=m.noise_samples,
                                                  q=output_loss.proposal(counts))
        return self._output

    def begin_round(self, state: Tensors, round: int, params: list[object] | None = None,
                    utility: bool = False) -> None:
        """Load the round's global state; ``params``: what each update processor's device side needs this round
        (``Aggregator.round_params``); ``utility`` gives every device's record its update's utility
        (:class:`raysim.engine.evaluation.Utility`)."""
        self._round = round
        self._params = [None] * len(self.processors) if params is None else list(params)
        self._state = {k: v.to(self.device) for k, v in state.items()}
        self._factors, self._set_factors = {}, {}
        self.utility.begin_round(self._state, wanted=utility)

    @ray.method(num_returns=2)  # the records, and the partial sum as its own object (left where it is)
    def train(self, unit: WorkUnit, inputs: RoundInputs | None = None) -> tuple[DeviceRecords, PartialSum]:
        """Train the unit's groups in order; return their devices' records (unit order) and the unit's partial sum.

        ``inputs`` start the round on this worker if it has not started it (a worker that joins a round late,
        or restarted, needs nothing else); without them, :meth:`begin_round` must have been called.
        """
        if inputs is not None and inputs.round != self._round:
            params = ray.get(inputs.params) if isinstance(inputs.params, ray.ObjectRef) else inputs.params
            self.begin_round(ray.get(inputs.state), inputs.round, params, inputs.utility)
        partial = PartialSum.zeros_like(self._state)
        records = DeviceRecords.concat([self._train_group(group, partial) for group in unit.groups])
        return records, partial.to("cpu")

    def pass_limit(self, config: DeviceConfig) -> int:
        """Devices of ``config`` that may share one pass: 1 unless everyone holds the same LoRA-only submodel.

        Federated dropout gives every device its own slices; Opacus needs
        per-example gradients of the submodel's own weights; a split device runs the split protocol alone.
        """
        if (self.cfg.privacy.local.enabled or width.own_slices(config) or config.split is not None
                or not self.submodel(config).stackable):
            return 1
        return self.devices_per_pass

    def num_eval_batches(self) -> int:
        return self.held_out.num_batches()

    def evaluate(self, state: Tensors, batches: list[int]) -> np.ndarray:
        """Per held-out batch: summed next-token loss, tokens, top-1 and top-3 hits (:meth:`HeldOut.evaluate`)."""
        return self.held_out.evaluate(state, batches)

    def _train_group(self, group: Group, partial: PartialSum) -> DeviceRecords:
        """Local training of devices that share a config and its slices, in one pass; their updates go into
        ``partial`` in device order."""
        config, device_ids = group.config, list(group.device_ids)
        seed, round = self.cfg.seed, self._round
        sub = self.submodel(config)
        slices = self._slices(config, round=round, device_id=device_ids[0])
        sub.load_frozen(self._state, slices, version=round)
        initial = sub.initial(self._state, slices, self._factors)
        sub.load_fixed(initial)
        starts = [initial[n] for n in sub.params]
        data, rows = self._local_data(config, device_ids)
        dp = None
        if self.cfg.privacy.local.enabled:
            dp = DPSGD(engine=self._dp_sgd(sub), batch_size=self.cfg.train.batch_size,
                       batch_generator=rng.generator(seed, "batches", round, device_ids[0]),
                       noise_generator=rng.generator(seed, "local-dp-noise", round, device_ids[0]))
        split = self._split_training(sub, slices) if config.split is not None else None
        trained = train_group(sub, starts, data, steps=self.cfg.train.local_steps, lr=self.cfg.train.lr,
                              weight_decay=self.cfg.train.weight_decay, dp=dp, output=self.output_loss(),
                              chunked=self.cfg.speedups.chunked_loss, split=split)
        encoding = self._encoding(config)
        norms, utilities = [], []
        with torch.no_grad():
            for j, device_id in enumerate(device_ids):
                update = {name: t[j] - s for name, t, s in zip(sub.params, trained.tensors, starts)}
                update, _ = sub.encode(update, rows=rows, encoding=encoding,
                                       generator=rng.generator(seed, "quantize", round, device_id))
                update, held = sub.to_global(initial, update, self._state, slices, rows=rows)
                if split is not None:
                    update, held = self._with_sets(sub, split, trained, update, held, slices)
                utilities.append(self.utility(update))
                context = DeviceContext(seed=seed, round=round, device_id=device_id, config=config,
                                        num_examples=len(data.examples[j]))
                norms.append(self._accumulate(partial, update, held=held, context=context))
        return DeviceRecords(device_id=np.asarray(device_ids, dtype=np.int64),
                             train_loss=trained.losses.cpu().double().numpy(),
                             num_examples=np.array([len(x) for x in data.examples], dtype=np.int64),
                             update_norm=np.array(norms), utility=np.array(utilities),
                             crossing=_objects(trained.crossings))

    def _local_data(self, config: DeviceConfig, device_ids: list[int]) -> tuple[LocalData, torch.Tensor | None]:
        """What each device of a group trains on, every draw keyed by (seed, round, device id); and the embedding
        rows a partial-embeddings device sends."""
        seed, round = self.cfg.seed, self._round
        data = [self.dataset.device_examples(d) for d in device_ids]
        batches = [
            batch_indices(len(x), steps=self.cfg.train.local_steps, batch_size=self.cfg.train.batch_size,
                          generator=rng.generator(seed, "batches", round, d))
            for d, x in zip(device_ids, data)
        ]
        # Model dropout draws from each device's own generator, whatever its group.
        generators = [torch.Generator(self.device).manual_seed(rng.torch_seed(seed, "train", round, d))
                      for d in device_ids]
        rows, keep = embeddings.trained_rows(  # partial embeddings train alone in a pass (k is 1)
            config, self.cfg.methods, tokens=lambda: data[0][batches[0].flatten()],
            server=lambda: self.server_rows(round), vocab_size=self.vocab_size, device=self.device,
            generator=lambda: rng.generator(seed, "embedding-rows", round, device_ids[0]))
        noise = None
        if self.output_loss() is not None:
            noise = [rng.generator(seed, "noise-samples", round, d) for d in device_ids]
        labels = [self.dataset.device_labels(d) for d in device_ids] if self.space.classes else None
        return LocalData(examples=data, batches=batches, generators=generators, keep=keep, noise=noise,
                         labels=labels, pad_id=getattr(self.dataset, "pad_id", None)), rows

    def _split_training(self, sub: Submodel, slices) -> SplitTraining:
        """A split device's mechanism, and where the server's further adapter sets start this round."""
        server_names = [n for n in sub.params if n not in sub.sent]
        set_starts = []
        for i in range(1, self.space.sets):
            initial = sub.initial(self.space.view(self._state, i), slices, self._set_factors.setdefault(i, {}))
            set_starts.append([initial[n] for n in server_names])
        return SplitTraining(mechanism=self.split_mechanism, server_names=server_names, set_starts=set_starts)

    def _with_sets(self, sub: Submodel, split: SplitTraining, trained: Trained, update: Tensors, held: Tensors,
                   slices) -> tuple[Tensors, Tensors]:
        """A split device's update with its further adapter sets' (never sent: the server holds them), each in
        its own entries (``set<i>/``)."""
        update, held = dict(update), dict(held)
        for i, (starts, values) in enumerate(zip(split.set_starts, trained.sets), start=1):
            view = self.space.view(self._state, i)
            initial = dict(zip(split.server_names, starts))
            delta = {n: v - s for n, v, s in zip(split.server_names, values, starts)}
            part, part_held = sub.to_global(initial, delta, view, slices, rows=None, only=set(delta))
            update |= {f"set{i}/{k}": v for k, v in part.items()}
            held |= {f"set{i}/{k}": v for k, v in part_held.items()}
        return update, held

    def _dp_sgd(self, sub: Submodel) -> local.LocalDPSGD:
        """The submodel wrapped for local DP-SGD (Opacus), once per structure."""
        if sub.structure not in self._local_dp:
            self._local_dp[sub.structure] = local.LocalDPSGD(model=sub.lm, optimizer=sub.optimizer,
                                                             cfg=self.cfg.privacy.local,
                                                             batch_size=self.cfg.train.batch_size)
        return self._local_dp[sub.structure]

    def _accumulate(self, partial: PartialSum, update: Tensors, *, held: Tensors | None,
                    context: DeviceContext) -> float:
        """Add one device's decoded update, in the aggregation space, to ``partial`` after the processors' device
        side (FedAvg weighs it by its examples unless a processor says otherwise); return its L2 norm."""
        norm = global_norm(update)
        out = run_on_device(self.processors, DeviceUpdate(tensors=update, weight=float(context.num_examples),
                                                          held=held, norm=norm),
                            context=context, params=self._params)
        partial.add(out.tensors, weight=out.weight, held=out.held, counts=out.counts)
        return norm


def _objects(items: list) -> np.ndarray:
    """``items`` as a 1-d object array (numpy would make an array of arrays 2-d)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out
