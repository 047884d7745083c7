"""Work on actors that can be lost: every item is done once, on whichever actor is alive.

A call that fails because its actor died, its node went away or its result was
lost with the node is sent again, to another live actor, or to the same one
once Ray has restarted it; an item is tried at most ``1 + max_retries``
times. An actor whose call failed is set aside until it answers again (a
restarted actor does; one whose node is gone may never). Items are the
cohort's units of work, so where one is computed changes none of its bits.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Sequence

import ray
from ray import exceptions as rex

from raysim.errors import describe_error

# What a lost actor or node looks like to a caller; anything else is the work's own error and is raised.
LOST = (rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError, rex.WorkerCrashedError)


class WorkLost(RuntimeError):
    """Work that no actor could finish: too many failures, or no actor left."""


def dispatch(actors: Sequence, items: Sequence, call: Callable[[object, object], tuple[ray.ObjectRef, ...]], *,
             in_flight: int, max_retries: int, wait_s: float, what: str) -> list[tuple[object, tuple]]:
    """``call(actor, item)`` for every item; per item, in order: the value of its first ref and its other refs.

    The other refs (a unit's partial sum) are copied to this node's object store before an item counts as
    done, so losing the node that made them loses nothing. ``wait_s`` bounds the wait for a set-aside actor
    when no other is left.
    """
    live, resting = list(range(len(actors))), {}  # resting: ping ref -> actor index
    load = [0] * len(actors)
    queue, pending = deque(range(len(items))), {}  # pending: first ref -> (item, actor, refs)
    tries, results = [0] * len(items), [None] * len(items)

    def fill() -> None:
        for a in list(live):
            while load[a] < in_flight and queue:
                i = queue.popleft()
                refs = call(actors[a], items[i])
                pending[refs[0]] = (i, a, refs)
                load[a] += 1

    fill()
    while pending or queue:
        if not pending and not resting:
            raise WorkLost(f"{what}: no device actor is left (every one was lost)")
        ready, _ = ray.wait([*pending, *resting], num_returns=1, timeout=None if pending else wait_s)
        if not ready:
            raise WorkLost(f"{what}: no device actor came back within {wait_s:g} s (ray.placement_timeout_s)")
        ref = ready[0]
        if ref in resting:
            a = resting.pop(ref)
            try:
                ray.get(ref)
                live.append(a)  # restarted: it takes work again
            except LOST:
                pass  # gone for good
        else:
            i, a, refs = pending.pop(ref)
            load[a] -= 1
            try:
                value = ray.get(ref)
                if len(refs) > 1:
                    ray.wait(list(refs[1:]), num_returns=len(refs) - 1, fetch_local=True)
                results[i] = (value, refs[1:])
            except LOST as err:
                tries[i] += 1
                if tries[i] > max_retries:
                    raise WorkLost(f"{what}: item {i} was lost {tries[i]} times (ray.max_retries={max_retries}); "
                                   f"last: {describe_error(err)}") from None
                queue.appendleft(i)
                print(f"raysim: {what}: a device actor was lost ({describe_error(err)}); its work is sent again "
                      f"(try {tries[i] + 1} of {max_retries + 1})", file=sys.stderr)
                if a in live:
                    live.remove(a)
                    resting[actors[a].node_id.remote()] = a
        fill()
    return results
