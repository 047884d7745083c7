"""``rl``: a policy network that learns per-device configs from the round results.

Every (device, config) pair is scored by one small MLP over the device's
profile, the round state and the config as the cost model prices it for that
device (predicted time, memory and bytes, bit-width, rank, compute, ...).
Scores over a device's feasible configs form a categorical distribution
(infeasible configs masked out); an action is drawn with Gumbel-max noise
keyed by (seed, round, device id, config), so a run is reproducible and
independent of cohort order.

The objective is the one a comparison study scores: reach the target soonest,
with few bytes and failures. A round brings progress P (the relative drop of
the held-out loss) and lasts D virtual seconds, so reaching a target soonest
is a high rate sum(P) / sum(D). Each round the policy maximises P - rho * D
(Dinkelbach's form of a ratio objective), the price of time rho being one
typical round's progress per typical round's duration. The value of the
cohort's configs ``a`` for device i is

    Q(a) = w_progress * G(a) - w_time * D(a) / mean D
           - w_bytes * bytes_i / B - w_failure * [device i not aggregated]

(B is the largest traffic any config costs), where

- G(a), the critic, predicts the round's progress in units of a typical
  round's: the mean over the aggregated devices of g(config), g linear in
  the config's own features (update information, FLOPs, bits, rank,
  pruning, ...). FedAvg applies the mean of the updates, so to first order
  the round's progress is the mean of each update's *utility*, the relative
  held-out loss drop it would give alone (``-<grad L, update> / L``, computed
  by the device actors: devices.parquet ``utility``); g is fitted to the
  utilities by ridge regression over the last ``memory`` rounds, shrunk
  towards the prior ``prior_information`` x the config's update information
  (trainable parameters x bits, log scale, the largest 1: greedy_fit's
  notion of a rich config). One number per device, not one per round, is
  what lets the critic tell configs apart.
- D(a) is the round's duration by the round rule (``clock.settle_rounds``)
  with each device's finish time from the cost model. It is exact: the
  virtual clock runs on the same cost model, and the round reveals who was
  available and who dropped out.

Device i's advantage is COMA's counterfactual, Q(a_i, a_-i) minus the mean
of Q(a', a_-i) under the policy's distribution over i's configs a', every
term recomputed with i's config swapped (who is aggregated, when the round
closes). So a device that holds the round open is charged the time it costs
everyone, and one that finishes early is not.

The configs handed out are the network's proposal (one Gumbel-max sample
per device) improved by ``plan`` sweeps of best responses: each device in
turn takes the feasible config with the highest Q given the others', every
selected device assumed present. This is a policy-improvement step at
decision time with the learned critic and the exact cost model and round
rule (model-based planning on the network's proposal, as search refines a
policy network's prior): on the Gboard-like population it matters because
the round is closed by its 12th arrival, and only a joint assignment can
make that arrival come sooner without giving up the aggregated devices'
progress. Exploration comes from the sampled proposal: the planner moves a
device only where the critic says it pays.

Learning is the all-action policy gradient (Mean Actor-Critic): every
config's counterfactual value is known, so each device's step follows the
expected advantage of its whole distribution, a few Adam steps per round,
advantages in units of their running mean magnitude. The network,
its optimizer, the critic and its memory and the running means save to and
load from a checkpoint (``raysim train-policy``); a run with ``learn:
false`` only applies a checkpoint. The critic learns from utilities, which
need a LoRA rule whose state holds ΔW (the default); otherwise g stays at its
prior.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from raysim import rng
from raysim.clock import OK, settle_rounds
from raysim.errors import ConfigError
from raysim.policies.base import Policy, PolicyContext, Prices, register, update_information
from raysim.results import RoundResult
from raysim.types import DeviceConfig, DeviceDraws, RoundState

DEVICE_FEATURES = 6
ROUND_FEATURES = 2
CONFIG_FEATURES = 11


def device_features(devices: DeviceDraws) -> np.ndarray:
    """Log-scaled compute, memory and links, latency and dropout probability: shape (devices, 6)."""
    return np.stack([
        np.log10(devices.train_flops_per_s) - 9.0,
        np.log10(devices.memory_bytes) - 9.0,
        np.log10(devices.uplink_bps) - 6.0,
        np.log10(devices.downlink_bps) - 6.0,
        devices.rtt_s,
        devices.dropout_prob,
    ], axis=1)


def own_features(context: PolicyContext) -> np.ndarray:
    """Each config's own values, the same for every device: shape (configs, 7)."""
    space = context.space
    info = update_information(context)
    flops = np.array([context.oracle.measure(c).flops_per_step for c in space], dtype=np.float64)
    max_rank = max(1, max(c.lora_rank for c in space))
    return np.stack([
        np.log1p(info) / np.log1p(info.max()),
        flops / flops.max(),
        np.array([c.bits / 32 for c in space]),
        np.array([c.lora_rank / max_rank for c in space]),
        np.array([c.prune_ratio for c in space]),
        np.array([c.dropout_rate for c in space]),
        np.array([float(c.partial_embeddings) for c in space]),
    ], axis=1)


