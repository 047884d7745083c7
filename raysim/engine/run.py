"""One experiment: set-up, the round, and the callbacks that watch it, top to bottom.

:func:`build_run` sets a run up once (population, privacy plan, data, the
pre-trained model, Ray, the device pool, the policy, the aggregator, the
files). :func:`run_round` is one round: sample a cohort at virtual time t,
let the policy assign configs, price every device with the cost model, settle
who arrives in time, train those devices for real on the pool and aggregate
their partial sums. Each round's result then passes through the run's
callbacks (:mod:`raysim.engine.callbacks`): evaluation, the accuracy target, the
privacy budget, the files, the policy's feedback, progress, experiment
tracking (:mod:`raysim.tracking`, when on) and any the caller adds. Central
DP is an update processor (:mod:`raysim.engine.processors`): the plan is fixed
before anything trains and the accountant is stepped with the noise it
releases.
"""

from __future__ import annotations

import functools
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import ray
import torch

import raysim
from raysim import cluster, rng, tracking
from raysim.config import ExperimentConfig, result_config, to_yaml
from raysim.data.base import FederatedDataset
from raysim.data.build import build_dataset
from raysim.emulation.clock import OK, settle_round
from raysim.emulation.cohort import sample_cohort
from raysim.emulation.costmodel import Downloads, budget_limits, device_costs
from raysim.emulation.profiles import Population, load_population
from raysim.engine import callbacks as cb
from raysim.engine.aggregator import Aggregator, NonFiniteUpdate
from raysim.engine.pool import DevicePool
from raysim.engine.processors import UpdateProcessor
from raysim.engine.records import device_columns, round_row
from raysim.errors import ConfigError, describe_error
from raysim.io import checkpoint as ckpt
from raysim.io import paths
from raysim.io.caches import Caches
from raysim.io.results import COMPLETE, RoundResult, RunIdentity, RunWriter, atomic_write
from raysim.io.rundir import claim, resumable
from raysim.methods import METHODS, embeddings, full_config, method_space
from raysim.methods.coordinates import Space, Support
from raysim.methods.rank import truncation_rank
from raysim.methods.split import any_split
from raysim.models.build import BaseModel, base_seed, initial_base_model
from raysim.offsite.build import build_emulators
from raysim.policies import CostOracle, Policy, PolicyContext, PolicySpec, build_policy, policy_identity, read_policy
from raysim.privacy import mechanisms
from raysim.split import leakage
from raysim.split.mechanisms import adapter_sets as mixing_sets
from raysim.synth.sources import pretrained_base
from raysim.types import RoundState


def check_compatible(cfg: ExperimentConfig, base: BaseModel) -> None:
    """The config fits the model it runs on: with ``model.path`` the folder's sizes, not ``model.*``'s."""
    if cfg.data.seq_len > base.n_positions:
        raise ConfigError(f"longer than the model's {base.n_positions} positions", field="data.seq_len")
    for method in METHODS.values():
        for i, value in enumerate(getattr(cfg.methods, method.key)):
            if (problem := method.check_model(value, base.sizes)) is not None:
                raise ConfigError(problem, field=f"methods.{method.key}[{i}]")


def default_run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).absolute()
    return Path("runs").absolute() / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_experiment(cfg: ExperimentConfig, *, make_policy: Callable[[PolicyContext], Policy] | None = None,
                   callbacks: list[cb.Callback] = (), caches: Caches | None = None, resume: bool = False,
                   overwrite: bool = False) -> Path:
    """Run ``cfg`` to completion; return the run directory.

    ``make_policy`` builds the policy in place of ``cfg.policy`` (``raysim
    train-policy`` carries one learned policy across runs); ``callbacks`` watch
    every round after the run's own (:mod:`raysim.engine.callbacks`); ``caches`` are
    shared with the caller's other runs (:mod:`raysim.io.caches`). ``resume``
    continues the run in ``output_dir`` from its checkpoint; ``overwrite``
    replaces the run there; without either, an ``output_dir`` that holds
    anything is refused.
    """
    run = build_run(cfg, make_policy=make_policy, callbacks=callbacks, caches=caches or Caches(), resume=resume,
                    overwrite=overwrite)
    with run:
        for rnd in range(run.completed + 1, cfg.rounds + 1):
            if run.after_round(run_round(run, rnd)):
                break
        else:
            run.status = "finished"
    return run.dir


