import numpy as np
import pytest
import torch

from raysim.config import load_experiment
from raysim.device import batch_indices
from raysim.types import DeviceConfig

from conftest import TINY, make_worker

CFG = DeviceConfig(lora_rank=4)


@pytest.fixture(scope="module")
def workers():
    cfg = load_experiment(None, [*TINY, "model.dropout=0.1"])
    return make_worker(cfg), make_worker(cfg)


@pytest.fixture(scope="module")
def one_per_pass():
    return make_worker(load_experiment(None, [*TINY, "model.dropout=0.1", "ray.tokens_per_pass=0"]))


def _run(worker, state, ids):
    worker.begin_round(state, 3)
    records = worker.train(ids, [CFG] * len(ids))
    return records, worker.end_round()


def test_a_device_trains_the_same_whatever_came_before_it_on_the_worker(workers):
    a, b = workers
    state = a.initial_state()
    rec_a, _ = _run(a, state, [11, 42, 7])
    rec_b, _ = _run(b, state, [7])
    assert a.devices_per_pass > 1  # device 7 trained in a group of three, then alone
    np.testing.assert_allclose(rec_a["train_loss"][2], rec_b["train_loss"][0], rtol=1e-6)


def test_devices_trained_together_match_devices_trained_one_by_one(workers, one_per_pass):
    a, _ = workers
    state = a.initial_state()
    ids = [3, 8, 21, 30, 44]
    rec_grouped, grouped = _run(a, state, ids)
    rec_single, single = _run(one_per_pass, state, ids)
    assert one_per_pass.devices_per_pass == 1
    np.testing.assert_allclose(rec_grouped["train_loss"], rec_single["train_loss"], rtol=1e-6)
    for k in grouped.sums:
        torch.testing.assert_close(grouped.sums[k], single.sums[k], rtol=1e-5, atol=1e-9)


def test_model_dropout_masks_differ_between_devices_and_repeat_per_device(workers):
    a, _ = workers
    state = a.initial_state()
    twice, _ = _run(a, state, [5, 5])  # the same device twice in one pass: same data, same masks
    assert twice["train_loss"][0] == twice["train_loss"][1]
    a.begin_round(state, 4)  # another round: other masks and batches
    other = a.train([5], [CFG])
    a.end_round()
    assert other["train_loss"][0] != twice["train_loss"][0]


def test_partial_sums_split_across_workers_add_up_to_one_worker(workers):
    a, b = workers
    state = a.initial_state()
    _, whole = _run(a, state, [1, 2, 3, 4])
    _, left = _run(a, state, [1, 2])
    _, right = _run(b, state, [3, 4])
    for k in whole.sums:
        torch.testing.assert_close(whole.sums[k], left.sums[k] + right.sums[k], rtol=1e-12, atol=1e-15)
        assert float(whole.weights[k]) == float(left.weights[k] + right.weights[k])


def test_local_training_moves_the_adapter(workers):
    a, _ = workers
    _, partial = _run(a, a.initial_state(), [5])
    assert all(float(s.abs().sum()) > 0 for s in partial.sums.values())


def test_evaluation_shards_add_up_to_the_whole_held_out_set(workers):
    a, _ = workers
    state = a.initial_state()
    whole = a.evaluate(state, shard=0, num_shards=1)
    parts = a.evaluate(state, shard=0, num_shards=2) + a.evaluate(state, shard=1, num_shards=2)
    np.testing.assert_allclose(whole, parts, rtol=1e-6)
    assert whole[1] == a.cfg.data.eval_users * a.cfg.data.examples_per_user * (a.cfg.data.seq_len - 1)


def test_batches_cover_every_example_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    idx = batch_indices(8, steps=4, batch_size=4, generator=g)
    assert sorted(idx[:2].flatten().tolist()) == list(range(8))
    assert sorted(idx[2:].flatten().tolist()) == list(range(8))


def test_an_idle_worker_returns_no_partial_sum(workers):
    a, _ = workers
    a.begin_round(a.initial_state(), 1)
    assert a.end_round() is None


@pytest.mark.parametrize("config", [CFG, DeviceConfig(lora_rank=4, bits=4)])
def test_an_updates_utility_is_the_first_order_drop_of_the_held_out_loss(config):
    """utility = -<grad L, update> / L: applying eps x the update alone lowers L by eps x utility x L."""
    a = make_worker(load_experiment(None, [*TINY, "train.lr=0.05"]))  # an update the float32 loss resolves
    state = a.initial_state()
    a.begin_round(state, 3, utility=True)
    utility = a.train([5], [config])["utility"][0]
    partial = a.end_round()
    update = {k: (partial.sums[k] / partial.weights[k]).float() for k in partial.sums}
    assert set(update) == {k for k in state if k.endswith(".delta")}

    def loss(s):
        a.begin_round(s, 3, utility=True)
        a.end_round()
        return a._loss_gradient()[1]

    eps = 0.05
    before = loss(state)
    after = loss({k: v + eps * update[k] for k, v in state.items()})
    assert utility != 0.0
    assert (before - after) / (eps * before) == pytest.approx(utility, rel=0.05)


def test_no_utility_unless_asked(workers):
    a, _ = workers
    a.begin_round(a.initial_state(), 3)
    assert np.isnan(a.train([5], [CFG])["utility"]).all()
    a.end_round()
