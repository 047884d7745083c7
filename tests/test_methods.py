"""Per-device methods on a real (tiny) model: exact mapping back, composition, costs."""

import pytest
import torch

from raysim.aggregation.rules import combine, weighted_mean
from raysim.config import load_experiment
from raysim.methods import method_space
from raysim.methods.lora import product
from raysim.types import DeviceConfig

from conftest import TINY, make_worker, new_state, train_unit, trained_alone

EMBEDDING = "transformer.wte.weight"  # GPT-2's token embedding, tied to its output head

TWO_BLOCKS = [*TINY, "model.n_layer=2", "methods.lora_target_modules=[c_attn,c_fc]"]
C_ATTN = "transformer.h.1.attn.c_attn"


def _worker(*overrides):
    return make_worker(load_experiment(None, [*TWO_BLOCKS, *overrides]))


@pytest.fixture(scope="module")
def flex():
    return _worker("methods.lora_rank=[4,2,0]", "methods.partial_embeddings=[false,true]")


def _round(worker, state, ids, configs):
    return train_unit(worker, state, ids, configs, round=1)


def _lora(params, module, scale=2.0):
    return product(lora_A=params[f"{module}.lora_A.default.weight"].double(),
                   lora_B=params[f"{module}.lora_B.default.weight"].double(), scale=scale)


def test_mixed_ranks_aggregate_to_the_weighted_sum_of_products(flex):
    state = flex.initial_state()
    configs = {3: DeviceConfig(lora_rank=4), 8: DeviceConfig(lora_rank=2), 5: DeviceConfig(lora_rank=4)}
    alone = {d: trained_alone(flex, state, d, c) for d, c in configs.items()}
    _, partial = _round(flex, state, list(configs), list(configs.values()))
    new = new_state(state, partial)
    total = sum(n for _, n in alone.values())
    want = sum(n / total * _lora(p, C_ATTN) for p, n in alone.values())
    torch.testing.assert_close(new[f"{C_ATTN}.delta"], want, rtol=1e-5, atol=1e-8)


def test_full_weight_training_on_one_config_is_fedavg_of_the_weights(flex):
    state = flex.initial_state()
    config = DeviceConfig(lora_rank=0)
    alone = [trained_alone(flex, state, d, config) for d in (1, 2)]
    _, partial = _round(flex, state, [1, 2], [config, config])
    w0 = flex.base.state[f"{C_ATTN}.weight"].double()
    total = sum(n for _, n in alone)
    want = sum(n / total * (p[f"{C_ATTN}.weight"].double() - w0).T for p, n in alone)
    torch.testing.assert_close(new_state(state, partial)[f"{C_ATTN}.delta"], want, rtol=1e-5, atol=1e-8)


def test_hetlora_with_one_rank_is_fedavg_of_the_factors():
    worker = _worker("methods.lora_rank=[4]", "aggregation.lora=hetlora")
    state = worker.initial_state()
    config = DeviceConfig(lora_rank=4)
    alone = [trained_alone(worker, state, d, config) for d in (1, 2)]
    _, partial = _round(worker, state, [1, 2], [config, config])
    new = new_state(state, partial)
    total = sum(n for _, n in alone)
    for factor in ("lora_A", "lora_B"):
        want = sum(n / total * p[f"{C_ATTN}.{factor}.default.weight"].double() for p, n in alone)
        torch.testing.assert_close(new[f"{C_ATTN}.{factor}"], want, rtol=1e-5, atol=1e-8)


def test_pruned_devices_average_the_rows_they_held_and_leave_the_rest(flex):
    state = flex.initial_state()
    config = DeviceConfig(lora_rank=4, prune_ratio=0.5)
    alone = [trained_alone(flex, state, d, config) for d in (1, 2)]
    _, partial = _round(flex, state, [1, 2], [config, config])
    new = new_state(state, partial)[f"{C_ATTN}.delta"]
    held = torch.cat([torch.arange(16) + offset for offset in (0, 32, 64)])  # q, k, v of head 0 (of 2)
    total = sum(n for _, n in alone)
    want = sum(n / total * _lora(p, C_ATTN) for p, n in alone)
    torch.testing.assert_close(new[held], want, rtol=1e-5, atol=1e-8)
    rest = torch.ones(96, dtype=torch.bool)
    rest[held] = False
    assert torch.equal(new[rest], state[f"{C_ATTN}.delta"][rest].double())