def run_round(run: Run, rnd: int) -> RoundResult:
    """One round, from the cohort to the new global state (evaluation is a callback's)."""
    cfg, started = run.cfg, time.perf_counter()
    cohort = sample_cohort(run.population, cfg.cohort, seed=cfg.seed, round=rnd, sim_time_s=run.sim_time_s)
    draws = run.population.draw(cohort.device_id, seed=cfg.seed)
    configs = run.policy.assign(draws, run.round_state(rnd, target=cohort.target))
    setup = run.downloads.first(draws.device_id, [c.emulator for c in configs])  # emulators, once per device
    costs = device_costs(draws, [run.pool.measure(c) for c in configs], local_steps=cfg.train.local_steps,
                         server_flops_per_s=cfg.server.train_gflops * 1e9, setup=setup)
    limits = budget_limits(draws, lambda: run.pool.measure(full_config()), local_steps=cfg.train.local_steps)
    dropped = rng.uniform(cfg.seed, "dropout", rnd, ids=cohort.device_id) < draws.dropout_prob
    outcome = settle_round(finish_s=costs.total_s, available=cohort.available, fits=costs.fits(draws),
                           dropped=dropped, target=cohort.target, deadline_s=cfg.cohort.deadline_s,
                           within=None if limits is None else limits.allow(costs))
    trained = np.flatnonzero(outcome.status == OK)
    records, partials = run.pool.train(run.state_ref, round=rnd, device_ids=cohort.device_id[trained],
                                       configs=[configs[i] for i in trained], flops=costs.flops[trained],
                                       params=run.aggregator.round_params.remote(), utility=run.policy.wants_utility)
    run.state_ref, stats_ref = run.aggregator.aggregate.options(num_returns=2).remote(rnd, partials)
    stats = ray.get(stats_ref)
    if "non_finite" in stats:
        raise NonFiniteUpdate(f"{stats['non_finite']}; the run stops with the state of round {rnd - 1}")
    devices = device_columns(rnd, draws, configs, costs, outcome.status, trained, records, cfg, limits)
    if any_split(cfg.methods):  # what the server saw at the split devices' cuts
        stats = {**stats, **leakage.round_columns(list(records.by_device_id().crossing),
                                                  classes=len(cfg.data.labels), seed=cfg.seed, round=rnd)}
    row = round_row(rnd, sim_time_s=run.sim_time_s + outcome.duration_s, outcome=outcome, devices=devices,
                    costs=costs, records=records, stats=stats)
    return RoundResult(row=row, devices=devices, started_s=started)


