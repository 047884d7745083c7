import numpy as np

from raysim.emulation.clock import settle_round, settle_rounds


def _settle(finish, *, target, deadline=None, available=None, fits=None, dropped=None):
    n = len(finish)
    ones = np.ones(n, dtype=bool)
    return settle_round(
        finish_s=np.asarray(finish, dtype=float),
        available=ones if available is None else np.asarray(available),
        fits=ones if fits is None else np.asarray(fits),
        dropped=~ones if dropped is None else np.asarray(dropped),
        target=target,
        deadline_s=deadline,
    )


def test_round_closes_at_the_target_th_arrival_and_later_ones_straggle():
    out = _settle([5.0, 1.0, 3.0, 9.0], target=2)
    assert list(out.status) == ["straggler", "ok", "ok", "straggler"]
    assert out.duration_s == 3.0


def test_round_closes_at_the_deadline_when_the_target_is_not_reached():
    out = _settle([5.0, 1.0, 30.0], target=3, deadline=10.0)
    assert list(out.status) == ["ok", "ok", "straggler"]
    assert out.duration_s == 10.0


def test_oom_dropped_and_unavailable_devices_are_not_aggregated():
    out = _settle([1.0, 2.0, 3.0, 4.0], target=4, available=[True, True, True, False],
                  fits=[True, False, True, True], dropped=[False, False, True, False])
    assert list(out.status) == ["ok", "oom", "dropped", "unavailable"]
    assert out.duration_s == 1.0


def test_ties_in_arrival_are_broken_by_device_order():
    out = _settle([2.0, 2.0, 2.0], target=2)
    assert list(out.status) == ["ok", "ok", "straggler"]


def test_empty_round_lasts_zero_without_deadline():
    out = _settle([1.0], target=1, fits=[False])
    assert out.duration_s == 0.0


def test_settle_rounds_settles_each_row_as_its_own_round():
    """Many alternative rounds at once (a policy's counterfactuals) give what each gives alone."""
    g = np.random.default_rng(3)
    finish = np.round(g.uniform(0, 5, (50, 9)), 1)  # ties, settled by position
    arrives = g.random((50, 9)) < 0.8
    for deadline in (None, 2.5):
        accepted, duration = settle_rounds(finish_s=finish, arrives=arrives, target=4, deadline_s=deadline)
        for row in range(50):
            alone = _settle(finish[row], target=4, deadline=deadline, available=arrives[row])
            assert list(accepted[row]) == list(alone.status == "ok")
            assert duration[row] == alone.duration_s
