"""Where a W2 round's time goes: the driver's phases, then one actor's share of a round, op by op.

Driver: a W2 run (2 actors, 6 rounds) with every phase of ``run_round`` and the round's callbacks timed; prints
the median ms per round of each (rounds 2 on) and what the phases leave of the round (Ray and waiting). Ray: the
same rounds from Ray's timeline, the actors' side (training, Ray's per-unit work, waiting for the slower actor
and for the driver). Actor:
a DeviceWorker in this process trains one actor's share of a W2 cohort (250 devices, as the pool cuts it)
under ``torch.profiler``; prints its wall time, the ops that take the most of it, and the share of the
language-model head (the vocab x width matmuls, log-softmax and its gradient).

    python bench/breakdown.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict

from common import W2


def driver_phases(rounds: int = 6) -> None:
    import raysim.emulation.profiles as profiles
    import raysim.engine.callbacks as callbacks
    import raysim.engine.run as run_module
    from raysim.config import load_experiment
    from raysim.policies import static

    spent: dict[str, list[float]] = defaultdict(list)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name].append(time.perf_counter() - start)
        return wrapper

    for name in ("sample_cohort", "device_costs", "settle_round", "device_columns", "round_row"):
        setattr(run_module, name, timed(name, getattr(run_module, name)))
    run_module.run_round = timed("round (all of run_round)", run_module.run_round)
    profiles.Population.draw = timed("profile draws", profiles.Population.draw)
    for policy in vars(static).values():
        if isinstance(policy, type) and "assign" in vars(policy):
            policy.assign = timed("policy", policy.assign)
    pool_train = run_module.DevicePool.train
    run_module.DevicePool.train = timed("actors: train units (wait)", pool_train)
    for cls in (callbacks.Files, callbacks.Checkpoints, callbacks.PolicyFeedback, callbacks.Progress):
        for hook in ("after_round", "after_record"):
            if hook in vars(cls):
                setattr(cls, hook, timed(f"callback {cls.__name__}.{hook}", vars(cls)[hook]))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_experiment(None, [*W2.overrides(num_actors=None), f"output_dir={tmp}/run", f"rounds={rounds}"])
        run_module.run_experiment(cfg)
    import ray

    events = ray.timeline()  # Ray's own task events: the actors' side of the same rounds
    print(f"driver, W2 (cohort {W2.cohort}, 2 actors), median ms per round over rounds 2-{rounds}:")
    median = {name: statistics.median(times[1:]) * 1e3 for name, times in spent.items()}
    for name, ms in median.items():
        print(f"  {name:<38} {ms:9.1f}")
    inside = sum(ms for name, ms in median.items() if not name.startswith(("round", "callback")))
    rest = median["round (all of run_round)"] - inside
    print(f"  {'rest: the server step, Ray':<38} {rest:9.1f}")
    ray_phases(events)


def ray_phases(events: list[dict]) -> None:
    """From Ray's timeline (microseconds): per round, how the actors' time splits between training and the rest.

    A round's units run between the aggregate of the round before and its own, so rounds 2 on are timed.
    """
    spans = [e for e in events if e.get("ph") == "X"]
    aggregates = sorted(e["ts"] for e in spans if e["name"] == "aggregate")
    ms: dict[str, list[float]] = defaultdict(list)
    for start, end in zip(aggregates, aggregates[1:]):
        trains = [e for e in spans if e["name"] == "train" and start <= e["ts"] < end]
        if not trains:
            continue
        actors = {e["tid"] for e in trains}
        ray_side = [e for e in spans if e["tid"] in actors and start <= e["ts"] < end
                    and e["name"] in ("task:deserialize_arguments", "task:store_outputs")]
        ends = [max(e["ts"] + e["dur"] for e in trains if e["tid"] == a) for a in actors]
        ms["round, aggregate to aggregate"].append((end - start) / 1e3)
        ms["until the first unit starts"].append((min(e["ts"] for e in trains) - start) / 1e3)
        ms["units trained, per actor"].append(sum(e["dur"] for e in trains) / len(actors) / 1e3)
        ms["Ray per unit: arguments in, results out"].append(sum(e["dur"] for e in ray_side) / len(trains) / 1e3)
        ms["first actor done to last actor done"].append((max(ends) - min(ends)) / 1e3)
        ms["last unit done to the aggregate"].append((end - max(ends)) / 1e3)
        ms["units per actor (count)"].append(len(trains) / len(actors))
    if not ms:
        print("actors: Ray's timeline holds no task events")
        return
    print(f"actors, from Ray's timeline, medians over rounds 2-{len(aggregates)} (ms):")
    for name, values in ms.items():
        print(f"  {name:<42} {statistics.median(values):9.1f}")


def actor_ops() -> None:
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from raysim.config import load_experiment
    from raysim.data.build import build_dataset
    from raysim.engine import work
    from raysim.engine.device import DeviceWorker
    from raysim.methods.space import default_config
    from raysim.models.build import initial_base_model

    cfg = load_experiment(None, W2.overrides(num_actors=None))
    worker = DeviceWorker(cfg=cfg, base=initial_base_model(cfg.model, seed=0), dataset=build_dataset(cfg),
                          num_threads=1)
    state, config, share = worker.initial_state(), default_config(cfg.methods), W2.cohort // 2
    ids = np.sort(np.random.default_rng(1).choice(W2.population, share, replace=False))
    units = work.plan(ids, [config] * share, np.ones(share), pass_limit=worker.pass_limit,
                      max_units=cfg.ray.work_units // 2)
    for rnd in (1, 2):  # warm-up (submodels built, allocator warm), then round 2 timed without the profiler
        worker.begin_round(state, rnd)
        start = time.perf_counter()
        for unit in units:
            worker.train(unit)
        plain_wall = time.perf_counter() - start
    worker.begin_round(state, 3)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for unit in units:
            worker.train(unit)
    wall = time.perf_counter() - start
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    vocab = str(cfg.model.vocab_size)
    head = sum(e.self_cpu_time_total for e in events
               if vocab in str(e.input_shapes) and e.key in ("aten::mm", "aten::_log_softmax",
                                                             "aten::_log_softmax_backward_data", "aten::fill_",
                                                             "aten::nll_loss_forward", "aten::nll_loss_backward"))
    print(f"actor, one actor's share of a W2 round ({share} devices, {len(units)} passes of "
          f"{len(units[0].groups[0].device_ids)}): {plain_wall * 1e3:.0f} ms wall ({wall * 1e3:.0f} ms under the "
          f"profiler, {total / 1e3:.0f} ms of it in ops)")
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        by_op[e.key] += e.self_cpu_time_total
    for key, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {key:<38} {us / 1e3:9.1f} ms  {us / total:6.1%}")
    print(f"  language-model head (vocab {vocab} matmuls, log-softmax, its gradient): {head / 1e3:.0f} ms, "
          f"{head / total:.1%} of the ops")


if __name__ == "__main__":
    if "--actor-only" not in sys.argv:
        driver_phases()
    actor_ops()