@dataclass(eq=False)
class Run:
    """A run's parts, set up once by :func:`build_run`, and how far it has come.

    Used as a context manager: entering starts the callbacks (``status:
    running``); leaving sets the status (``interrupted`` on Ctrl-C or SIGTERM,
    ``failed`` with its cause on an error), ends the callbacks (the summary,
    a last checkpoint), frees the actors and, after a clean stop, writes the
    final state.
    """

    cfg: ExperimentConfig
    dir: Path
    population: Population
    dataset: FederatedDataset
    base: BaseModel
    privacy: mechanisms.Privacy | None
    spec: PolicySpec
    pool: DevicePool
    policy: Policy
    aggregator: ray.actor.ActorHandle
    writer: RunWriter
    callbacks: list[cb.Callback]
    state_ref: ray.ObjectRef
    actor_nodes: int
    noised_dims: int = 0  # coordinates central DP noises each round (0 without it)
    sim_time_s: float = 0.0
    epsilon: float = math.inf  # spent so far: 0 before round 1 under central DP, inf without it
    last: dict[str, float] = field(default_factory=dict)  # the latest finite train and eval metrics
    totals: dict[str, int] = field(default_factory=lambda: {"bytes_up": 0, "bytes_down": 0, "devices_trained": 0})
    completed: int = 0
    downloads: Downloads = field(default_factory=Downloads)  # who holds which emulator
    status: str = "running"
    cause: str | None = None  # why a failed run failed
    wall_before_s: float = 0.0  # wall time of the sessions before a resume
    started_s: float = field(default_factory=time.perf_counter)

    def round_state(self, rnd: int, *, target: int) -> RoundState:
        return RoundState(round=rnd, sim_time_s=self.sim_time_s, last_train_loss=self.last.get("train_loss"),
                          last_eval_loss=self.last.get("eval_loss"),
                          epsilon=self.epsilon, target=target)

    def after_round(self, result: RoundResult) -> bool:
        """The result through every callback in order (each sees the metrics the ones before it added); record
        the round; whether a callback stopped the run (the first one to ask sets the status)."""
        stop = None
        for callback in self.callbacks:
            step = callback.after_round(self, result)
            result = result.with_metrics(step.metrics)
            stop = stop or step.stop
        row = result.row
        self.sim_time_s, self.epsilon, self.completed = row.sim_time_s, row.epsilon, row.round
        self.totals["bytes_up"] += row.bytes_up
        self.totals["bytes_down"] += row.bytes_down
        self.totals["devices_trained"] += row.n_completed
        devices = result.devices
        self.downloads.record(devices["device_id"], devices["emulator"], devices["setup_bytes_down"])
        self.last |= {k: getattr(row, k) for k in ("train_loss", *cb.EVAL_COLUMNS) if not math.isnan(getattr(row, k))}
        if stop is not None:
            self.status = stop.status
            print(f"raysim: {stop.message}", file=sys.stderr)
        for callback in self.callbacks:
            callback.after_record(self)
        return stop is not None

    def __enter__(self) -> Run:
        self.writer.write_summary(self.summary())  # status: running, before anything that can take time or fail
        try:
            for callback in self.callbacks:
                callback.on_start(self)  # the initial evaluation among them
        except BaseException:
            self.__exit__(*sys.exc_info())  # failed or interrupted before round 1: said so, actors freed
            raise
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:
            self.status = "interrupted" if issubclass(kind, KeyboardInterrupt) else "failed"
            self.cause = None if self.status == "interrupted" else describe_error(error)
        try:
            for callback in self.callbacks:
                callback.before_end(self)
            summary = self.summary()
            for callback in self.callbacks:
                callback.on_end(self, summary)
            if self.status in COMPLETE:  # the driver writes every file
                state = ray.get(self.aggregator.get_state.remote())
                atomic_write(self.dir / "final_state.pt", lambda tmp: torch.save(state, tmp))
        finally:
            self.pool.close()  # frees the actors' CPUs for the next run in this process (raysim compare)
            ray.kill(self.aggregator)

    def save_checkpoint(self) -> bool:
        """The run's state after its last recorded round, to ``checkpoint.safetensors``; False if the
        aggregator has moved on to a round the files do not hold (an interrupted round)."""
        aggregator = ray.get(self.aggregator.checkpoint.remote(self.completed))
        if aggregator is None:
            return False
        progress = {"completed": self.completed, "sim_time_s": self.sim_time_s, "epsilon": self.epsilon,
                    "last": self.last, "totals": self.totals,
                    "holding": self.downloads.state(),
                    "wall_time_s": self.wall_time_s(), "config": self.result_config}
        ckpt.save(self.dir / ckpt.FILE, {
            "run": ckpt.State(meta=progress), "aggregator": aggregator, "policy": self.policy.checkpoint(),
            "callbacks": ckpt.State(meta={type(c).__name__: c.state() for c in self.callbacks}),
        })
        return True

    def restore(self, parts: dict[str, ckpt.State]) -> None:
        """Continue from a checkpoint: the aggregator, the policy, the callbacks and the run's progress."""
        progress = parts["run"].meta
        ray.get(self.aggregator.restore.remote(parts["aggregator"], round=progress["completed"]))
        self.state_ref = self.aggregator.get_state.remote()
        self.policy.restore(parts["policy"])
        for callback in self.callbacks:
            callback.load_state(parts["callbacks"].meta.get(type(callback).__name__, {}))
        self.completed, self.sim_time_s = progress["completed"], progress["sim_time_s"]
        self.epsilon, self.last = progress["epsilon"], progress["last"]
        self.totals, self.wall_before_s = progress["totals"], progress["wall_time_s"]
        self.downloads = Downloads.of(progress.get("holding", {}))
        self.writer.resume_after(self.completed)  # rounds past the checkpoint are redone

    @functools.cached_property
    def result_config(self) -> dict:
        """The keys that decide the run's results (checked on resume); built once: OmegaConf takes ~30 ms."""
        return result_config(self.cfg)

    def wall_time_s(self) -> float:
        return self.wall_before_s + time.perf_counter() - self.started_s

    def summary(self) -> dict:
        cfg = self.cfg
        summary = {
            "name": cfg.name, "status": self.status, "seed": cfg.seed, "rounds": cfg.rounds,
            "rounds_completed": self.completed, "population": self.population.name,
            "population_size": self.population.size, "model": self.base.origin,
            "data": {"source": cfg.data.source, "fingerprint": self.dataset.fingerprint(),
                     "users": self.dataset.num_users},
            "num_actors": len(self.pool), "actor_nodes": self.actor_nodes, "sim_time_s": self.sim_time_s,
            "wall_time_s": self.wall_time_s(), "final": self.last,
            "epsilon": self.epsilon, "delta": self.privacy.delta if self.privacy else 0.0,
            "privacy": mechanisms.summary(self.privacy, cfg, noised_dims=self.noised_dims), "totals": self.totals,
            "policy": policy_identity(self.spec), "versions": _versions(),
        }
        if self.base.emulators:  # which blocks each emulator keeps, replaces and compresses
            summary["emulators"] = {name: e.describe() for name, e in self.base.emulators.items()}
        summary |= {"synth": self.base.pretrained_on} if self.base.pretrained_on else {}  # pretrain.sources
        if self.cause is not None:
            summary["cause"] = self.cause
        for callback in self.callbacks:
            summary |= callback.summary(self)
        return summary


