"""Central DP noises exactly the coordinates some config of the method space can change (golden counts).

The model: GPT-2 with 2 blocks of width 16, 2 heads of 8, vocabulary 32; LoRA on ``c_attn`` (16 in, 48 out).
Its ΔW per block is 48 x 16 = 768 coordinates; the embedding is 32 x 16 = 512.
"""

import math

import pytest
import torch

from raysim.aggregation.rules import PartialSum
from raysim.config import load_experiment
from raysim.methods import method_space
from raysim.methods.coordinates import Space, Support
from raysim.models.build import initial_base_model
from raysim.privacy.central import gaussian_noise, noisy_sum, off_support_norm

TINY = ["model.n_layer=2", "model.n_embd=16", "model.n_head=2", "model.vocab_size=32", "model.n_positions=16",
        "data.seq_len=16",
        "methods.lora_target_modules=[c_attn]"]


def _support(*overrides):
    cfg = load_experiment(None, [*TINY, *overrides])
    base = initial_base_model(cfg.model, seed=0)
    space = Space.build(cfg, base)
    support = Support(space=space, configs=tuple(method_space(cfg.methods)), pruning=cfg.methods.pruning)
    return support, space.initial_state(base, seed=0)


@pytest.mark.parametrize("overrides, count", [
    (["methods.lora_rank=[4]"], 2 * 768),  # every block's ΔW
    (["methods.lora_rank=[4]", "methods.trainable_layers=[1]"], 768),  # the top block only; block 0 never changes
    (["methods.lora_rank=[4]", "methods.trainable_layers=[1,null]"], 2 * 768),  # some config trains both
    (["methods.lora_rank=[0]"], 2 * 768),  # full fine-tuning of the targets: the same ΔW
    (["methods.lora_rank=[4]", "methods.partial_embeddings=[false,true]"], 2 * 768 + 512),
    (["methods.lora_rank=[4]", "methods.prune_ratio=[0.5]"], 2 * 24 * 16),  # 1 of 2 heads: 3 x 8 of 48 outputs
    (["methods.lora_rank=[4]", "methods.prune_ratio=[0.5,0.0]"], 2 * 768),
    (["methods.lora_rank=[4]", "methods.prune_ratio=[0.5]", "methods.pruning=fedrolex"], 2 * 24 * 16),
    (["methods.lora_rank=[4]", "methods.dropout_rate=[0.5]"], 2 * 768),  # random heads: any of them
    (["methods.lora_rank=[2]", "aggregation.lora=hetlora"], 2 * (2 * 16 + 48 * 2)),  # factors A 2x16, B 48x2
    (["methods.lora_rank=[4,2]", "aggregation.lora=hetlora"], 2 * (4 * 16 + 48 * 4)),
    (["methods.lora_rank=[4]", "aggregation.lora=hetlora", "methods.prune_ratio=[0.5]"], 2 * (4 * 16 + 24 * 4)),
])
def test_noised_dimensions_are_the_union_of_the_method_spaces_supports(overrides, count):
    support, state = _support(*overrides)
    assert support.count(state) == count


def test_a_rolling_window_moves_the_support_and_keeps_its_size():
    support, state = _support("methods.lora_rank=[4]", "methods.prune_ratio=[0.5]", "methods.pruning=fedrolex")
    one = {k: m.clone() for k, m in support.masks(state, round=1).items()}
    two = support.masks(state, round=2)
    assert sum(int(m.sum()) for m in two.values()) == sum(int(m.sum()) for m in one.values())
    assert any(not torch.equal(one[k], two[k]) for k in one)


def test_noise_lands_only_on_the_support_with_the_keyed_draws_there():
    """On the support the noise is the same keyed N(0, std²) draw as without a support, so the std per
    coordinate is z·C wherever noise goes; off it the released sum is exactly zero."""
    support, state = _support("methods.lora_rank=[4]", "methods.trainable_layers=[1]")
    masks = support.masks(state, round=3)
    total = PartialSum.zeros_like(state)
    total.sums = {k: torch.full_like(v, 0.5) * masks[k] for k, v in total.sums.items()}
    noisy, _ = noisy_sum(total, noise_std=2.0, expected_devices=10.0, seed=7, round=3, support=masks)
    full = gaussian_noise(total.sums, std=2.0, seed=7, round=3)
    for k, m in masks.items():
        assert torch.equal(noisy.sums[k][~m], torch.zeros(int((~m).sum()), dtype=torch.float64))
        assert torch.equal(noisy.sums[k][m], total.sums[k][m] + full[k][m])
    assert not masks["transformer.h.0.attn.c_attn.delta"].any() and masks["transformer.h.1.attn.c_attn.delta"].all()
    assert off_support_norm(total.sums, masks) == 0.0