def test_frozen_blocks_keep_their_value_and_embeddings_change_only_in_seen_rows(flex):
    state = flex.initial_state()
    _, partial = _round(flex, state, [4], [DeviceConfig(lora_rank=4, trainable_layers=1, partial_embeddings=True)])
    new = new_state(state, partial)
    assert torch.equal(new["transformer.h.0.attn.c_attn.delta"], state["transformer.h.0.attn.c_attn.delta"].double())
    assert not torch.equal(new[f"{C_ATTN}.delta"], state[f"{C_ATTN}.delta"].double())
    changed = (new[EMBEDDING] != state[EMBEDDING].double()).any(dim=1)
    seen = torch.unique(flex.dataset.device_examples(4))
    assert changed.any() and set(changed.nonzero().squeeze(1).tolist()) <= set(seen.tolist())


def test_federated_dropout_submodels_differ_between_devices_and_are_seeded(flex):
    config = DeviceConfig(lora_rank=4, dropout_rate=0.5)
    a = flex._slices(config, round=1, device_id=1)
    b = flex._slices(config, round=1, device_id=2)
    assert torch.equal(a[0][1], flex._slices(config, round=1, device_id=1)[0][1])
    assert not torch.equal(a[0][1], b[0][1])


def test_cost_model_follows_the_real_submodel(flex):
    full = flex.measure(DeviceConfig(lora_rank=4))
    pruned = flex.measure(DeviceConfig(lora_rank=4, prune_ratio=0.5))
    top = flex.measure(DeviceConfig(lora_rank=4, trainable_layers=1))
    low_rank = flex.measure(DeviceConfig(lora_rank=2))
    four_bits = flex.measure(DeviceConfig(lora_rank=4, bits=4))
    assert pruned.flops_per_step < full.flops_per_step and pruned.param_bytes < full.param_bytes
    assert pruned.peak_memory_bytes < full.peak_memory_bytes
    assert top.activation_bytes < full.activation_bytes and top.flops_per_step < full.flops_per_step
    assert low_rank.trainable_params == full.trainable_params // 2 and low_rank.bytes_up == full.bytes_up // 2
    tensors = len(flex.submodel(DeviceConfig(lora_rank=4)).params)
    assert four_bits.bytes_up == full.trainable_params // 2 + 8 * tensors  # nibbles plus (lo, step) per tensor


SHIPPED = [o for o in TWO_BLOCKS if not o.startswith("methods.")]
SPACE = method_space(load_experiment("experiments/methods_tradeoffs.yaml", SHIPPED).methods)


@pytest.fixture(scope="module")
def shipped():
    return make_worker(load_experiment("experiments/methods_tradeoffs.yaml", SHIPPED))


@pytest.mark.parametrize("config", SPACE, ids=str)
def test_every_config_in_the_shipped_space_builds_trains_and_aggregates(shipped, config):
    state = shipped.initial_state()
    records, partial = _round(shipped, state, [6], [config])
    new = new_state(state, partial)
    assert torch.isfinite(torch.tensor(records["train_loss"])).all()
    assert all(torch.isfinite(v).all() for v in new.values())
    assert any(not torch.equal(new[k], state[k].double()) for k in new)


def test_heterogeneous_configs_aggregate_to_the_same_bits_on_one_or_two_actors(ray_session):
    import numpy as np
    import ray

    from raysim.data.build import build_dataset
    from raysim.engine.pool import DevicePool
    from raysim.models.build import initial_base_model

    cfg = load_experiment(None, [*TWO_BLOCKS, "methods.lora_rank=[4,2,0]", "methods.partial_embeddings=[false,true]",
                                 "methods.embedding_rows=16"])
    base, dataset = ray.put(initial_base_model(cfg.model, seed=0)), ray.put(build_dataset(cfg))
    configs = [DeviceConfig(lora_rank=4), DeviceConfig(lora_rank=2, prune_ratio=0.5, bits=4),
               DeviceConfig(lora_rank=0, dropout_rate=0.25, trainable_layers=1),
               DeviceConfig(lora_rank=4, partial_embeddings=True, bits=8), DeviceConfig(lora_rank=2, dropout_rate=0.25)]
    means = []
    for n in (1, 2):
        pool = DevicePool(cfg=cfg, base=base, dataset=dataset, num_actors=n)
        _, partials = pool.train(ray.put(pool.initial_state()), round=1, device_ids=np.arange(10, 15), configs=configs,
                                 flops=np.ones(5))
        means.append(weighted_mean(combine(ray.get(partials))))
        pool.close()
    for k in means[0]:  # the units are the cohort's, added in unit order: equal, not close
        assert torch.equal(means[0][k], means[1][k]), k


def test_hetlora_counts_the_padded_rank_components_of_lower_rank_devices_as_zeros():
    worker = _worker("methods.lora_rank=[4,2]", "aggregation.lora=hetlora")
    state = worker.initial_state()
    (high, n_high), (_, n_low) = (trained_alone(worker, state, 1, DeviceConfig(lora_rank=4)),
                                  trained_alone(worker, state, 2, DeviceConfig(lora_rank=2)))
    _, partial = _round(worker, state, [1, 2], [DeviceConfig(lora_rank=4), DeviceConfig(lora_rank=2)])
    new_b = new_state(state, partial)[f"{C_ATTN}.lora_B"]
    want = n_high / (n_high + n_low) * high[f"{C_ATTN}.lora_B.default.weight"][:, 2:].double()
    torch.testing.assert_close(new_b[:, 2:], want, rtol=1e-5, atol=1e-8)