def config_features(own: np.ndarray, prices: Prices, devices: DeviceDraws, *, deadline_s: float | None,
                    target: int) -> np.ndarray:
    """``own`` features and each config's predicted costs for each device: shape (devices, configs, 11).

    Besides time, memory and traffic, the place in the round the config would give the device: how many of
    the cohort's other devices arrive sooner (each at its fastest feasible config), over the round's target.
    """
    horizon = deadline_s or prices.total_s.max(axis=1, keepdims=True)
    traffic = prices.bytes_up + prices.bytes_down
    fastest = np.where(prices.feasible, prices.total_s, np.inf).min(axis=1)
    sooner = (fastest[None, None, :] < prices.total_s[:, :, None]).sum(axis=2)
    sooner -= fastest[:, None] < prices.total_s  # not the device itself
    priced = np.stack([
        np.minimum(prices.total_s / horizon, 4.0),
        np.minimum(prices.peak_memory_bytes / devices.memory_bytes[:, None], 4.0),
        traffic / max(1, traffic.max()),
        sooner / max(1, target),
    ], axis=2)
    return np.concatenate([np.broadcast_to(own, (len(devices), *own.shape)), priced], axis=2)


def gumbel(seed: int, round: int, device_id: np.ndarray, num_configs: int) -> np.ndarray:
    """Gumbel noise per (device, config), keyed by (seed, round, config, device id)."""
    u = np.stack([rng.uniform(seed, "policy-rl", round, j, ids=device_id) for j in range(num_configs)], axis=1)
    return -np.log(-np.log(np.clip(u, 1e-12, 1 - 1e-12)))


