"""``rl``: a policy network that learns per-device configs from the round results.

Every (device, config) pair is scored by one small MLP over the device's
profile, the round state and the config as the cost model prices it for that
device (predicted time, memory and bytes, bit-width, rank, compute, ...).
Scores over a device's feasible configs form a categorical distribution
(infeasible configs masked out); an action is drawn with Gumbel-max noise
keyed by (seed, round, device id, config), so a run is reproducible and
independent of cohort order.

The objective is the one a comparison study scores: reach the target soonest
with few bytes and failures. Progress is a team outcome (the round's
aggregate improves the model), so each device gets a counterfactual share of
it from a learned critic (an additive value decomposition, as in VDN, with
COMA's policy-weighted counterfactual baseline): the critic g, linear in
the (device, config) features, is fitted so that the mean of g over a round's
aggregated devices predicts that round's progress / scale (over the last
``memory`` settled rounds), and device i's credit is
g(x_i, a_i) [0 if not aggregated] minus the mean of g(x_i, .) under the
policy. A device's reward for round t is

    w_progress * credit - w_time * finish_s / T - w_bytes * bytes / B
    - w_failure * [oom, dropped or straggler]

Progress is the relative drop of the held-out eval loss, spread evenly over
the rounds since the previous evaluation (so it is known when the next
evaluation reports); with ``eval.every`` 0 it is the relative drop of the
cohort's training loss from round t to t + 1. ``scale`` is a running mean of
|progress|, which keeps the progress term about 1 at every stage of
training; T is the deadline (else the slowest option) and B the largest
traffic any config costs.

Learning is clipped policy gradient (PPO's surrogate, a few epochs per
settled round) with a moving-average baseline. The network, critic, their
optimizers, the critic's memory, baseline and scale save to and load from a checkpoint (``raysim
train-policy``); a run with ``learn: false`` only applies a checkpoint.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from raysim import rng
from raysim.errors import ConfigError
from raysim.policies.base import PolicyContext, Prices, register, update_information
from raysim.types import DeviceConfig, DeviceDraws, RoundState

DEVICE_FEATURES = 6
ROUND_FEATURES = 2
CONFIG_FEATURES = 10
FAILED = ("oom", "dropped", "straggler")


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


def config_features(own: np.ndarray, prices: Prices, devices: DeviceDraws, *, deadline_s: float | None) -> np.ndarray:
    """``own`` features and each config's predicted costs for each device: shape (devices, configs, 10)."""
    horizon = deadline_s or prices.total_s.max(axis=1, keepdims=True)
    traffic = prices.bytes_up + prices.bytes_down
    priced = np.stack([
        np.minimum(prices.total_s / horizon, 4.0),
        np.minimum(prices.peak_memory_bytes / devices.memory_bytes[:, None], 4.0),
        traffic / max(1, traffic.max()),
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
class Learned:
    """A learned per-device policy (see the module docstring); learns online unless ``learn`` is false."""

    def __init__(
        self,
        *,
        context: PolicyContext,
        checkpoint: str | None = None,
        learn: bool = True,
        hidden: int = 32,
        lr: float = 3e-3,
        epochs: int = 4,
        clip: float = 0.2,
        entropy: float = 0.01,
        baseline_decay: float = 0.9,
        w_progress: float = 1.0,
        w_time: float = 0.25,
        w_bytes: float = 0.05,
        w_failure: float = 1.0,
        critic_steps: int = 20,
        memory: int = 256,
    ):
        self.context = context
        self.learn = learn
        self.epochs, self.clip, self.entropy, self.decay = epochs, clip, entropy, baseline_decay
        self.weights = {"progress": w_progress, "time": w_time, "bytes": w_bytes, "failure": w_failure}
        self.from_eval = context.eval_every > 0
        self.own = own_features(context)  # fixed for the run: computed once
        self.max_traffic = float(max(m.bytes_up + m.bytes_down for m in map(context.oracle.measure, context.space)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.torch_seed(context.seed, "policy-rl-init"))
            self.net = ScoreNet(hidden=hidden)
            # a device's contribution to its round's progress: linear in the features, so that a few
            # dozen rounds (one equation each) identify it
            self.critic = torch.nn.Linear(DEVICE_FEATURES + ROUND_FEATURES + CONFIG_FEATURES, 1)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.critic_optimizer = torch.optim.Adam(self.critic.parameters(), lr=lr)
        self.critic_steps, self.memory_size = critic_steps, memory
        self.memory: list[tuple[torch.Tensor, float]] = []  # (aggregated devices' chosen features, progress)
        self.baseline: float | None = None
        self.scale: float | None = None  # running mean of |progress|
        self.first_loss: float | None = None
        self._batch: dict | None = None  # this round's choices, until its results arrive
        self.pending: list[dict] = []  # rounds whose progress is not known yet
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ConfigError("checkpoint not found", field="params.checkpoint")
            self.load_state_dict(torch.load(path, weights_only=False))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
                "memory": self.memory, "baseline": self.baseline, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.memory = list(state["memory"])
        self.baseline, self.scale = state["baseline"], state["scale"]

    @single_threaded
    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        prices = self.context.oracle.price(devices, self.context.space)
        x = self._inputs(devices, state, prices)
        mask = torch.from_numpy(prices.feasible)
        with torch.no_grad():
            logits = self.net(x)
        noisy = logits.masked_fill(~mask, -math.inf) + torch.from_numpy(
            gumbel(self.context.seed, state.round, devices.device_id, len(self.context.space))).float()
        has_option = prices.feasible.any(axis=1)
        choice = np.where(has_option, noisy.argmax(dim=1).numpy(), prices.fallback())
        if self.learn:
            rows = np.flatnonzero(has_option)
            log_probs = masked_log_probs(logits[rows], mask[rows])
            action = torch.from_numpy(choice[rows])
            self._batch = {"rows": rows, "x": x[rows], "mask": mask[rows], "action": action,
                           "old": log_probs.gather(1, action[:, None]).squeeze(1), "before": state.last_eval_loss}
        return [self.context.space[j] for j in choice]

    @single_threaded
    def observe(self, results: dict) -> None:
        if not self.learn:
            return
        row, devices = results["round"], results["devices"]
        batch, self._batch = self._batch, None
        if batch is not None:
            rows = batch["rows"]
            status = np.asarray(devices["status"])[rows]
            horizon = self._horizon(devices)
            finish = np.nan_to_num(np.asarray(devices["finish_s"], dtype=np.float64)[rows], nan=horizon)
            traffic = (np.asarray(devices["bytes_up"]) + np.asarray(devices["bytes_down"]))[rows]
            w = self.weights
            batch["cost"] = (w["time"] * np.minimum(finish / horizon, 4.0)
                             + w["bytes"] * traffic / self.max_traffic + w["failure"] * np.isin(status, FAILED))
            batch["ok"] = status == "ok"
            batch["keep"] = status != "unavailable"
            batch["loss"] = row["train_loss"]
            self.pending.append(batch)
        if self.from_eval:
            self._settle_by_eval(row.get("eval_loss", math.nan))
        else:
            self._settle_by_training_loss(row["train_loss"])

    def _settle_by_eval(self, after: float) -> None:
        """An evaluation settles every round since the previous one, each with an equal share of the progress."""
        if not math.isfinite(after) or not self.pending:
            return
        span, self.pending = self.pending, []
        before = span[0]["before"]
        if before is None or not math.isfinite(before):
            return
        for batch in span:
            self._update(batch, (before - after) / before / len(span))

    def _settle_by_training_loss(self, loss: float) -> None:
        """Round t is settled by round t + 1's training loss (the first on the model round t made)."""
        if len(self.pending) < 2:
            return
        batch, self.pending = self.pending[0], self.pending[1:]
        if math.isfinite(loss) and math.isfinite(batch["loss"]):
            self._update(batch, (batch["loss"] - loss) / batch["loss"])

    def _horizon(self, devices: dict) -> float:
        return self.context.oracle.deadline_s or float(np.nanmax(devices["finish_s"], initial=1.0))

    def _inputs(self, devices: DeviceDraws, state: RoundState, prices: Prices) -> torch.Tensor:
        if self.first_loss is None and state.last_train_loss is not None:
            self.first_loss = state.last_train_loss
        ratio = 1.0 if state.last_train_loss is None else state.last_train_loss / self.first_loss
        per_device = np.concatenate(
            [device_features(devices), np.tile([state.round / self.context.rounds, ratio], (len(devices), 1))], axis=1)
        configs = config_features(self.own, prices, devices, deadline_s=self.context.oracle.deadline_s)
        k = len(self.context.space)
        stacked = np.concatenate([np.repeat(per_device[:, None, :], k, axis=1), configs], axis=2)
        return torch.from_numpy(stacked).float()

    def _update(self, batch: dict, progress: float) -> None:
        keep = batch["keep"]
        if not keep.any():
            return
        self.scale = abs(progress) if self.scale is None else self.decay * self.scale + (1 - self.decay) * abs(progress)
        x, mask, action, ok = batch["x"], batch["mask"], batch["action"], torch.from_numpy(batch["ok"])
        if ok.any() and self.scale > 0:
            chosen = x[torch.arange(len(action)), action]
            self.memory = [*self.memory, (chosen[ok], progress / self.scale)][-self.memory_size:]
            self._fit_critic()
        with torch.no_grad():
            values = self.critic(x).squeeze(-1)
            policy = masked_log_probs(self.net(x), mask).exp()
            expected = (policy * values.masked_fill(~mask, 0.0)).sum(dim=1)
            credit = (values.gather(1, action[:, None]).squeeze(1) * ok - expected).numpy()
        reward = self.weights["progress"] * credit - batch["cost"]
        mean = float(reward[keep].mean())
        self.baseline = mean if self.baseline is None else self.decay * self.baseline + (1 - self.decay) * mean
        advantage = torch.from_numpy((reward - self.baseline)[keep]).float()
        x, mask, action, old = (batch[k][torch.from_numpy(keep)] for k in ("x", "mask", "action", "old"))
        for _ in range(self.epochs):
            log_probs = masked_log_probs(self.net(x), mask)
            ratio = torch.exp(log_probs.gather(1, action[:, None]).squeeze(1) - old)
            surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - self.clip, 1 + self.clip) * advantage)
            probs = log_probs.exp()
            entropy = -(probs * log_probs.masked_fill(~mask, 0.0)).sum(dim=1)
            loss = -(surrogate + self.entropy * entropy).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def _fit_critic(self) -> None:
        """Fit g so that each remembered round's mean g over its aggregated devices is its progress."""
        features = torch.cat([f for f, _ in self.memory])
        rounds = torch.cat([torch.full((len(f),), r) for r, (f, _) in enumerate(self.memory)])
        counts = torch.bincount(rounds, minlength=len(self.memory)).float()
        target = torch.tensor([p for _, p in self.memory], dtype=torch.float32)
        for _ in range(self.critic_steps):
            mean = torch.zeros(len(self.memory)).index_add(0, rounds, self.critic(features).squeeze(-1)) / counts
            loss = torch.nn.functional.mse_loss(mean, target)
            self.critic_optimizer.zero_grad()
            loss.backward()
            self.critic_optimizer.step()
