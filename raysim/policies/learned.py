"""``rl``: a policy network that learns per-device configs from the round results.

Every (device, config) pair is scored by one small MLP over the device's
profile, the round state and the config as the cost model prices it for that
device (predicted time, memory and bytes, bit-width, rank, ...). Scores over a
device's feasible configs form a categorical distribution (infeasible configs
masked out); an action is drawn with Gumbel-max noise keyed by (seed, round,
device id, config), so a run is reproducible and independent of cohort order.

Learning is clipped policy gradient (PPO's surrogate, a few epochs per round)
with a moving-average baseline. A device's reward for round t is

    w_progress * (L_t - L_{t+1}) / L_t * [aggregated]
    - w_time * finish_s / T - w_bytes * bytes / B - w_failure * [oom, dropped or straggler]

where L is the cohort's mean local training loss (so round t's reward is
known when round t+1 reports), T the deadline (else the device's slowest
option) and B the largest traffic any config costs. The network, optimizer
and baseline save to and load from a checkpoint (``raysim train-policy``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from raysim import rng
from raysim.errors import ConfigError
from raysim.policies.base import PolicyContext, Prices, register
from raysim.types import DeviceConfig, DeviceDraws, RoundState

DEVICE_FEATURES = 6
ROUND_FEATURES = 2
CONFIG_FEATURES = 9
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


def config_features(context: PolicyContext, prices: Prices, devices: DeviceDraws) -> np.ndarray:
    """Each config's own values and its predicted costs for each device: shape (devices, configs, 9)."""
    space = context.space
    info = np.array([context.oracle.measure(c).trainable_params * c.bits for c in space], dtype=np.float64)
    max_rank = max(1, max(c.lora_rank for c in space))
    own = np.stack([
        np.log1p(info) / np.log1p(info.max()),
        np.array([c.bits / 32 for c in space]),
        np.array([c.lora_rank / max_rank for c in space]),
        np.array([c.prune_ratio for c in space]),
        np.array([c.dropout_rate for c in space]),
        np.array([float(c.partial_embeddings) for c in space]),
    ], axis=1)
    horizon = context.oracle.deadline_s or prices.total_s.max(axis=1, keepdims=True)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


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
        w_progress: float = 20.0,
        w_time: float = 1.0,
        w_bytes: float = 0.2,
        w_failure: float = 1.0,
    ):
        self.context = context
        self.learn = learn
        self.epochs, self.clip, self.entropy, self.decay = epochs, clip, entropy, baseline_decay
        self.weights = {"progress": w_progress, "time": w_time, "bytes": w_bytes, "failure": w_failure}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.torch_seed(context.seed, "policy-rl-init"))
            self.net = ScoreNet(hidden=hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.baseline: float | None = None
        self.first_loss: float | None = None
        self._batch: dict | None = None  # this round's choices, until its results arrive
        self.pending: dict | None = None  # the last round's batch, waiting for the next round's loss
        if checkpoint is not None:
            path = Path(checkpoint)
            if not path.is_file():
                raise ConfigError("checkpoint not found", field="params.checkpoint")
            self.load_state_dict(torch.load(path, weights_only=False))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "baseline": self.baseline}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"]

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
                           "old": log_probs.gather(1, action[:, None]).squeeze(1), "round": state.round}
        return [self.context.space[j] for j in choice]

    def observe(self, results: dict) -> None:
        if not self.learn:
            return
        row, devices = results["round"], results["devices"]
        loss = row["train_loss"]
        if self.pending is not None and math.isfinite(loss) and math.isfinite(self.pending["loss"]):
            progress = (self.pending["loss"] - loss) / self.pending["loss"]
            self._update(self.pending, progress)
        batch, self._batch = self._batch, None
        if batch is None:
            return
        rows = batch["rows"]
        status = np.asarray(devices["status"])[rows]
        horizon = self.context.oracle.deadline_s or float(np.nanmax(devices["finish_s"], initial=1.0))
        finish = np.nan_to_num(np.asarray(devices["finish_s"], dtype=np.float64)[rows], nan=horizon)
        traffic = (np.asarray(devices["bytes_up"]) + np.asarray(devices["bytes_down"]))[rows]
        w = self.weights
        batch["cost"] = (w["time"] * np.minimum(finish / horizon, 4.0) + w["bytes"] * traffic / self._max_traffic()
                         + w["failure"] * np.isin(status, FAILED))
        batch["ok"] = status == "ok"
        batch["keep"] = status != "unavailable"
        batch["loss"] = loss
        self.pending = batch

    def _max_traffic(self) -> float:
        return float(max(m.bytes_up + m.bytes_down for m in map(self.context.oracle.measure, self.context.space)))

    def _inputs(self, devices: DeviceDraws, state: RoundState, prices: Prices) -> torch.Tensor:
        if self.first_loss is None and state.last_train_loss is not None:
            self.first_loss = state.last_train_loss
        ratio = 1.0 if state.last_train_loss is None else state.last_train_loss / self.first_loss
        per_device = np.concatenate(
            [device_features(devices), np.tile([state.round / self.context.rounds, ratio], (len(devices), 1))], axis=1)
        configs = config_features(self.context, prices, devices)
        k = len(self.context.space)
        stacked = np.concatenate([np.repeat(per_device[:, None, :], k, axis=1), configs], axis=2)
        return torch.from_numpy(stacked).float()

    def _update(self, batch: dict, progress: float) -> None:
        keep = batch["keep"]
        if not keep.any():
            return
        reward = self.weights["progress"] * progress * batch["ok"] - batch["cost"]
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