def test_fedrolex_windows_roll_between_rounds_and_are_shared_within_one():
    worker = _worker("methods.pruning=fedrolex")
    config = DeviceConfig(lora_rank=4, prune_ratio=0.5)
    one = worker._slices(config, round=1, device_id=1)
    assert torch.equal(one[0][1], worker._slices(config, round=1, device_id=2)[0][1])
    assert not torch.equal(one[0][1], worker._slices(config, round=2, device_id=1)[0][1])


def test_ffa_devices_train_b_only_and_the_new_state_is_the_mean_of_their_products():
    """Real training on the tiny model at mixed ranks: A stays the state's (shared, frozen), only B travels, and
    the new state's product is the examples-weighted mean of the devices' products."""
    worker = _worker("methods.lora_rank=[4,2]", "aggregation.lora=ffa")
    state = worker.initial_state()
    configs = {1: DeviceConfig(lora_rank=4), 2: DeviceConfig(lora_rank=2), 6: DeviceConfig(lora_rank=4)}
    alone = {d: trained_alone(worker, state, d, c) for d, c in configs.items()}
    for params, _ in alone.values():
        assert not any("lora_A" in name for name in params)  # nothing of A trains or is sent
    for rank in (4, 2):  # each submodel trained on the state's A, its first r rows
        held = worker.submodel(DeviceConfig(lora_rank=rank)).lm.get_parameter(f"{C_ATTN}.lora_A.default.weight")
        assert torch.equal(held, state[f"{C_ATTN}.lora_A"][:rank])
    _, partial = _round(worker, state, list(configs), list(configs.values()))
    new = new_state(state, partial)
    a = state[f"{C_ATTN}.lora_A"].double()
    torch.testing.assert_close(new[f"{C_ATTN}.lora_A"], a)
    total = sum(n for _, n in alone.values())
    want = sum(n / total * 2.0 * (p[f"{C_ATTN}.lora_B.default.weight"].double() @ a[:c.lora_rank])
               for (p, n), c in zip(alone.values(), configs.values()))
    got = 2.0 * new[f"{C_ATTN}.lora_B"] @ a
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("selection, index_bytes", [("device_seen", 4), ("server_random", 0),
                                                    ("server_frequent", 0)])
def test_partial_embedding_payload_is_m_rows_and_indices_only_when_the_device_chose_them(selection, index_bytes):
    m, width = 16, 32  # TINY's width
    worker = _worker("methods.partial_embeddings=[true]", "methods.embedding_rows=16",
                     f"methods.embedding_selection={selection}")
    lora_only = _worker().measure(DeviceConfig(lora_rank=4)).bytes_up
    peu = worker.measure(DeviceConfig(lora_rank=4, partial_embeddings=True)).bytes_up
    assert peu - lora_only == m * width * 4 + m * index_bytes


def test_server_rows_train_alone_and_are_the_rounds_on_every_worker():
    worker = _worker("methods.partial_embeddings=[true]", "methods.embedding_rows=16",
                     "methods.embedding_selection=server_random")
    state = worker.initial_state()
    config = DeviceConfig(lora_rank=4, partial_embeddings=True)
    _, partial = train_unit(worker, state, [5], [config], round=3)
    rows = worker.server_rows(3)
    assert len(rows) == 16 and torch.equal(rows, _worker("methods.partial_embeddings=[true]",
                                                          "methods.embedding_rows=16",
                                                          "methods.embedding_selection=server_random").server_rows(3))
    assert not torch.equal(rows, worker.server_rows(4))  # drawn per round
    changed = partial.sums[EMBEDDING].abs().sum(1).nonzero().squeeze(1)
    assert len(changed) > 0 and set(changed.tolist()) <= set(rows.tolist())


def test_server_frequent_rows_follow_the_public_unigram_counts():
    from raysim.methods.embeddings import server_rows

    counts = torch.zeros(1000, dtype=torch.long)
    counts[:10] = 10**6  # ten tokens hold nearly all the public text
    for rnd in range(1, 21):
        rows = server_rows("server_frequent", count=12, vocab_size=1000, unigram=counts, seed=0, round=rnd)
        assert set(range(10)) <= set(rows.tolist())
    assert torch.equal(rows, server_rows("server_frequent", count=12, vocab_size=1000, unigram=counts, seed=0,
                                         round=20))
