"""``rl``: a learned per-device policy with a learned critic and planning (see docs/rl.md for the method)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import raysim.policies.rl.features as features
import raysim.policies.rl.planning as planning
from raysim import rng
from raysim.emulation.clock import OK
from raysim.errors import ConfigError
from raysim.io import checkpoint as ckpt
from raysim.io.checkpoint import State
from raysim.io.results import RoundResult
from raysim.policies.base import Policy, PolicyContext, register
from raysim.policies.rl.critic import Critic
from raysim.policies.rl.planning import Proposal, Rewards
from raysim.types import DeviceConfig, DeviceDraws, RoundState


class ScoreNet(torch.nn.Module):
    """Scores (device, round, config) feature vectors: one logit each."""

    def __init__(self, *, hidden: int):
        super().__init__()
        size = features.DEVICE_FEATURES + features.ROUND_FEATURES + features.CONFIG_FEATURES
        self.body = torch.nn.Sequential(torch.nn.Linear(size, hidden), torch.nn.Tanh(),
                                        torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        torch.nn.init.zeros_(self.body[-1].weight)  # every feasible config equally likely at the start
        torch.nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)


@dataclass(frozen=True)
class Learning:
    """How the network learns: Adam steps per round, the entropy bonus, the running means' decay."""

    epochs: int = 4
    entropy: float = 0.01
    decay: float = 0.9


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
def rl(*, context: PolicyContext, checkpoint: str | None = None, learn: bool = True, hidden: int = 32,
       lr: float = 3e-3, epochs: int = 4, entropy: float = 0.01, decay: float = 0.9, w_progress: float = 1.0,
       w_time: float = 1.0, w_bytes: float = 0.01, w_failure: float = 0.1, ridge: float = 1.0,
       prior_information: float = 1.0, memory: int = 64, temperature: float = 1.0, plan: int = 3) -> Learned:
    """The ``rl`` policy from a policy file's parameters (the names YAML uses; see policies/rl.yaml)."""
    checks = [(temperature > 0, "temperature", "must be > 0"), (hidden >= 1, "hidden", "must be >= 1"),
              (lr > 0, "lr", "must be > 0"), (epochs >= 1, "epochs", "must be >= 1"),
              (entropy >= 0, "entropy", "must be >= 0"), (0 <= decay <= 1, "decay", "must be in [0, 1]"),
              (ridge > 0, "ridge", "must be > 0"), (prior_information >= 0, "prior_information", "must be >= 0"),
              (memory >= 1, "memory", "must be >= 1"),
              (plan >= 0, "plan", "must be >= 0 (sweeps of best responses; 0: the network's sample as is)")]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(message, field=f"params.{key}")
    policy = Learned(context=context, hidden=hidden, lr=lr, learn=learn, temperature=temperature, plan=plan,
                     learning=Learning(epochs=epochs, entropy=entropy, decay=decay),
                     rewards=Rewards(progress=w_progress, time=w_time, bytes=w_bytes, failure=w_failure),
                     critic=dict(prior_information=prior_information, ridge=ridge, memory=memory))
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise ConfigError("checkpoint not found", field="params.checkpoint")
        if path.suffix != ".safetensors":  # a pickle (.pt) could run code as it loads
            raise ConfigError(f"{path.name}: an rl checkpoint is a .safetensors file (raysim train-policy writes one)",
                              field="params.checkpoint")
        policy.load_state_dict(unpack(ckpt.load(path)["policy"]))
    return policy


def pack(state: dict) -> State:
    """A ``Learned.state_dict()`` as tensors and JSON (what a policy file and a run checkpoint hold)."""
    opt = ckpt.optimizer_state_dict(state["optimizer"])
    tensors = {**{f"net.{k}": v for k, v in state["net"].items()},
               **{f"optimizer.{k}": v for k, v in opt.tensors.items()},
               "critic": torch.from_numpy(np.asarray(state["critic"], dtype=np.float64))}
    for j, (features_, utilities) in enumerate(state["memory"]):
        tensors[f"memory.{j}.features"] = torch.from_numpy(np.asarray(features_, dtype=np.float64))
        tensors[f"memory.{j}.utilities"] = torch.from_numpy(np.asarray(utilities, dtype=np.float64))
    return State(tensors=tensors, meta={"optimizer": opt.meta, "memory": len(state["memory"]),
                                        "running": dict(state["running"])})


