"""Cost model: what one device's round costs in time, memory and bytes.

Two halves. :func:`measure` runs once per distinct (model, config) on the
real (sub)model as the device computes it: a declared training *recipe*
(``costs.recipe``, :data:`RECIPES`) applied to a model built for the
measurement alone. Training FLOPs come from ``torch.utils.flop_counter`` and
activation memory from the tensors autograd actually saves for backward, so
every method that changes the model (fewer trainable layers, a pruned width)
changes its costs without a formula to keep in sync, and nothing raysim does
to compute faster (fused kernels, chunked losses, grouped passes) reaches a
cost: those are the emulator's, not the device's. :func:`device_costs` turns
the measurements and a cohort's profile draws into seconds and bytes with
array arithmetic; nothing is slept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from raysim.models.fastops import device_losses, fuse_activations
from raysim.registry import Registry
from raysim.types import DeviceDraws

ADAM_STATE_BYTES_PER_PARAM = 8  # two fp32 moments
GRAD_BYTES_PER_PARAM = 4

Loss = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Recipe:
    """How the emulated device computes one training step: what the cost model measures.

    ``attention``: the transformers attention implementation it runs (eager: its saved tensors follow from
    autograd's formulas alone, the same on any hardware, where SDPA's depend on the kernel a machine picks);
    ``prepare``: what it changes in the model as transformers builds it; ``loss``: its full-softmax
    next-token loss (a sampled output loss, ``methods.output_loss``, is the method's own and replaces it).
    """

    attention: str
    prepare: Callable[[torch.nn.Module], None]
    loss: Loss


def _transformers_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def _unchanged(model: torch.nn.Module) -> None:
    pass


RECIPES: Registry[Recipe] = Registry("cost recipe")  # costs.recipe names one
# The Hugging Face model's own forward (its activation module, eager attention), the full logits and
# transformers' causal-LM loss (F.cross_entropy over them), backward, float32 gradients and AdamW's moments.
RECIPES.register("reference")(Recipe(attention="eager", prepare=_unchanged, loss=_transformers_loss))
# The same step as a memory-frugal trainer runs it: the tanh GELU as one kernel, and the next-token loss
# fused with its gradient chunk by chunk through the head, which keeps the hidden states' gradient
# instead of the (positions x vocabulary) log-probabilities (raysim/models/fastops.py).
RECIPES.register("fused")(Recipe(attention="eager", prepare=fuse_activations,
                                 loss=lambda model, tokens: device_losses(model, tokens, devices=1).sum()))


@dataclass(frozen=True)
class Measurement:
    """Costs of one local training step of one config, measured on its model."""

    flops_per_step: float  # forward + backward, one batch
    activation_bytes: int  # distinct storages saved for backward (no weights)
    param_bytes: int  # every weight the device holds, at its dtype
    trainable_params: int
    bytes_down: int  # the state a device downloads
    bytes_up: int  # the encoded update a device uploads
    per_example_gradients: int = 0  # examples whose own gradient is held at once (local DP-SGD: the batch)
    # split learning (raysim.split): the server's share of a step, and what one step sends each way over the
    # device's link in its round trips; flops_per_step, activation_bytes and param_bytes are then the device's
    server_flops_per_step: float = 0.0
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0
    round_trips: int = 0
    # offsite-tuning (raysim.offsite): the emulator's frozen weights, downloaded once, at the device's first round
    # with it (its trainable adapters travel every round, in bytes_down)
    setup_bytes_down: int = 0

    @property
    def peak_memory_bytes(self) -> int:
        per_param = GRAD_BYTES_PER_PARAM * (1 + self.per_example_gradients) + ADAM_STATE_BYTES_PER_PARAM
        return self.param_bytes + self.trainable_params * per_param + self.activation_bytes


def measure(model: torch.nn.Module, *, recipe: Recipe, batch: torch.Tensor, bytes_down: int, bytes_up: int,
            loss: Loss | None = None, per_example_gradients: int = 0) -> Measurement:
    """Prepare ``model`` (built for this measurement alone: it is changed) as ``recipe`` says, run one
    forward/backward on ``batch`` and count FLOPs and saved bytes.

    ``loss(model, batch)``: the training loss the device computes (a sampled output loss, a classification
    loss); None: the recipe's full-softmax loss.

    Leaves parameters untouched and gradients cleared.
    """
    _prepare(model, recipe)
    saved = _SavedBytes(model)
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            value = (recipe.loss if loss is None else loss)(model, batch)
        value.backward()
    trainable = _clear_grads(model.parameters())
    return Measurement(
        flops_per_step=float(counter.get_total_flops()),
        activation_bytes=saved.total(),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in trainable),
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        per_example_gradients=per_example_gradients,
    )


SplitStep = Callable[[Callable[[], AbstractContextManager]], tuple[int, int]]


def measure_split(model: torch.nn.Module, *, recipe: Recipe, step: SplitStep,
                  device_parameters: list[torch.nn.Parameter], bytes_down: int, bytes_up: int) -> Measurement:
    """A split device's step (:mod:`raysim.split.protocol`): ``step(server)`` runs it on ``model``, entering
    ``server()`` around what the server computes, and returns its wire bytes (up, down).

    The device is charged the FLOPs outside the server's part, the tensors its own part saves for backward,
    and the weights it holds (``device_parameters``); the server's FLOPs are its own column.
    """
    _prepare(model, recipe)
    saved = _SavedBytes(model)
    server_counters: list[FlopCounterMode] = []

    @contextmanager
    def server() -> Iterator[None]:
        counter = FlopCounterMode(display=False)
        server_counters.append(counter)
        with saved.paused(), counter:
            yield

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            up, down = step(server)
    server_flops = float(sum(c.get_total_flops() for c in server_counters))  # counted by both: the modes nest
    _clear_grads(model.parameters())
    return Measurement(
        flops_per_step=float(counter.get_total_flops()) - server_flops,
        activation_bytes=saved.total(),
        param_bytes=sum(p.numel() * p.element_size() for p in device_parameters),
        trainable_params=sum(p.numel() for p in device_parameters if p.requires_grad),
        bytes_down=bytes_down,
        bytes_up=bytes_up,
        server_flops_per_step=server_flops,
        wire_bytes_up=up,
        wire_bytes_down=down,
        round_trips=2,
    )


def _prepare(model: torch.nn.Module, recipe: Recipe) -> None:
    model.config._attn_implementation = recipe.attention
    recipe.prepare(model)
    model.train()


def _clear_grads(parameters) -> list[torch.nn.Parameter]:
    trainable = [p for p in parameters if p.requires_grad]
    for p in trainable:
        p.grad = None
    return trainable


class _SavedBytes:
    """The distinct storages autograd saves for backward, weights excluded (a ``saved_tensors_hooks`` pack)."""

    def __init__(self, model: torch.nn.Module):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        # held until the measurement ends, so that no storage freed on the way (a graph a step drops) can be
        # reallocated at an address already counted
        self.saved: dict[int, torch.UntypedStorage] = {}
        self.counting = True

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if self.counting and storage.data_ptr() not in self.weights:
            self.saved[storage.data_ptr()] = storage
        return t

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.counting = False
        try:
            yield
        finally:
            self.counting = True

    def total(self) -> int:
        return sum(s.nbytes() for s in self.saved.values())


@dataclass(frozen=True)
class DeviceCosts:
    """Per-device costs of one round, one array entry per device."""

    flops: np.ndarray  # training FLOPs of the round's local steps
    compute_s: np.ndarray
    download_s: np.ndarray
    upload_s: np.ndarray
    peak_memory_bytes: np.ndarray
    bytes_down: np.ndarray
    bytes_up: np.ndarray
    # split devices (else 0): the server's compute for them, and the steps' traffic over their link
    server_compute_s: np.ndarray
    wire_s: np.ndarray
    wire_bytes_up: np.ndarray
    wire_bytes_down: np.ndarray
    setup_bytes_down: np.ndarray  # a one-time download this round (an emulator at its first round), in download_s

    @property
    def total_s(self) -> np.ndarray:
        return self.download_s + self.compute_s + self.server_compute_s + self.wire_s + self.upload_s

    def fits(self, draws: DeviceDraws) -> np.ndarray:
        return self.peak_memory_bytes <= draws.memory_bytes


def device_costs(draws: DeviceDraws, measurements: list[Measurement], *, local_steps: int,
                 server_flops_per_s: float = math.inf, setup: np.ndarray | None = None) -> DeviceCosts:
    """Seconds and bytes for each device given its config's measurement.

    A transfer costs one round-trip latency plus its bits over the link:
    ``download_s = rtt + 8 * bytes_down / downlink_bps``, likewise up; where ``setup`` is True the device also
    downloads its config's one-time ``setup_bytes_down`` first (an emulator). A split device's steps add, each, their
    round trips and their bits each way (``wire_s``), and the server's FLOPs at ``server_flops_per_s`` shared
    equally by the split devices priced together: every one of them is taken to be in flight the whole round.
    """
    flops = np.array([m.flops_per_step for m in measurements]) * local_steps
    down = np.array([m.bytes_down for m in measurements], dtype=np.int64)
    up = np.array([m.bytes_up for m in measurements], dtype=np.int64)
    server_flops = np.array([m.server_flops_per_step for m in measurements]) * local_steps
    split = np.array([m.round_trips > 0 for m in measurements], dtype=bool)
    wire_up = np.array([m.wire_bytes_up for m in measurements], dtype=np.int64) * local_steps
    wire_down = np.array([m.wire_bytes_down for m in measurements], dtype=np.int64) * local_steps
    trips = np.array([m.round_trips for m in measurements], dtype=np.float64) * local_steps
    sharing = max(1, int(split.sum()))
    once = np.array([m.setup_bytes_down for m in measurements], dtype=np.int64)
    once = np.where(np.zeros(len(measurements), dtype=bool) if setup is None else setup, once, 0)
    return DeviceCosts(
        flops=flops,
        compute_s=flops / draws.train_flops_per_s,
        download_s=draws.rtt_s + 8.0 * (down + once) / draws.downlink_bps,
        upload_s=draws.rtt_s + 8.0 * up / draws.uplink_bps,
        peak_memory_bytes=np.array([m.peak_memory_bytes for m in measurements], dtype=np.int64),
        bytes_down=down,
        bytes_up=up,
        server_compute_s=np.where(split, server_flops * sharing / server_flops_per_s, 0.0),
        wire_s=np.where(split, trips * draws.rtt_s + 8.0 * wire_up / draws.uplink_bps
                        + 8.0 * wire_down / draws.downlink_bps, 0.0),
        wire_bytes_up=wire_up,
        wire_bytes_down=wire_down,
        setup_bytes_down=once,
    )


@dataclass(frozen=True)
class Limits:
    """Per device, what one round may take by the budgets it states (``inf``: no limit): its profile's absolute
    budgets, and those stated as a fraction of full fine-tuning resolved against what full fine-tuning costs it."""

    memory_bytes: np.ndarray
    compute_s: np.ndarray
    upload_bytes: np.ndarray

    def allow(self, costs: DeviceCosts) -> np.ndarray:
        """Whether each device's round keeps within its limits: peak memory, compute time and bytes sent up (the
        update and, for a split device, its activations)."""
        return ((costs.peak_memory_bytes <= self.memory_bytes) & (costs.compute_s <= self.compute_s)
                & (costs.bytes_up + costs.wire_bytes_up <= self.upload_bytes))


def budget_limits(draws: DeviceDraws, full: Callable[[], Measurement], *, local_steps: int) -> Limits | None:
    """The limits ``draws``' budgets set (None: no device states a budget).

    ``full()``: the measurement of full fine-tuning, asked for only when some budget is a fraction of it.
    """
    b = draws.budgets
    if b is None:
        return None
    memory, compute, upload = b.memory_bytes, b.compute_s, b.upload_bytes
    if b.fractions:
        whole = device_costs(draws, [full()] * len(draws), local_steps=local_steps)
        memory = np.minimum(memory, b.memory_fraction * whole.peak_memory_bytes)
        compute = np.minimum(compute, b.compute_fraction * whole.compute_s)
        upload = np.minimum(upload, b.upload_fraction * (whole.bytes_up + whole.wire_bytes_up))
    return Limits(memory_bytes=memory, compute_s=compute, upload_bytes=upload)


@dataclass
class Downloads:
    """Which devices hold which one-time download (an emulator, by name): a device pays ``setup_bytes_down`` at its
    first round with it, whatever became of that round, and never again."""

    holding: dict[str, set[int]] = field(default_factory=dict)

    @classmethod
    def of(cls, state: dict[str, list[int]]) -> Downloads:
        return cls({name: set(ids) for name, ids in state.items()})

    def state(self) -> dict[str, list[int]]:
        return {name: sorted(ids) for name, ids in self.holding.items()}

    def first(self, device_ids: np.ndarray, names: list[str | None]) -> np.ndarray | None:
        """Per device, whether it must download ``names[i]`` this round; None where no device has one."""
        if all(n is None for n in names):
            return None
        return np.array([n is not None and int(d) not in self.holding.get(n, ()) for d, n in zip(device_ids, names)],
                        dtype=bool)

    def record(self, device_ids: np.ndarray, names: np.ndarray, setup_bytes: np.ndarray) -> None:
        """A recorded round's downloads: the devices that paid one now hold it."""
        for d, n in zip(device_ids[setup_bytes > 0], names[setup_bytes > 0]):
            self.holding.setdefault(n, set()).add(int(d))
