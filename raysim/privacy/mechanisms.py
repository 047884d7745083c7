"""Central privacy mechanisms, assembled from config: ``privacy.mechanism`` names one (:data:`MECHANISMS`;
``dp_fedavg`` when ``privacy.clip_norm`` is set and no mechanism is named).

A :class:`Mechanism` owns its plan (fixed before any training from the config
and the population: every setting it depends on is checked there), the update
processor it runs as (a device and a server hook, :mod:`raysim.engine.processors`),
the one line a run prints about it, and its ``summary.json`` section. A run
reads nothing else of it but the rounds its budget allows, its δ and whether
it noises a support (:class:`Privacy`). A second mechanism is one class here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raysim.aggregation.lora import LORA_RULES
from raysim.engine.processors import UpdateProcessor
from raysim.privacy.central import AdaptiveClipping, CentralDP
from raysim.privacy.plan import CentralPlan, plan_central
from raysim.registry import Registry

if TYPE_CHECKING:
    from raysim.config import ExperimentConfig


class Mechanism(ABC):
    """A central privacy mechanism (see the module docstring)."""

    @abstractmethod
    def plan(self, cfg: ExperimentConfig, *, population_size: int) -> CentralPlan:
        """The run's plan; a setting the population makes impossible is a ConfigError naming its key."""

    @abstractmethod
    def processor(self, plan: CentralPlan, cfg: ExperimentConfig) -> UpdateProcessor:
        """The update processor that carries the mechanism out."""

    @abstractmethod
    def describe(self, plan: CentralPlan, cfg: ExperimentConfig) -> str:
        """One line for the run's start."""

    @abstractmethod
    def summary(self, plan: CentralPlan, cfg: ExperimentConfig, *, noised_dims: int) -> dict:
        """Its ``summary.json`` section (``privacy``), besides ``central_dp`` and ``local_dp``."""


MECHANISMS: Registry[Mechanism] = Registry("privacy mechanism")  # privacy.mechanism names one


class DPFedAvg(Mechanism):
    """User-level DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et al. 2021):
    :mod:`raysim.privacy.central`."""

    def plan(self, cfg: ExperimentConfig, *, population_size: int) -> CentralPlan:
        return plan_central(cfg.privacy, rounds=cfg.rounds, cohort_size=cfg.cohort.size,
                            population_size=population_size)

    def processor(self, plan: CentralPlan, cfg: ExperimentConfig) -> UpdateProcessor:
        a = cfg.privacy.adaptive_clipping
        adaptive = (AdaptiveClipping(target_quantile=a.target_quantile, learning_rate=a.learning_rate,
                                     count_std=plan.count_std) if a.enabled else None)
        return CentralDP(plan=plan, adaptive=adaptive)

    def describe(self, plan: CentralPlan, cfg: ExperimentConfig) -> str:
        text = (f"DP-FedAvg: noise multiplier {plan.noise_multiplier:.4g}, clip norm {plan.clip_norm:g}"
                f"{' (adaptive)' if plan.count_std else ''}, Poisson q = {plan.sample_rate:.4g}; "
                f"ε = {plan.epsilon:.4g} at δ = {plan.delta:g} after {plan.rounds} rounds ({plan.accountant})")
        if plan.rounds < cfg.rounds:
            text += f"; privacy.max_epsilon={cfg.privacy.max_epsilon:g} allows {plan.rounds} of {cfg.rounds} rounds"
        return text

    def summary(self, plan: CentralPlan, cfg: ExperimentConfig, *, noised_dims: int) -> dict:
        return {"noise_multiplier": plan.noise_multiplier, "update_noise_multiplier": plan.update_noise_multiplier,
                "clip_norm": plan.clip_norm, "sample_rate": plan.sample_rate,
                "expected_devices": plan.expected_devices, "accountant": plan.accountant,
                "max_epsilon": cfg.privacy.max_epsilon, "target_epsilon": cfg.privacy.target_epsilon,
                "rounds_within_budget": plan.rounds,
                "noise_space": "dense" if LORA_RULES[cfg.aggregation.lora].dense else "factors",
                "noised_dims": noised_dims}


MECHANISMS.register("dp_fedavg")(DPFedAvg())


def mechanism_name(cfg: ExperimentConfig) -> str | None:
    """The mechanism ``cfg`` asks for: ``privacy.mechanism``, else ``dp_fedavg`` with a clip norm, else None."""
    p = cfg.privacy
    return p.mechanism or ("dp_fedavg" if p.clip_norm is not None else None)


@dataclass(frozen=True)
class Privacy:
    """A run's central mechanism and its plan."""

    name: str
    mechanism: Mechanism
    plan: CentralPlan

    @property
    def rounds(self) -> int:
        """Rounds that run: all, or the last one within the budget."""
        return self.plan.rounds

    @property
    def delta(self) -> float:
        return self.plan.delta

    def processor(self, cfg: ExperimentConfig) -> UpdateProcessor:
        return self.mechanism.processor(self.plan, cfg)

    def describe(self, cfg: ExperimentConfig) -> str:
        return self.mechanism.describe(self.plan, cfg)


def assemble(cfg: ExperimentConfig, *, population_size: int) -> Privacy | None:
    """The run's central mechanism with its plan; None without one."""
    name = mechanism_name(cfg)
    if name is None:
        return None
    mechanism = MECHANISMS[name]
    return Privacy(name=name, mechanism=mechanism, plan=mechanism.plan(cfg, population_size=population_size))


def summary(privacy: Privacy | None, cfg: ExperimentConfig, *, noised_dims: int) -> dict:
    """``summary.json``'s ``privacy`` section."""
    common = {"local_dp": cfg.privacy.local.enabled}
    if privacy is None:
        return {"central_dp": False, **common}
    return {"central_dp": True, **common, "mechanism": privacy.name,
            **privacy.mechanism.summary(privacy.plan, cfg, noised_dims=noised_dims)}
