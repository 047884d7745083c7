"""How a round's training is cut into units: from the cohort alone, balanced, every device exactly once."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysim.engine.work import make_groups, pack, plan, split_evenly
from raysim.types import DeviceConfig

A, B, C = DeviceConfig(lora_rank=8), DeviceConfig(lora_rank=4), DeviceConfig(lora_rank=4, dropout_rate=0.25)
LIMITS = {A: 4, B: 3, C: 1}


def test_split_evenly_uses_the_fewest_runs_and_sizes_differ_by_at_most_one():
    assert split_evenly(list(range(9)), limit=4) == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert split_evenly(list(range(8)), limit=4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert split_evenly([5], limit=4) == [(5,)]


def test_groups_hold_one_config_in_device_id_order_under_its_pass_limit():
    ids = [30, 2, 17, 5, 11, 8, 40, 21]
    configs = [A, B, A, C, A, B, C, A]
    groups = make_groups(ids, configs, pass_limit=LIMITS.get)
    assert [(g.config, g.device_ids) for g in groups] == [
        (B, (2, 8)),  # configs in a fixed order (rank, then the other fields), not the order they came in
        (C, (5,)), (C, (40,)),  # a pass limit of 1 (federated dropout): one device per pass
        (A, (11, 17, 21, 30)),
    ]
    five = make_groups([1, 2, 3, 4, 5], [A] * 5, pass_limit=LIMITS.get)
    assert [g.device_ids for g in five] == [(1, 2, 3), (4, 5)]  # 5 under a limit of 4: two passes, 3 + 2


def test_the_plan_does_not_depend_on_the_order_devices_come_in():
    rng = np.random.default_rng(0)
    ids = rng.choice(10_000, size=60, replace=False)
    configs = [(A, B, C)[i % 3] for i in range(60)]
    flops = rng.uniform(1, 10, size=60)
    first = plan(ids, configs, flops, pass_limit=LIMITS.get, max_units=8)
    order = rng.permutation(60)
    again = plan(ids[order], [configs[i] for i in order], flops[order], pass_limit=LIMITS.get, max_units=8)
    assert first == again


def test_units_are_numbered_in_order_and_never_more_than_asked():
    groups = make_groups(list(range(10)), [C] * 10, pass_limit=LIMITS.get)
    units = pack(groups, [1.0] * 10, max_units=4)
    assert [u.index for u in units] == [0, 1, 2, 3]
    assert sorted(d for u in units for d in u.device_ids) == list(range(10))
    assert len(pack(groups[:2], [1.0, 1.0], max_units=4)) == 2  # fewer groups than units: one each
    assert pack([], [], max_units=4) == []


@settings(max_examples=100, deadline=None)
@given(costs=st.lists(st.floats(min_value=0.1, max_value=100.0), min_size=1, max_size=40),
       max_units=st.integers(min_value=1, max_value=12))
def test_longest_first_packing_is_within_the_largest_group_of_a_perfect_balance(costs, max_units):
    """Graham's bound for longest-processing-time-first: no unit exceeds the mean load by more than one group."""
    groups = make_groups(list(range(len(costs))), [C] * len(costs), pass_limit=LIMITS.get)
    units = pack(groups, costs, max_units=max_units)
    cost_of = dict(enumerate(costs))
    loads = [sum(cost_of[d] for d in u.device_ids) for u in units]
    assert max(loads) <= sum(costs) / len(units) + max(costs) + 1e-9
    assert sorted(d for u in units for d in u.device_ids) == list(range(len(costs)))


@pytest.mark.parametrize("max_units", [1, 3, 64])
def test_every_device_is_trained_once_whatever_the_number_of_units(max_units):
    ids = list(range(100, 130))
    configs = [(A, B, C)[i % 3] for i in range(30)]
    units = plan(ids, configs, np.ones(30), pass_limit=LIMITS.get, max_units=max_units)
    assert sorted(d for u in units for d in u.device_ids) == ids
    assert len(units) == min(max_units, len(make_groups(ids, configs, pass_limit=LIMITS.get)))
