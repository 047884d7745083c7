"""One experiment: the round loop, top to bottom.

Per round: sample a cohort at virtual time t, let the policy assign configs,
price every device with the cost model, settle who arrives in time, train
those devices for real on the actor pool, aggregate their partial sums on the
aggregator actor, evaluate every ``eval.every`` rounds, write the records,
advance the virtual clock. Under central DP the privacy plan is fixed before
anything trains, the accountant is stepped with (z, q) once per round, and
the run stops cleanly at the last round within ``privacy.max_epsilon``.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from tqdm import tqdm

import raysim
from raysim import cluster, paths, rng
from raysim.aggregator import Aggregator
from raysim.clock import DROPPED, OK, OOM, STRAGGLER, UNAVAILABLE, settle_round
from raysim.cohort import sample_cohort
from raysim.config import ExperimentConfig, to_yaml
from raysim.costmodel import device_costs
from raysim.data import build_dataset
from raysim.errors import ConfigError
from raysim.methods import method_space
from raysim.methods.submodel import Space
from raysim.models import BaseModel, base_seed, initial_base_model
from raysim.policies import CostOracle, Policy, PolicyContext, build_policy, policy_identity, read_policy
from raysim.pool import DevicePool
from raysim.pretrain import pretrain
from raysim.privacy import local
from raysim.privacy.central import AdaptiveClipNorm, CentralDP
from raysim.privacy.plan import CentralPlan, plan_central
from raysim.profiles import load_population
from raysim.results import RunWriter
from raysim.types import RoundState


EVAL_COLUMNS = ("eval_loss", "eval_perplexity", "eval_accuracy", "eval_top3_accuracy")


def check_compatible(cfg: ExperimentConfig, base: BaseModel) -> None:
    if cfg.data.seq_len > base.n_positions:
        raise ConfigError(f"longer than the model's {base.n_positions} positions", field="data.seq_len")


def default_run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).absolute()
    return Path("runs").absolute() / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_experiment(cfg: ExperimentConfig, *, make_policy: Callable[[PolicyContext], Policy] | None = None) -> Path:
    """Run ``cfg`` to completion; return the run directory.

    ``make_policy`` builds the policy in place of ``cfg.policy`` (``raysim
    train-policy`` carries one learned policy across runs).
    """
    cfg = paths.absolute(cfg)  # what the driver's relative paths mean, wherever this runs
    population = load_population(cfg.population, size=cfg.population_size)
    privacy = plan_central(cfg.privacy, rounds=cfg.rounds, cohort_size=cfg.cohort.size,
                           population_size=population.size)
    last_round = privacy.rounds if privacy else cfg.rounds
    spec = read_policy(cfg.policy)
    dataset = build_dataset(cfg)
    base = initial_base_model(cfg.model, seed=cfg.seed)
    check_compatible(cfg, base)
    base = pretrain(base, dataset.public_examples(), cfg.pretrain, seed=base_seed(cfg.model, seed=cfg.seed),
                    progress=cfg.progress)
    where = cluster.connect(address=cfg.ray.address, include_dashboard=cfg.ray.include_dashboard)
    processors = [CentralDP(plan=privacy, adaptive=_adaptive_clip(cfg, privacy))] if privacy else []
    pool = DevicePool(cfg=cfg, base=ray.put(base), dataset=ray.put(dataset), processors=processors)
    actor_nodes = len(set(pool.nodes()))
    oracle = CostOracle(measure=pool.measure, local_steps=cfg.train.local_steps, deadline_s=cfg.cohort.deadline_s)
    context = PolicyContext(methods=cfg.methods, space=method_space(cfg.methods), oracle=oracle, seed=cfg.seed,
                            rounds=cfg.rounds)
    try:
        policy = make_policy(context) if make_policy else build_policy(spec, context=context)
    except BaseException:
        pool.close()
        raise
    ranks = [r for r in cfg.methods.lora_rank if r > 0]
    aggregator = ray.remote(Aggregator).options(num_cpus=0, scheduling_strategy=cluster.on_this_node()).remote(
        state=pool.initial_state(), cfg=cfg.aggregation, seed=cfg.seed, space=Space.build(cfg, base),
        truncation_rank=min(ranks, default=0), processors=processors,
    )
    state_ref = aggregator.get_state.remote()
    run_dir = default_run_dir(cfg)
    writer = RunWriter(run_dir, config_yaml=to_yaml(cfg))
    print(f"raysim: {where}, {len(pool)} device actors on {actor_nodes} node{'s' * (actor_nodes > 1)}, population {population.name} "
          f"({population.size:,} devices), model {base.origin} -> {run_dir}", file=sys.stderr)
    if privacy:
        print(f"raysim: {_describe(privacy, cfg)}", file=sys.stderr)
    epsilon, delta = (0.0, privacy.delta) if privacy else (math.inf, 0.0)
    params = ray.get(aggregator.round_params.remote())

    initial = pool.evaluate(state_ref) if cfg.eval.every > 0 else {}
    sim_time = 0.0
    totals = {"bytes_up": 0, "bytes_down": 0, "devices_trained": 0}
    last: dict = {}
    time_to_target = None
    completed = 0
    start = time.perf_counter()
    progress = tqdm(total=cfg.rounds, disable=not cfg.progress, file=sys.stderr, unit="round", dynamic_ncols=True)
    status = "interrupted"
    try:
        for rnd in range(1, cfg.rounds + 1):
            if rnd > last_round:
                status = "privacy_budget_spent"
                print(f"raysim: stopped after round {last_round}: one more round would spend more than "
                      f"privacy.max_epsilon={cfg.privacy.max_epsilon:g} (ε = {epsilon:.4g} at δ = {delta:g})",
                      file=sys.stderr)
                break
            t0 = time.perf_counter()
            cohort = sample_cohort(population, cfg.cohort, seed=cfg.seed, round=rnd, sim_time_s=sim_time)
            draws = population.draw(cohort.device_id, seed=cfg.seed)
            state = RoundState(round=rnd, sim_time_s=sim_time, last_train_loss=last.get("train_loss"),
                               last_eval_loss=last.get("eval_loss", initial.get("eval_loss")), epsilon=epsilon,
                               target=cohort.target)
            configs = policy.assign(draws, state)
            costs = device_costs(draws, [pool.measure(c) for c in configs], local_steps=cfg.train.local_steps)
            dropped = rng.uniform(cfg.seed, "dropout", rnd, ids=cohort.device_id) < draws.dropout_prob
            outcome = settle_round(finish_s=costs.total_s, available=cohort.available, fits=costs.fits(draws),
                                   dropped=dropped, target=cohort.target, deadline_s=cfg.cohort.deadline_s)

            trained = np.flatnonzero(outcome.status == OK)
            records, partials = pool.train(
                state_ref, round=rnd, device_ids=cohort.device_id[trained],
                configs=[configs[i] for i in trained], flops=costs.flops[trained], params=params,
                utility=getattr(policy, "wants_utility", False),
            )
            state_ref, stats_ref = aggregator.aggregate.options(num_returns=2).remote(rnd, partials)
            evaluate = cfg.eval.every > 0 and (rnd % cfg.eval.every == 0 or rnd == last_round)
            metrics = pool.evaluate(state_ref) if evaluate else dict.fromkeys(EVAL_COLUMNS, math.nan)
            stats = ray.get(stats_ref)
            sim_time += outcome.duration_s
            params = stats["round_params"]
            epsilon = stats.get("epsilon", epsilon)

            devices = _device_columns(rnd, draws, configs, costs, outcome.status, trained, records, cfg)
            n = {s: int((outcome.status == s).sum()) for s in (OK, OOM, DROPPED, STRAGGLER, UNAVAILABLE)}
            examples = records["num_examples"]
            row = {
                "round": rnd,
                "sim_time_s": sim_time,
                "round_duration_s": outcome.duration_s,
                "wall_time_s": time.perf_counter() - t0,
                "train_loss": float(np.average(records["train_loss"], weights=examples)) if len(examples) else math.nan,
                **metrics,
                "epsilon": epsilon,  # inf, delta 0: no central DP in this run
                "delta": delta,
                "bytes_up": int(devices["bytes_up"].sum()),
                "bytes_down": int(devices["bytes_down"].sum()),
                "n_selected": len(cohort.device_id),
                "n_completed": n[OK],
                "n_dropped": n[DROPPED],
                "n_oom": n[OOM],
                "n_stragglers": n[STRAGGLER],
                "n_unavailable": n[UNAVAILABLE],
                "update_norm": stats["update_norm"],
                "clip_norm": stats.get("clip_norm", math.nan),
                "noise_std": stats.get("noise_std", 0.0),
                "signal_to_noise": stats.get("signal_to_noise", math.inf),
                "mean_device_flops": float(costs.flops[devices["compute_s"] > 0].mean()) if n[OK] else math.nan,
                "mean_peak_memory_bytes": float(costs.peak_memory_bytes.mean()),
                "lora_truncation_error": stats["lora_truncation_error"],
            }
            writer.write_round(row, devices)
            policy.observe({"round": row, "devices": devices})
            totals["bytes_up"] += row["bytes_up"]
            totals["bytes_down"] += row["bytes_down"]
            totals["devices_trained"] += n[OK]
            last |= {k: row[k] for k in ("train_loss", *EVAL_COLUMNS) if not math.isnan(row[k])}
            target = cfg.eval.target_accuracy
            if time_to_target is None and target is not None and metrics["eval_accuracy"] >= target:
                time_to_target = sim_time
            progress.set_postfix_str(
                f"sim {sim_time / 3600:.2f}h loss {row['train_loss']:.3f} "
                f"eval {last.get('eval_loss', math.nan):.3f} ok {n[OK]}/{row['n_selected']}"
                + (f" ε {epsilon:.3g}" if privacy else ""), refresh=False)
            progress.update()
            completed = rnd
            if time_to_target is not None and cfg.eval.stop_at_target:
                status = "target_reached"
                print(f"raysim: stopped after round {rnd}: eval accuracy {metrics['eval_accuracy']:.4f} reached "
                      f"eval.target_accuracy={target:g} at {sim_time:.1f} virtual s", file=sys.stderr)
                break
        else:
            status = "finished"
    finally:
        progress.close()
        summary = {
            "name": cfg.name,
            "status": status,
            "seed": cfg.seed,
            "rounds": cfg.rounds,
            "rounds_completed": completed,
            "population": population.name,
            "population_size": population.size,
            "model": base.origin,
            "data": {"source": cfg.data.source, "fingerprint": dataset.fingerprint(), "users": dataset.num_users},
            "num_actors": len(pool),
            "actor_nodes": actor_nodes,
            "sim_time_s": sim_time,
            "wall_time_s": time.perf_counter() - start,
            "initial": initial,
            "final": last,
            "time_to_target_s": time_to_target,
            "target_accuracy": cfg.eval.target_accuracy,
            "epsilon": epsilon,
            "delta": delta,
            "privacy": _privacy_summary(privacy, cfg),
            "totals": totals,
            "policy": policy_identity(spec),
            "versions": _versions(),
        }
        writer.close(summary)  # rounds written so far stay readable, whatever stopped the run
        pool.close()  # frees the actors' CPUs for the next run in this process (raysim compare)
        if status == "interrupted":  # a clean stop (finished, privacy budget spent) saves the state below
            ray.kill(aggregator)
    torch.save(ray.get(aggregator.get_state.remote()), run_dir / "final_state.pt")  # the driver writes every file
    ray.kill(aggregator)
    return run_dir


def _adaptive_clip(cfg: ExperimentConfig, privacy: CentralPlan | None) -> AdaptiveClipNorm | None:
    a = cfg.privacy.adaptive_clipping
    if privacy is None or not a.enabled:
        return None
    return AdaptiveClipNorm(clip_norm=privacy.clip_norm, target_quantile=a.target_quantile,
                            learning_rate=a.learning_rate, count_std=privacy.count_std)


def _describe(plan: CentralPlan, cfg: ExperimentConfig) -> str:
    text = (f"DP-FedAvg: noise multiplier {plan.noise_multiplier:.4g}, clip norm {plan.clip_norm:g}"
            f"{' (adaptive)' if plan.count_std else ''}, Poisson q = {plan.sample_rate:.4g}; "
            f"ε = {plan.epsilon:.4g} at δ = {plan.delta:g} after {plan.rounds} rounds ({plan.accountant})")
    if plan.rounds < cfg.rounds:
        text += f"; privacy.max_epsilon={cfg.privacy.max_epsilon:g} allows {plan.rounds} of {cfg.rounds} rounds"
    return text


def _privacy_summary(plan: CentralPlan | None, cfg: ExperimentConfig) -> dict:
    summary = {"local_dp": cfg.privacy.local.enabled}
    if plan is None:
        return {"central_dp": False, **summary}
    return {"central_dp": True, **summary, "noise_multiplier": plan.noise_multiplier,
            "update_noise_multiplier": plan.update_noise_multiplier, "clip_norm": plan.clip_norm,
            "sample_rate": plan.sample_rate, "expected_devices": plan.expected_devices,
            "accountant": plan.accountant, "max_epsilon": cfg.privacy.max_epsilon,
            "target_epsilon": cfg.privacy.target_epsilon, "rounds_within_budget": plan.rounds}


def _device_columns(rnd, draws, configs, costs, status, trained, records, cfg) -> dict[str, np.ndarray]:
    """One row per selected device; traffic and compute only where they happened.

    Available devices download the state; OOM devices stop before computing;
    only aggregated devices' uploads are accepted (the round is closed to
    stragglers; dropped devices never finish).
    """
    n = len(status)
    reached = status != UNAVAILABLE
    computed = reached & (status != OOM)
    ok = status == OK
    loss = np.full(n, math.nan)
    loss[trained] = records["train_loss"]
    examples = np.zeros(n, dtype=np.int64)
    examples[trained] = records["num_examples"]
    norm = np.full(n, math.nan)
    norm[trained] = records["update_norm"]
    utility = np.full(n, math.nan)
    utility[trained] = records["utility"]
    local_eps = np.full(n, math.nan)
    if cfg.privacy.local.enabled:
        local_eps[trained] = [local.device_epsilon(num_examples=int(k), cfg=cfg.privacy.local, train=cfg.train)
                              for k in records["num_examples"]]
    return {
        "round": np.full(n, rnd, dtype=np.int32),
        "device_id": draws.device_id,
        "device_class": draws.device_class.astype(str),
        "lora_rank": np.array([c.lora_rank for c in configs], dtype=np.int32),
        "prune_ratio": np.array([c.prune_ratio for c in configs], dtype=np.float32),
        "dropout_rate": np.array([c.dropout_rate for c in configs], dtype=np.float32),
        "trainable_layers": np.array([-1 if c.trainable_layers is None else c.trainable_layers for c in configs],
                                     dtype=np.int32),
        "partial_embeddings": np.array([c.partial_embeddings for c in configs], dtype=bool),
        "bits": np.array([c.bits for c in configs], dtype=np.int32),
        "status": status.astype(str),
        "flops": np.where(computed, costs.flops, 0.0),
        "compute_s": np.where(computed, costs.compute_s, 0.0),
        "download_s": np.where(reached, costs.download_s, 0.0),
        "upload_s": np.where(ok, costs.upload_s, 0.0),
        "finish_s": np.where(computed, costs.total_s, math.nan),
        "bytes_up": np.where(ok, costs.bytes_up, 0),
        "bytes_down": np.where(reached, costs.bytes_down, 0),
        "peak_memory_bytes": costs.peak_memory_bytes,
        "memory_bytes": draws.memory_bytes.astype(np.int64),
        "num_examples": examples.astype(np.int32),
        "train_loss": loss,
        "update_norm": norm,
        "utility": utility,
        "local_epsilon": local_eps,
    }


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"raysim": raysim.__version__, "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