class ScoreNet(torch.nn.Module):
    """Scores (device, round, config) feature vectors: one logit each."""

    def __init__(self, *, hidden: int):
        super().__init__()
        size = DEVICE_FEATURES + ROUND_FEATURES + CONFIG_FEATURES
        self.body = torch.nn.Sequential(torch.nn.Linear(size, hidden), torch.nn.Tanh(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        torch.nn.init.zeros_(self.body[-1].weight)  # every feasible config equally likely at the start
        torch.nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


def single_threaded(method):
    """Run ``method`` with torch on one thread: the policy's floats, and so its choices, do not depend on the
    driver's thread count (its tensors are small: one thread is also the fastest)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return method(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def masked_log_probs(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.masked_fill(~mask, -math.inf), dim=-1)


@register("rl")
class Learned(Policy):
    """A learned per-device policy (see the module docstring); learns online unless ``learn`` is false."""

    wants_utility = True  # the critic learns from each update's utility

    def __init__(
        self,
        *,
        context: PolicyContext,
        checkpoint: str | None = None,
        learn: bool = True,
        hidden: int = 32,
        lr: float = 3e-3,
        epochs: int = 4,
        entropy: float = 0.01,
        decay: float = 0.9,
        w_progress: float = 1.0,
        w_time: float = 1.0,
        w_bytes: float = 0.01,
        w_failure: float = 0.1,
        ridge: float = 1.0,
        prior_information: float = 1.0,
        memory: int = 64,
        temperature: float = 1.0,
        plan: int = 3,
    ):
        self.context = context
        self.learn = learn
        self.epochs, self.entropy, self.decay, self.ridge = epochs, entropy, decay, ridge
        if temperature <= 0:
            raise ConfigError("must be > 0", field="params.temperature")
        self.temperature = temperature
        if plan < 0:
            raise ConfigError("must be >= 0 (sweeps of best responses; 0: the network's sample as is)",
                              field="params.plan")
        self.plan_sweeps = plan
        self.weights = {"progress": w_progress, "time": w_time, "bytes": w_bytes, "failure": w_failure}
        self.own = own_features(context)  # fixed for the run: computed once
        self.max_traffic = float(max(m.bytes_up + m.bytes_down for m in map(context.oracle.measure, context.space)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.torch_seed(context.seed, "policy-rl-init"))
            self.net = ScoreNet(hidden=hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.memory_size = memory
        # the last ``memory`` rounds: (own features of each aggregated device's config, its utility / scale)
        self.memory: list[tuple[np.ndarray, np.ndarray]] = []
        # the critic's prior: a config is worth its update information (feature 0: log scale, the largest 1),
        # in units of a typical round's progress; observed utilities correct it (``_fit_critic``)
        self.prior = np.zeros(self.own.shape[1])
        self.prior[0] = prior_information
        self.critic = np.append(self.prior, 0.0)  # g(config) = own features @ critic[:-1] + critic[-1]
        self.running = {"progress": None, "duration": None, "advantage": None}  # running means of magnitudes
        self.first_loss: float | None = None
        self._batch: dict | None = None  # this round's choices, until its results arrive
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ConfigError("checkpoint not found", field="params.checkpoint")
            self.load_state_dict(torch.load(path, weights_only=False))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "memory": self.memory,
                "critic": self.critic, "running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.memory = list(state["memory"])
        self.critic = np.asarray(state["critic"], dtype=np.float64)
        self.running = dict(state["running"])

    @single_threaded
    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        prices = self.context.oracle.price(devices, self.context.space)
        target = state.target or len(devices)
        x = self._inputs(devices, state, prices, target=target)
        mask = torch.from_numpy(prices.feasible)
        with torch.no_grad():
            logits = self._logits(x)
        noisy = logits.masked_fill(~mask, -math.inf) + torch.from_numpy(
            gumbel(self.context.seed, state.round, devices.device_id, len(self.context.space))).float()
        has_option = prices.feasible.any(axis=1)
        choice = np.where(has_option, noisy.argmax(dim=1).numpy(), prices.fallback())
        rows = np.flatnonzero(has_option)
        traffic = prices.bytes_up + prices.bytes_down
        batch = {"rows": rows, "x": x[rows], "mask": mask[rows], "choice": choice, "total_s": prices.total_s,
                 "fits": prices.fits, "traffic": traffic / self.max_traffic, "target": target}
        if self.plan_sweeps:
            batch["choice"] = choice = self.plan(choice, batch, device_id=devices.device_id)
        if self.learn:
            self._batch = batch
        return [self.context.space[j] for j in choice]

    @single_threaded
    def observe(self, result: RoundResult) -> None:
        if not self.learn:
            return
        batch, self._batch = self._batch, None
        if batch is None:
            return
        row, devices = result.row, result.devices
        status = np.asarray(devices["status"])
        utility = np.asarray(devices["utility"], dtype=np.float64)
        aggregated = np.flatnonzero((status == OK) & np.isfinite(utility))
        if len(aggregated):
            weights = np.asarray(devices["num_examples"], dtype=np.float64)[aggregated]
            scale = self._running("progress", float(np.average(utility[aggregated], weights=weights)))
            if scale > 0:
                self.memory = [*self.memory, (self.own[batch["choice"][aggregated]], utility[aggregated] / scale)]
                self.memory = self.memory[-self.memory_size:]
                self._fit_critic()
        self._running("duration", row.round_duration_s)
        batch["present"] = ~np.isin(status, ("unavailable", "dropped"))  # what no config changes
        self._update(batch)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The policy's logits: the network's scores over the temperature (below 1: closer to its best choice)."""
        return self.net(x) / self.temperature

    def _running(self, key: str, value: float) -> float:
        """Update and return the running mean of ``value``'s magnitude."""
        old = self.running[key]
        self.running[key] = abs(value) if old is None else self.decay * old + (1 - self.decay) * abs(value)
        return self.running[key]

    def _inputs(self, devices: DeviceDraws, state: RoundState, prices: Prices, *, target: int) -> torch.Tensor:
        if self.first_loss is None and state.last_train_loss is not None:
            self.first_loss = state.last_train_loss
        ratio = 1.0 if state.last_train_loss is None else state.last_train_loss / self.first_loss
        per_device = np.concatenate(
            [device_features(devices), np.tile([state.round / self.context.rounds, ratio], (len(devices), 1))], axis=1)
        configs = config_features(self.own, prices, devices, deadline_s=self.context.oracle.deadline_s, target=target)
        k = len(self.context.space)
        stacked = np.concatenate([np.repeat(per_device[:, None, :], k, axis=1), configs], axis=2)
        return torch.from_numpy(stacked).float()

    def _update(self, batch: dict) -> None:
        """Gradient steps on the expected advantage of every present device's whole distribution.

        The counterfactual values of all of a device's configs are known, so the
        gradient is the all-action one, sum over a of grad pi(a | x) A(a) (Mean
        Actor-Critic, Allen et al. 2017): exact under the critic, without the
        variance of scoring the sampled config alone.
        """
        keep = torch.from_numpy(batch["present"][batch["rows"]])
        if not keep.any():
            return
        x, mask = batch["x"][keep], batch["mask"][keep]
        values = self.counterfactual_values(batch)[keep.numpy()]
        with torch.no_grad():
            policy = masked_log_probs(self._logits(x), mask).exp().double().numpy()
        values = np.where(mask.numpy(), values, 0.0)
        advantage = values - (policy * values).sum(axis=1, keepdims=True)
        typical = self._running("advantage", float((policy * np.abs(advantage)).sum(axis=1).mean()))
        advantage = torch.from_numpy(np.where(mask.numpy(), advantage / max(typical, 1e-8), 0.0)).float()
        for _ in range(self.epochs):
            log_probs = masked_log_probs(self._logits(x), mask)
            probs = log_probs.exp()
            entropy = -(probs * log_probs.masked_fill(~mask, 0.0)).sum(dim=1)
            loss = -((probs * advantage).sum(dim=1) + self.entropy * entropy).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def progress_values(self) -> np.ndarray:
        """The critic's g per config of the space: a device's contribution to its round's progress."""
        return self.own @ self.critic[:-1] + self.critic[-1]

    def counterfactual_values(self, batch: dict) -> np.ndarray:
        """Q(a', a_-i) for every learning device i and config a' (shape (rows, configs)); -inf where infeasible."""
        g = self.progress_values()
        values = np.full(batch["mask"].shape, -np.inf)
        mask = batch["mask"].numpy()
        for r, i in enumerate(batch["rows"]):
            options = np.flatnonzero(mask[r])
            values[r, options] = self._values(i, options, batch["choice"], batch, g=g, present=batch["present"],
                                              mean_duration=self.running["duration"] or 1.0)
        return values

    def _values(self, i: int, options: np.ndarray, configs: np.ndarray, batch: dict, *, g: np.ndarray,
                present: np.ndarray, mean_duration: float) -> np.ndarray:
        """Device i's Q for each of its ``options`` with the others' ``configs``: every alternative round settled
        at once by the clock's rule on the cost model."""
        w = self.weights
        n = np.arange(len(configs))
        alternatives = np.repeat(configs[None, :], len(options), axis=0)
        alternatives[:, i] = options
        aggregated, duration = settle_rounds(finish_s=batch["total_s"][n, alternatives],
                                             arrives=present & batch["fits"][n, alternatives],
                                             target=batch["target"], deadline_s=self.context.oracle.deadline_s)
        count = aggregated.sum(axis=1)
        progress = np.where(count > 0, (g[alternatives] * aggregated).sum(axis=1) / np.maximum(count, 1), 0.0)
        return (w["progress"] * progress - w["time"] * duration / mean_duration
                - w["bytes"] * batch["traffic"][i, options] - w["failure"] * ~aggregated[:, i])

    def plan(self, choice: np.ndarray, batch: dict, *, device_id: np.ndarray) -> np.ndarray:
        """The network's proposal improved by ``plan`` sweeps of best responses under the critic.

        Each device in turn (by device id) switches to the feasible config with the highest Q given the others'
        configs, every device assumed present (who will be unavailable or drop out is not known before the
        round); a sweep that changes nothing ends the search. The same Q the network learns from, so planning
        is a policy-improvement step on the network's proposal with the learned model of progress and the
        exact cost model and round rule.
        """
        g = self.progress_values()
        present = np.ones(len(choice), dtype=bool)
        mask = batch["mask"].numpy()
        choice = choice.copy()
        mean_duration = self.running["duration"]
        if mean_duration is None:  # a first round: the proposal's own duration stands for a typical one
            n = np.arange(len(choice))
            _, duration = settle_rounds(finish_s=batch["total_s"][n, choice][None],
                                        arrives=batch["fits"][n, choice][None], target=batch["target"],
                                        deadline_s=self.context.oracle.deadline_s)
            mean_duration = float(duration[0]) or 1.0
        order = sorted(range(len(batch["rows"])), key=lambda r: device_id[batch["rows"][r]])
        for _ in range(self.plan_sweeps):
            moved = False
            for r in order:
                i = batch["rows"][r]
                options = np.flatnonzero(mask[r])
                values = self._values(i, options, choice, batch, g=g, present=present, mean_duration=mean_duration)
                best = options[int(np.argmax(values))]
                if values.max() > values[options == choice[i]][0] + 1e-9:
                    choice[i], moved = best, True
            if not moved:
                break
        return choice

    def _fit_critic(self) -> None:
        """Ridge regression, shrunk towards the prior, of the remembered devices' utilities on their configs'
        own features (the posterior mean under a Gaussian prior centred on ``prior``)."""
        features = np.concatenate([f for f, _ in self.memory])
        target = np.concatenate([u for _, u in self.memory])
        centre = features.mean(axis=0)
        centred = features - centre
        gram = centred.T @ centred + self.ridge * np.eye(features.shape[1])
        residual = target - target.mean() - centred @ self.prior
        weights = self.prior + np.linalg.solve(gram, centred.T @ residual)
        self.critic = np.append(weights, target.mean() - centre @ weights)
