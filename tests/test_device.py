import numpy as np
import pytest
import torch

from raysim.config import load_experiment
from raysim.engine.device import batch_indices
from raysim.types import DeviceConfig

from conftest import TINY, make_worker, train_unit

CFG = DeviceConfig(lora_rank=4)


@pytest.fixture(scope="module")
def workers():
    cfg = load_experiment(None, [*TINY, "model.dropout=0.1", "eval.batch_size=8"])
    return make_worker(cfg), make_worker(cfg)


@pytest.fixture(scope="module")
def one_per_pass():
    return make_worker(load_experiment(None, [*TINY, "model.dropout=0.1", "ray.tokens_per_pass=0"]))


def _run(worker, state, ids):
    return train_unit(worker, state, ids, [CFG] * len(ids))


def test_a_device_trains_the_same_whatever_came_before_it_on_the_worker(workers):
    a, b = workers
    state = a.initial_state()
    rec_a, _ = _run(a, state, [11, 42, 7])
    rec_b, _ = _run(b, state, [7])
    assert a.devices_per_pass > 1  # device 7 trained in a group of three, then alone
    np.testing.assert_allclose(rec_a["train_loss"][2], rec_b["train_loss"][0], rtol=1e-6)


def test_devices_trained_together_match_devices_trained_one_by_one(workers, one_per_pass):
    """Grouped and single passes run other float32 kernels (a batched matmul against a plain one), so they agree to
    float32 rounding, not bit for bit. Bound: a weight gradient sums ``K = batch_size x seq_len`` products per step,
    each float32 sum within ``K x eps`` relative (Higham's gamma_K); Adam's step and the LoRA product keep relative
    errors of that order. Held norm-wise: Adam maps an element whose gradient is within rounding of zero to any
    step in [-lr, lr], so single elements can differ more (measured on an AMD EPYC: 6e-7 norm-wise, 24 elements of
    3,072 beyond 1e-9 absolute)."""
    a, _ = workers
    state = a.initial_state()
    ids = [3, 8, 21, 30, 44]
    rec_grouped, grouped = _run(a, state, ids)
    rec_single, single = _run(one_per_pass, state, ids)
    assert one_per_pass.devices_per_pass == 1 and a.devices_per_pass >= len(ids)
    bound = a.cfg.train.batch_size * a.cfg.data.seq_len * torch.finfo(torch.float32).eps
    np.testing.assert_allclose(rec_grouped["train_loss"], rec_single["train_loss"], rtol=bound)
    for k in grouped.sums:
        error = float((grouped.sums[k] - single.sums[k]).norm() / single.sums[k].norm())
        assert 0 < error <= bound or torch.equal(grouped.sums[k], single.sums[k]), (k, error, bound)
        assert torch.equal(grouped.weights[k], single.weights[k])


def test_model_dropout_masks_differ_between_devices_and_repeat_per_device(workers):
    a, _ = workers
    state = a.initial_state()
    twice, _ = _run(a, state, [5, 5])  # the same device twice in one pass: same data, same masks
    assert twice["train_loss"][0] == twice["train_loss"][1]
    other, _ = train_unit(a, state, [5], [CFG], round=4)  # another round: other masks and batches
    assert other["train_loss"][0] != twice["train_loss"][0]


def test_units_split_across_workers_add_up_to_one_unit_of_the_same_groups(workers):
    from raysim.aggregation.rules import combine
    from raysim.engine.work import Group, WorkUnit

    a, b = workers
    state = a.initial_state()
    left, right = Group(config=CFG, device_ids=(1, 2)), Group(config=CFG, device_ids=(3, 4))
    a.begin_round(state, 3)
    _, whole = a.train(WorkUnit(index=0, groups=(left, right)))
    _, first = a.train(WorkUnit(index=0, groups=(left,)))
    b.begin_round(state, 3)
    _, second = b.train(WorkUnit(index=1, groups=(right,)))
    total = combine([first, second])
    for k in whole.sums:
        # The same float32 updates, added to float64 sums in another order: within a few float64 roundings.
        torch.testing.assert_close(whole.sums[k], total.sums[k], rtol=8 * torch.finfo(torch.float64).eps, atol=0)
        assert float(whole.weights[k]) == float(total.weights[k])


def test_local_training_moves_the_adapter(workers):
    a, _ = workers
    _, partial = _run(a, a.initial_state(), [5])
    assert all(float(s.abs().sum()) > 0 for s in partial.sums.values())


def test_a_held_out_batch_evaluates_to_the_same_bits_whichever_batches_come_with_it(workers):
    a, b = workers
    state = a.initial_state()
    batches = list(range(a.num_eval_batches()))
    whole = a.evaluate(state, batches)
    assert len(batches) > 1 and np.array_equal(b.evaluate(state, batches[1::2]), whole[1::2])
    assert whole[:, 1].sum() == a.cfg.data.eval_users * a.cfg.data.examples_per_user * (a.cfg.data.seq_len - 1)


def test_batches_cover_every_example_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    idx = batch_indices(8, steps=4, batch_size=4, generator=g)
    assert sorted(idx[:2].flatten().tolist()) == list(range(8))
    assert sorted(idx[2:].flatten().tolist()) == list(range(8))


def test_a_units_partial_sum_counts_its_devices_and_records_follow_the_units_order(workers):
    from raysim.engine.work import Group, WorkUnit

    a, _ = workers
    a.begin_round(a.initial_state(), 1)
    unit = WorkUnit(index=0, groups=(Group(config=CFG, device_ids=(9, 4)), Group(config=CFG, device_ids=(2,))))
    records, partial = a.train(unit)
    assert partial.num_devices == 3 and records.device_id.tolist() == [9, 4, 2]


@pytest.mark.parametrize("config", [CFG, DeviceConfig(lora_rank=4, bits=4)])
def test_an_updates_utility_is_the_first_order_drop_of_the_held_out_loss(config):
    """utility = -<grad L, update> / L: applying eps x the update alone lowers L by eps x utility x L."""
    a = make_worker(load_experiment(None, [*TINY, "train.lr=0.05"]))  # an update the float32 loss resolves
    state = a.initial_state()
    records, partial = train_unit(a, state, [5], [config], utility=True)
    utility = records["utility"][0]
    update = {k: (partial.sums[k] / partial.weights[k]).float() for k in partial.sums}
    assert set(update) == {k for k in state if k.endswith(".delta")}

    def loss(s):
        return a.held_out.loss_gradient(s)[1]

    eps = 0.05
    before = loss(state)
    after = loss({k: v + eps * update[k] for k, v in state.items()})
    assert utility != 0.0
    assert (before - after) / (eps * before) == pytest.approx(utility, rel=0.05)


def test_no_utility_unless_asked(workers):
    a, _ = workers
    records, _ = train_unit(a, a.initial_state(), [5], [CFG])
    assert np.isnan(records["utility"]).all()