def build_run(cfg: ExperimentConfig, *, make_policy: Callable[[PolicyContext], Policy] | None = None,
              callbacks: list[cb.Callback] = (), caches: Caches, resume: bool = False,
              overwrite: bool = False) -> Run:
    """Everything a run needs, in the order that fails cheapest first; the actors are freed on failure."""
    cfg = paths.absolute(cfg)  # what the driver's relative paths mean, wherever this runs
    run_dir = default_run_dir(cfg)
    restored = resumable(run_dir, cfg) if resume else None
    if not resume:
        claim(run_dir, overwrite=overwrite)
    trackers = tracking.callbacks(cfg.tracking, run_dir=run_dir, name=cfg.name)  # a missing package fails here
    population = load_population(cfg.population, size=cfg.population_size)
    check_cohort(cfg, population)
    privacy = mechanisms.assemble(cfg, population_size=population.size)
    spec = read_policy(cfg.policy)
    dataset = build_dataset(cfg, caches=caches)
    base = initial_base_model(cfg.model, seed=cfg.seed)
    check_compatible(cfg, base)
    public, owner_seed = dataset.public_examples(), base_seed(cfg.model, seed=cfg.seed)
    base = pretrained_base(cfg, dataset, base, seed=owner_seed, progress=cfg.progress)
    base = build_emulators(cfg, base, public, seed=owner_seed)  # offsite-tuning: the owner's emulators
    where = cluster.connect(address=cfg.ray.address, include_dashboard=cfg.ray.include_dashboard).description
    processors: list[UpdateProcessor] = []
    if privacy:
        processors.append(privacy.processor(cfg))
    pool = DevicePool(cfg=cfg, base=ray.put(base), dataset=ray.put(dataset), processors=processors, caches=caches)
    try:
        policy = _policy(cfg, spec, pool, make_policy)
        space, initial = Space.build(cfg, base), pool.initial_state()
        support = _support(cfg, space, dataset) if privacy else None
        aggregator = ray.remote(Aggregator).options(num_cpus=0, scheduling_strategy=cluster.on_this_node()).remote(
            state=initial, cfg=cfg.aggregation, seed=cfg.seed, space=space, support=support,
            truncation_rank=truncation_rank(cfg.methods), processors=processors)
        nodes = len(set(pool.nodes()))
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)  # claim() checked it holds a run: none of its files stays
        writer = RunWriter(run_dir, config_yaml=None if resume else to_yaml(cfg),
                           identity=RunIdentity.of(cfg, run_dir=run_dir, policy=spec.name))
        run = Run(cfg=cfg, dir=run_dir, population=population, dataset=dataset, base=base, privacy=privacy,
                  spec=spec, pool=pool, policy=policy, aggregator=aggregator, writer=writer,
                  callbacks=[*_own_callbacks(cfg, privacy, writer), *trackers, *_release(privacy), *callbacks],
                  state_ref=aggregator.get_state.remote(),
                  actor_nodes=nodes, epsilon=0.0 if privacy else math.inf,
                  noised_dims=support.count(initial) if support else 0)
        if restored is not None:
            run.restore(restored)
    except BaseException:
        pool.close()
        raise
    resumed = f" (resumed after round {run.completed})" if restored is not None else ""
    print(f"raysim: {where}, {len(pool)} device actors on {nodes} node{'s' * (nodes > 1)}, population "
          f"{population.name} ({population.size:,} devices), model {base.origin} -> {run_dir}{resumed}",
          file=sys.stderr)
    if privacy:
        print(f"raysim: {privacy.describe(cfg)}", file=sys.stderr)
    return run