def test_what_devices_send_off_the_support_is_measured_and_never_released():
    """A sum that is 0.5 everywhere, as if a method leaked into block 0, which no config trains: block 0's
    768 coordinates are released as exactly 0 (no noise, no signal) and measured, ||0.5·1₇₆₈|| = 0.5·√768."""
    support, state = _support("methods.lora_rank=[4]", "methods.trainable_layers=[1]")
    masks = support.masks(state, round=3)
    total = PartialSum.zeros_like(state)
    total.sums = {k: torch.full_like(v, 0.5) for k, v in total.sums.items()}
    noisy, _ = noisy_sum(total, noise_std=2.0, expected_devices=10.0, seed=7, round=3, support=masks)
    leaked = "transformer.h.0.attn.c_attn.delta"
    assert torch.equal(noisy.sums[leaked], torch.zeros(48, 16, dtype=torch.float64))
    assert off_support_norm(total.sums, masks) == pytest.approx(0.5 * 768 ** 0.5, rel=1e-15)
    total.sums[leaked][0, 0] = float("nan")
    assert math.isnan(off_support_norm(total.sums, masks))  # not finite off the support: not 0.0 either


def test_the_aggregator_keeps_every_coordinate_off_the_support_exactly():
    """Central DP on the aggregator, with a sum that leaks into block 0: the new state equals the old one in
    block 0 bit for bit, moves in block 1, and the round's stats report the leak."""
    from raysim.config import AggregationConfig
    from raysim.engine.aggregator import Aggregator
    from raysim.privacy.central import CentralDP
    from raysim.privacy.plan import plan_central

    support, state = _support("methods.lora_rank=[4]", "methods.trainable_layers=[1]")
    state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in state.items()}
    cfg = load_experiment(None, [*TINY, "cohort.sampling=poisson", "privacy.clip_norm=1.0",
                                 "privacy.noise_multiplier=1.0"])
    plan = plan_central(cfg.privacy, rounds=3, cohort_size=4, population_size=1000)
    aggregator = Aggregator(state=state, cfg=AggregationConfig(), seed=0, support=support,
                            processors=[CentralDP(plan=plan, adaptive=None)])
    partial = PartialSum.zeros_like(state)
    partial.add({k: torch.full_like(v, 0.01) for k, v in state.items()}, weight=1.0)
    new, stats = aggregator.aggregate(1, [partial])
    assert torch.equal(new["transformer.h.0.attn.c_attn.delta"], state["transformer.h.0.attn.c_attn.delta"])
    assert not torch.equal(new["transformer.h.1.attn.c_attn.delta"], state["transformer.h.1.attn.c_attn.delta"])
    assert stats["off_support_norm"] == pytest.approx(0.01 * 768 ** 0.5, rel=1e-6)


@pytest.mark.parametrize("ranks, count", [("[4]", 2 * 48 * 4), ("[4,2]", 2 * 48 * 4), ("[2]", 2 * 48 * 2)])
def test_ffa_noises_b_alone(ranks, count):
    support, state = _support(f"methods.lora_rank={ranks}", "aggregation.lora=ffa")
    assert support.count(state) == count
    assert not any(m.any() for k, m in support.masks(state, round=1).items() if k.endswith("lora_A"))


def test_ffa_averages_the_products_exactly_across_ranks():
    """With A shared, averaging B (zero-padded above each device's rank) gives the mean of the devices' ΔW."""
    from raysim.aggregation.lora import LORA_RULES
    from raysim.methods import width

    rule, (target, *_) = LORA_RULES["ffa"], _support("methods.lora_rank=[4]", "aggregation.lora=ffa")[0].space.targets
    state = rule.initial_state(target, max_rank=4, seed=0)
    a = state[f"{target.name}.lora_A"]
    g = torch.Generator().manual_seed(3)
    devices = [(4, torch.randn(48, 4, generator=g)), (2, torch.randn(48, 2, generator=g))]
    summed = torch.zeros(48, 4, dtype=torch.float64)
    for rank, b in devices:
        [(key, piece, rows, cols)] = rule.update(target, start=(a[:rank], torch.zeros(48, rank)),
                                                 delta=(None, b), state=state, rows=None, cols=None, scale=2.0,
                                                 max_rank=4)
        full, _ = width.scatter(piece, shape=(48, 4), rows=rows, cols=cols)
        summed += full.double()
    state[f"{target.name}.lora_B"] = (summed / 2).float()
    expected = sum(2.0 * b @ a[:rank] for rank, b in devices) / 2
    torch.testing.assert_close(rule.merged(state, target, scale=2.0), expected, rtol=1e-5, atol=1e-6)


def test_server_chosen_embedding_rows_are_all_the_embedding_noise():
    from functools import partial

    from raysim.methods.embeddings import server_rows

    support, state = _support("methods.lora_rank=[4]", "methods.partial_embeddings=[false,true]")
    support.embedding_rows = partial(server_rows, "server_random", count=5, vocab_size=32, unigram=None, seed=0)
    masks = support.masks(state, round=2)
    assert support.count(state, round=2) == 2 * 768 + 5 * 16
    assert torch.equal(masks["transformer.wte.weight"].any(1).nonzero().squeeze(1),
                       server_rows("server_random", count=5, vocab_size=32, unigram=None, seed=0, round=2))