def unpack(state: State) -> dict:
    t = state.tensors
    return {"net": {k[4:]: v for k, v in t.items() if k.startswith("net.")},
            "optimizer": ckpt.optimizer_dict(ckpt.sub(state, "optimizer", sep=".")),
            "critic": t["critic"].numpy(),
            "memory": [(t[f"memory.{j}.features"].numpy(), t[f"memory.{j}.utilities"].numpy())
                       for j in range(state.meta["memory"])],
            "running": dict(state.meta["running"])}


class Learned(Policy):
    """A learned per-device policy: the network's proposal, improved by planning under the critic, and learnt
    from each round's counterfactual values (all-action policy gradient)."""

    wants_utility = True  # the critic learns from each update's utility

    def __init__(self, *, context: PolicyContext, hidden: int, lr: float, learn: bool, temperature: float,
                 plan: int, learning: Learning, rewards: Rewards, critic: dict):
        self.context, self.learn, self.temperature, self.plan_sweeps = context, learn, temperature, plan
        self.learning, self.rewards = learning, rewards
        self.own = features.own_features(context)  # fixed for the run: computed once
        self.max_traffic = float(max(m.bytes_up + m.bytes_down for m in map(context.oracle.measure, context.space)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng.torch_seed(context.seed, "policy-rl-init"))
            self.net = ScoreNet(hidden=hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.critic = Critic(own=self.own, **critic)
        self.running = {"progress": None, "duration": None, "advantage": None}  # running means of magnitudes
        self.first_loss: float | None = None
        self._proposal: Proposal | None = None  # this round's choices, until its results arrive

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(), "memory": self.critic.memory,
                "critic": self.critic.weights, "running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.critic.memory = list(state["memory"])
        self.critic.weights = np.asarray(state["critic"], dtype=np.float64)
        self.running = dict(state["running"])

    def checkpoint(self) -> State:
        packed = pack(self.state_dict())
        packed.meta["first_loss"] = self.first_loss  # a run's, not a policy file's: a new run sets its own
        return packed

    def restore(self, state: State) -> None:
        self.load_state_dict(unpack(state))
        self.first_loss = state.meta["first_loss"]

    @single_threaded
    def assign(self, devices: DeviceDraws, state: RoundState) -> list[DeviceConfig]:
        if len(devices) == 0:  # a Poisson cohort can be empty: nothing to choose, nothing to learn from
            return []
        prices = self.context.oracle.price(devices, self.context.space)
        target = state.target or len(devices)
        x = self._inputs(devices, state, prices, target=target)
        mask = torch.from_numpy(prices.feasible)
        with torch.no_grad():
            logits = self._logits(x)
        noisy = logits.masked_fill(~mask, -math.inf) + torch.from_numpy(
            features.gumbel(self.context.seed, state.round, devices.device_id, len(self.context.space))).float()
        has_option = prices.feasible.any(axis=1)
        choice = np.where(has_option, noisy.argmax(dim=1).numpy(), prices.fallback())
        rows = np.flatnonzero(has_option)
        proposal = Proposal(rows=rows, x=x[rows], mask=mask[rows], choice=choice, total_s=prices.total_s,
                            fits=prices.fits, traffic=(prices.bytes_up + prices.bytes_down) / self.max_traffic,
                            target=target)
        if self.plan_sweeps:
            proposal = replace(proposal, choice=self.plan(proposal, device_id=devices.device_id))
        if self.learn:
            self._proposal = proposal
        return [self.context.space[j] for j in proposal.choice]

    def plan(self, proposal: Proposal, *, device_id: np.ndarray) -> np.ndarray:
        """The proposal improved by ``plan`` sweeps of best responses under the critic
        (:func:`raysim.policies.rl.planning.best_responses`)."""
        deadline_s = self.context.oracle.deadline_s
        mean_duration = self.running["duration"]
        if mean_duration is None:  # a first round: the proposal's own duration stands for a typical one
            mean_duration = planning.first_duration(proposal, deadline_s=deadline_s)
        return planning.best_responses(proposal, sweeps=self.plan_sweeps, device_id=device_id,
                                       g=self.critic.values(), mean_duration=mean_duration, rewards=self.rewards,
                                       deadline_s=deadline_s)

    @single_threaded
    def observe(self, result: RoundResult) -> None:
        if not self.learn:
            return
        proposal, self._proposal = self._proposal, None
        if proposal is None:
            return
        status = np.asarray(result.devices["status"])
        utility = np.asarray(result.devices["utility"], dtype=np.float64)
        aggregated = np.flatnonzero((status == OK) & np.isfinite(utility))
        if len(aggregated):
            weights = np.asarray(result.devices["num_examples"], dtype=np.float64)[aggregated]
            scale = self._running("progress", float(np.average(utility[aggregated], weights=weights)))
            if scale > 0:
                self.critic.learn(proposal.choice[aggregated], utility[aggregated] / scale)
        self._running("duration", result.row.round_duration_s)
        self._update(proposal, present=~np.isin(status, ("unavailable", "dropped")))  # what no config changes

    def counterfactual_values(self, proposal: Proposal, *, present: np.ndarray) -> np.ndarray:
        """Q(a', a_-i) for every chosen-for device i and config a' (:func:`planning.counterfactual_values`)."""
        return planning.counterfactual_values(proposal, g=self.critic.values(), present=present,
                                              mean_duration=self.running["duration"] or 1.0, rewards=self.rewards,
                                              deadline_s=self.context.oracle.deadline_s)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The policy's logits: the network's scores over the temperature (below 1: closer to its best choice)."""
        return self.net(x) / self.temperature

    def _running(self, key: str, value: float) -> float:
        """Update and return the running mean of ``value``'s magnitude."""
        old, decay = self.running[key], self.learning.decay
        self.running[key] = abs(value) if old is None else decay * old + (1 - decay) * abs(value)
        return self.running[key]

    def _inputs(self, devices: DeviceDraws, state: RoundState, prices, *, target: int) -> torch.Tensor:
        if self.first_loss is None and state.last_train_loss is not None:
            self.first_loss = state.last_train_loss
        ratio = 1.0 if state.last_train_loss is None else state.last_train_loss / self.first_loss
        return features.inputs(devices, self.own, prices, round_features=[state.round / self.context.rounds, ratio],
                               deadline_s=self.context.oracle.deadline_s, target=target)

    def _update(self, proposal: Proposal, *, present: np.ndarray) -> None:
        """Gradient steps on the expected advantage of every present device's whole distribution.

        The counterfactual values of all of a device's configs are known, so the
        gradient is the all-action one, sum over a of grad pi(a | x) A(a) (Mean
        Actor-Critic, Allen et al. 2017): exact under the critic, without the
        variance of scoring the sampled config alone.
        """
        keep = torch.from_numpy(present[proposal.rows])
        if not keep.any():
            return
        x, mask = proposal.x[keep], proposal.mask[keep]
        values = self.counterfactual_values(proposal, present=present)[keep.numpy()]
        with torch.no_grad():
            policy = masked_log_probs(self._logits(x), mask).exp().double().numpy()
        values = np.where(mask.numpy(), values, 0.0)
        advantage = values - (policy * values).sum(axis=1, keepdims=True)
        typical = self._running("advantage", float((policy * np.abs(advantage)).sum(axis=1).mean()))
        advantage = torch.from_numpy(np.where(mask.numpy(), advantage / max(typical, 1e-8), 0.0)).float()
        for _ in range(self.learning.epochs):
            log_probs = masked_log_probs(self._logits(x), mask)
            probs = log_probs.exp()
            entropy = -(probs * log_probs.masked_fill(~mask, 0.0)).sum(dim=1)
            loss = -((probs * advantage).sum(dim=1) + self.learning.entropy * entropy).mean()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