def _support(cfg: ExperimentConfig, space: Space, dataset: FederatedDataset) -> Support:
    """What central DP noises: what some config of the method space can change, and nothing else."""
    rows_of = embeddings.server_selection(cfg.methods, dataset.public_examples, vocab_size=space.vocab_size,
                                          seed=cfg.seed)
    return Support(space=space, configs=tuple(method_space(cfg.methods)), pruning=cfg.methods.pruning,
                   embedding_rows=rows_of)


def _own_callbacks(cfg: ExperimentConfig, privacy: mechanisms.Privacy | None, writer: RunWriter) -> list[cb.Callback]:
    """raysim's own callbacks, in the order they run (experiment trackers, the release check and a user's come
    after them)."""
    last_round = privacy.rounds if privacy else cfg.rounds
    return [cb.Evaluation(every=cfg.eval.every, last_round=last_round),
            cb.TargetAccuracy(target=cfg.eval.target_accuracy, stop=cfg.eval.stop_at_target),
            cb.PrivacyBudget(last_round=last_round, rounds=cfg.rounds, max_epsilon=cfg.privacy.max_epsilon),
            cb.Files(writer), cb.PolicyFeedback(), cb.Checkpoints(every=cfg.checkpoint.every),
            cb.Progress(rounds=cfg.rounds, enabled=cfg.progress, private=privacy is not None)]


def _release(privacy: mechanisms.Privacy | None) -> list[cb.Callback]:
    """Under a central mechanism, the check that nothing un-noised left the server (it fails the run)."""
    return [cb.ReleaseCheck()] if privacy else []


def check_cohort(cfg: ExperimentConfig, population: Population) -> None:
    if cfg.cohort.size > population.size:
        raise ConfigError(f"{cfg.cohort.size} is above the population's {population.size} devices",
                          field="cohort.size")


def _policy(cfg: ExperimentConfig, spec: PolicySpec, pool: DevicePool,
            make_policy: Callable[[PolicyContext], Policy] | None) -> Policy:
    oracle = CostOracle(measure=pool.measure, local_steps=cfg.train.local_steps, deadline_s=cfg.cohort.deadline_s,
                        server_flops_per_s=cfg.server.train_gflops * 1e9)
    context = PolicyContext(methods=cfg.methods, space=method_space(cfg.methods), oracle=oracle, seed=cfg.seed,
                            rounds=cfg.rounds)
    policy = make_policy(context) if make_policy else build_policy(spec, context=context)
    if policy.wants_utility and mixing_sets(cfg) > 1:
        raise ConfigError(f"policy {spec.name} learns from each update's utility on one adapter set; "
                          "split.mechanism p3eft mixes several", field="policy")
    return policy


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"raysim": raysim.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
