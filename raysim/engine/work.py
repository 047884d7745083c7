"""How a round's training is cut into units of work: from the cohort alone.

Two choices change a run's numbers at the rounding level. Which devices share
a grouped pass changes float32 rounding (a batched matmul over k devices is
not the kernel a single device's matmul runs), and the order in which float64
partial sums are added changes float64 rounding. Both are fixed here from the
cohort alone: its device ids, their configs, their predicted FLOPs, and the
experiment's ``ray.tokens_per_pass`` and ``ray.work_units``; never from the
number of actors or nodes, nor from which actor happens to be free first.

- A :class:`Group` is devices of one config, in device-id order, that train
  together in one pass (at most the config's pass limit; a config's devices
  are split into near-equal groups).
- A :class:`WorkUnit` is a few groups that one actor trains into one partial
  sum, in group order. Groups are packed into at most ``max_units`` units of
  near-equal FLOPs (longest first), so that any number of actors is kept busy.

Any actor may compute any unit; the aggregator adds the units' partial sums
in unit order. A run with 1, 2 or 3 actors, or on several nodes, therefore
gives byte-identical results (for the same CPU type and threads per actor).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from raysim.methods.base import config_key
from raysim.types import DeviceConfig


@dataclass(frozen=True)
class Group:
    """Devices of one config that train together in one pass, in device-id order."""

    config: DeviceConfig
    device_ids: tuple[int, ...]


@dataclass(frozen=True)
class WorkUnit:
    """Groups one actor trains into one partial sum, in this order; ``index`` is its place in the sum."""

    index: int
    groups: tuple[Group, ...]

    @property
    def device_ids(self) -> list[int]:
        return [d for g in self.groups for d in g.device_ids]


def split_evenly(ids: Sequence[int], *, limit: int) -> list[tuple[int, ...]]:
    """``ids`` cut into the fewest contiguous runs of at most ``limit``, sizes differing by at most one."""
    n = len(ids)
    parts = -(-n // limit)
    size, extra = divmod(n, parts)
    runs, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        runs.append(tuple(ids[start:end]))
        start = end
    return runs


def make_groups(device_ids: Sequence[int], configs: Sequence[DeviceConfig], *,
                pass_limit: Callable[[DeviceConfig], int]) -> list[Group]:
    """The round's passes: each config's devices in id order, split evenly under the config's pass limit."""
    by_config: dict[DeviceConfig, list[int]] = {}
    for device_id, config in zip(device_ids, configs):
        by_config.setdefault(config, []).append(int(device_id))
    groups = []
    for config in sorted(by_config, key=config_key):
        ids = sorted(by_config[config])
        groups += [Group(config=config, device_ids=run) for run in split_evenly(ids, limit=max(1, pass_limit(config)))]
    return groups


def pack(groups: Sequence[Group], costs: Sequence[float], *, max_units: int) -> list[WorkUnit]:
    """Groups packed into at most ``max_units`` units of near-equal cost (longest first, ties by index)."""
    n = min(max_units, len(groups))
    if n == 0:
        return []
    heap = [(0.0, u) for u in range(n)]
    members: list[list[int]] = [[] for _ in range(n)]
    for g in np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable"):
        load, u = heapq.heappop(heap)
        members[u].append(int(g))
        heapq.heappush(heap, (load + float(costs[g]), u))
    return [WorkUnit(index=u, groups=tuple(groups[g] for g in sorted(m))) for u, m in enumerate(members)]


def plan(device_ids: Sequence[int], configs: Sequence[DeviceConfig], flops: Sequence[float], *,
         pass_limit: Callable[[DeviceConfig], int], max_units: int) -> list[WorkUnit]:
    """The round's units of work for the devices to train (``flops``: each device's predicted training FLOPs)."""
    groups = make_groups(device_ids, configs, pass_limit=pass_limit)
    cost_of = {int(d): float(f) for d, f in zip(device_ids, flops)}
    return pack(groups, [sum(cost_of[d] for d in g.device_ids) for g in groups], max_units=max_units)
