"""raysim.engine.dispatch on real Ray actors: lost actors' work is sent again, and replacements take work
once they answer."""

from __future__ import annotations

import concurrent.futures
import os
import time

import pytest
import ray

from raysim.engine.dispatch import Actors, WorkLost, dispatch


def squarer_class():
    class Squarer:  # defined here so that Ray ships it by value (tests/ is not importable on workers)
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

        def square(self, x: int) -> tuple[int, int]:
            return x * x, os.getpid()

        def die(self) -> None:
            os._exit(1)

    return ray.remote(num_cpus=0)(Squarer)


def make_actors(n: int, *, placeable_replacements: bool, max_retries: int = 2, wait_s: float = 5.0) -> Actors:
    cls = squarer_class()
    made = []

    def spawn(slot: int):
        # a replacement that asks for a resource no node has is never placed: its node is "gone"
        options = {} if placeable_replacements or len(made) < n else {"resources": {"nowhere": 1}}
        made.append(slot)
        return cls.options(**options).remote()

    return Actors(spawn, n, max_retries=max_retries, wait_s=wait_s)


def square_all(actors: Actors, items: list[int], *, kill_at: int | None = None) -> list[int]:
    killed = []

    def call(actor, x):
        if x == kill_at and not killed:  # the actor that first gets this item dies before doing it
            actor.die.remote()
            killed.append(x)
        return (actor.square.remote(x),)

    return [value[0] for value, _ in dispatch(actors, items, call, in_flight=1, what="test")]


def test_work_of_a_killed_actor_is_done_by_a_survivor_and_its_slot_is_replaced(ray_session, capsys):
    actors = make_actors(2, placeable_replacements=True)
    first = actors[0]
    assert square_all(actors, list(range(8)), kill_at=0) == [x * x for x in range(8)]
    assert "test: a device actor was lost" in capsys.readouterr().err
    assert actors[0] is not first and actors.spawned == [1, 0]
    deadline = time.monotonic() + 60
    while sorted(actors.live) != [0, 1] and time.monotonic() < deadline:  # placeable: it answers, takes work
        time.sleep(0.1)
        actors.wake()
    assert sorted(actors.live) == [0, 1]
    assert square_all(actors, list(range(4))) == [0, 1, 4, 9]


def test_a_replacement_that_cannot_be_placed_gets_no_work_in_later_calls(ray_session):
    """The slot's replacement waits for a node that never comes: later rounds must run on the survivor
    instead of waiting forever on work handed to it (which they did when liveness lived in one call)."""
    actors = make_actors(2, placeable_replacements=False)
    assert square_all(actors, list(range(6)), kill_at=1) == [x * x for x in range(6)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        later = pool.submit(square_all, actors, list(range(6)))
        assert later.result(timeout=60) == [x * x for x in range(6)]
    assert actors.live == [1] or actors.live == [0]


def test_with_every_actor_lost_and_none_placeable_the_work_fails_in_bounded_time(ray_session):
    actors = make_actors(1, placeable_replacements=False, wait_s=1.0)
    with pytest.raises(WorkLost, match=r"test: no device actor came back within 1 s \(ray.placement_timeout_s\)"):
        square_all(actors, [0, 1, 2], kill_at=0)


def test_an_item_lost_more_often_than_allowed_fails_naming_the_limit(ray_session):
    actors = make_actors(1, placeable_replacements=True, max_retries=1)

    def call(actor, x):
        actor.die.remote()  # every actor dies before every item
        return (actor.square.remote(x),)

    with pytest.raises(WorkLost, match=r"test: item 0 was lost 2 times \(ray.max_retries=1\)"):
        dispatch(actors, [0], call, in_flight=1, what="test")


def test_an_actor_whose_constructor_raises_fails_the_work_at_once_with_the_cause(ray_session):
    """A constructor error is the code's, not the node's: no replacement would start either, so the work
    fails at the first try, naming the error instead of Ray's 'died in its creation task'."""

    class Broken:
        def __init__(self):
            raise ModuleNotFoundError("No module named 'missing_dependency'")

        def square(self, x: int) -> int:
            return x * x

    cls = ray.remote(num_cpus=0)(Broken)
    spawned = []

    def spawn(slot: int):
        spawned.append(slot)
        return cls.remote()

    actors = Actors(spawn, 2, max_retries=3, wait_s=5.0)
    with pytest.raises(WorkLost, match=r"test: a device actor failed to start: ModuleNotFoundError: No module "
                                       r"named 'missing_dependency'$"):
        dispatch(actors, [1, 2, 3], lambda a, x: (a.square.remote(x),), in_flight=1, what="test")
    assert len(spawned) == 2  # no replacement was made
