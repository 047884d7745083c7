"""Work on actors that can be lost: every item is done once, on whichever actor is alive.

A call that fails because its actor died, its node went away or its result was
lost with the node is sent again, to another live actor; an item is tried at
most ``1 + max_retries`` times. The lost actor is replaced by a new one (at
most ``max_retries`` times per slot), which takes work once it answers: at
once where its placement group bundle still has room, or once Ray has placed
the bundle on a live node. :class:`Actors` remembers across calls which
actors answer, so a replacement that cannot be placed is never given work.
Items are the cohort's units of work, so where one is computed changes none
of its bits.

The pool replaces actors itself rather than through Ray's ``max_restarts``:
a restarted actor reruns its constructor from refs that Ray does not keep
for it (ray-project/ray#53727, which Ray warns of on every such actor).
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


class Actors:
    """A pool's actor slots: the current actor of each, which slots take work, and replacements for lost ones.

    ``spawn(i)`` makes the actor of slot ``i``; ``wait_s`` bounds the wait for a replacement to answer when
    no other actor is left.
    """

    def __init__(self, spawn: Callable[[int], object], n: int, *, max_retries: int, wait_s: float):
        self.spawn, self.max_retries, self.wait_s = spawn, max_retries, wait_s
        self.handles = [spawn(i) for i in range(n)]
        self.live = list(range(n))  # slots whose actor takes work
        self.resting: dict[ray.ObjectRef, int] = {}  # the ping of a replacement not yet answered -> its slot
        self.spawned = [0] * n  # replacements made per slot

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self):
        return iter(self.handles)

    def __getitem__(self, slot: int):
        return self.handles[slot]

    def lost(self, slot: int) -> None:
        """Slot ``slot``'s actor was lost: it takes no more work; a replacement rests until it answers."""
        if slot in self.live:
            self.live.remove(slot)
        ray.kill(self.handles[slot])  # what is left of it, if anything
        if self.spawned[slot] < self.max_retries:
            self.spawned[slot] += 1
            self.handles[slot] = self.spawn(slot)
            self.resting[self.handles[slot].node_id.remote()] = slot

    def answered(self, ping: ray.ObjectRef) -> None:
        """A resting replacement's ping came back: it takes work, or, if it too was lost, is replaced."""
        slot = self.resting.pop(ping)
        try:
            ray.get(ping)
            self.live.append(slot)
        except LOST:
            self.lost(slot)

    def wake(self) -> None:
        """Let every replacement that has answered since the last call take work (without waiting)."""
        if self.resting:
            ready, _ = ray.wait(list(self.resting), num_returns=len(self.resting), timeout=0)
            for ping in ready:
                self.answered(ping)


def dispatch(actors: Actors, items: Sequence, call: Callable[[object, object], tuple[ray.ObjectRef, ...]], *,
             in_flight: int, what: str) -> list[tuple[object, tuple]]:
    """``call(actor, item)`` for every item; per item, in order: the value of its first ref and its other refs.

    The other refs (a unit's partial sum) are copied to this node's object store before an item counts as
    done, so losing the node that made them loses nothing.
    """
    actors.wake()
    load = [0] * len(actors)
    queue, pending = deque(range(len(items))), {}  # pending: first ref -> (item, slot, actor, refs)
    tries, results = [0] * len(items), [None] * len(items)

    def fill() -> None:
        for a in list(actors.live):
            while load[a] < in_flight and queue:
                i = queue.popleft()
                refs = call(actors[a], items[i])
                pending[refs[0]] = (i, a, actors[a], refs)
                load[a] += 1

    fill()
    while pending or queue:
        if not pending and not actors.resting:
            raise WorkLost(f"{what}: no device actor is left (every one was lost)")
        ready, _ = ray.wait([*pending, *actors.resting], num_returns=1, timeout=None if pending else actors.wait_s)
        if not ready:
            raise WorkLost(f"{what}: no device actor came back within {actors.wait_s:g} s (ray.placement_timeout_s)")
        ref = ready[0]
        if ref in actors.resting:
            actors.answered(ref)
        else:
            i, a, actor, refs = pending.pop(ref)
            load[a] -= 1
            try:
                value = ray.get(ref)
                if len(refs) > 1:
                    ray.wait(list(refs[1:]), num_returns=len(refs) - 1, fetch_local=True)
                results[i] = (value, refs[1:])
            except LOST as err:
                if getattr(err, "_actor_init_failed", False):  # its constructor raised: every replacement would too
                    raise WorkLost(f"{what}: a device actor failed to start: {_creation_error(err)}") from None
                tries[i] += 1
                if tries[i] > actors.max_retries:
                    raise WorkLost(f"{what}: item {i} was lost {tries[i]} times (ray.max_retries="
                                   f"{actors.max_retries}); last: {describe_error(err)}") from None
                queue.appendleft(i)
                print(f"raysim: {what}: a device actor was lost ({describe_error(err)}); its work is sent again "
                      f"(try {tries[i] + 1} of {actors.max_retries + 1})", file=sys.stderr)
                if actors[a] is actor:  # not replaced yet (by another item's failure on it)
                    actors.lost(a)
        fill()
    return results


def _creation_error(err: BaseException) -> str:
    """The exception an actor's constructor raised, in one line (the last of Ray's remote traceback)."""
    lines = [line.strip() for line in str(getattr(err, "error_msg", err)).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
