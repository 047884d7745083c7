"""Sampled output losses (NCE, sampled softmax) and untied embeddings, on exact cases and a real tiny model."""

import math

import pytest
import torch
import torch.nn.functional as F

from raysim.config import load_experiment
from raysim.methods.coordinates import OUTPUT_EMBEDDING
from raysim.methods.output_loss import OutputLoss, corrected_logits, nce, proposal, sampled_softmax
from raysim.types import DeviceConfig

from conftest import TINY, make_worker, train_unit

EMBEDDING = "transformer.wte.weight"  # GPT-2's token embedding, tied to its output head

V, D = 11, 5


def _case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, D, generator=g, dtype=dtype)  # 2 devices, 7 positions each
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (2, 7), generator=g)
    return hidden, weight, targets


def test_sampled_softmax_over_every_token_with_a_uniform_proposal_is_the_full_softmax():
    hidden, weight, targets = _case(torch.float32)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    samples = torch.arange(V).repeat(2, 1)  # each device's samples: every token once
    log_kq = torch.full((V,), math.log(V) + math.log(1.0 / V))  # log(k q) = log(V * 1/V) = 0
    true, negative = corrected_logits(hidden, weight, None, targets, samples, log_kq)
    ours = sampled_softmax(true, negative, samples.unsqueeze(1) == targets.unsqueeze(-1))
    full = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none").view(2, 7)
    # float32: the same logsumexp over the same V logits of size ~3, summed in another order: a few ulps
    torch.testing.assert_close(ours, full, rtol=0, atol=16 * torch.finfo(torch.float32).eps * 4)
    g_ours = torch.autograd.grad(ours.sum(), [hidden, weight])
    g_full = torch.autograd.grad(full.sum(), [hidden, weight])
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nce_gradient_matches_a_reference_written_position_by_position():
    hidden, weight, targets = _case()
    q = proposal(torch.arange(V))  # (counts + 1) / sum
    k = 4
    samples = torch.multinomial(q, k, replacement=True, generator=torch.Generator().manual_seed(1)).repeat(2, 1)
    params = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    true, negative = corrected_logits(*params, None, targets, samples, math.log(k) + q.log())
    ours = torch.autograd.grad(nce(true, negative).mean(1).sum(), params)

    ref = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    total = 0.0
    for dev in range(2):
        per_device = 0.0
        for pos in range(7):  # Mnih & Teh (2012): log sigma(Δs_t) + Σ_j log(1 - sigma(Δs_j)), Δs = s - log(k q)
            h, t = ref[0][dev, pos], targets[dev, pos]
            delta_t = h @ ref[1][t] - math.log(k * q[t])
            per_device = per_device - torch.log(torch.sigmoid(delta_t))
            for j in samples[dev]:
                delta_j = h @ ref[1][j] - math.log(k * q[j])
                per_device = per_device - torch.log(1 - torch.sigmoid(delta_j))
        total = total + per_device / 7
    want = torch.autograd.grad(total, ref)
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64, the same function: rounding only


def test_a_devices_noise_samples_do_not_depend_on_its_pass():
    loss = OutputLoss(kind="nce", samples=6, q=proposal(torch.arange(V)))
    keyed = [torch.Generator().manual_seed(s) for s in (5, 6)]
    together = loss.draw(keyed)
    assert torch.equal(together[1], loss.draw([torch.Generator().manual_seed(6)])[0])
    assert together.shape == (2, 6) and not torch.equal(together[0], together[1])


def test_noise_samples_follow_the_proposal():
    counts = torch.tensor([0, 0, 98] + [0] * (V - 3))
    draws = OutputLoss(kind="nce", samples=20_000, q=proposal(counts)).draw([torch.Generator().manual_seed(0)])
    share = (draws == 2).double().mean().item()
    assert abs(share - 99 / (98 + V)) < 5 * math.sqrt(0.9 * 0.1 / 20_000)  # 5 standard errors


BIG_VOCAB = [*TINY, "model.vocab_size=2048", "data.source=synthetic", "train.batch_size=8"]


@pytest.mark.parametrize("kind", ["nce", "sampled_softmax"])
def test_sampled_losses_train_and_cut_the_cost_models_memory_and_flops(kind):
    softmax = make_worker(load_experiment(None, BIG_VOCAB))
    sampled = make_worker(load_experiment(None, [*BIG_VOCAB, f"methods.output_loss={kind}",
                                                 "methods.noise_samples=32"]))
    config = DeviceConfig(lora_rank=4)
    full, cheap = softmax.measure(config), sampled.measure(config)
    # (positions, V) logits, log-softmax and gradient against (positions, 1 + 32): most of this step's cost
    assert cheap.activation_bytes < full.activation_bytes / 2
    assert cheap.flops_per_step < full.flops_per_step / 2
    state = sampled.initial_state()
    records, partial = train_unit(sampled, state, [1, 2], [config, config])
    assert torch.isfinite(torch.tensor(records["train_loss"])).all()
    alone, _ = train_unit(sampled, state, [2], [config])  # device 2's samples are its own, whatever its pass
    torch.testing.assert_close(alone["train_loss"][0], records["train_loss"][1], rtol=1e-5, atol=0)
    softmax_records, _ = train_unit(softmax, state, [1, 2], [config, config])
    assert not (records["train_loss"] == softmax_records["train_loss"]).any()


def test_untied_embeddings_train_the_head_rows_without_a_backward_below_the_trained_block():
    two = [*TINY, "model.n_layer=2", "methods.partial_embeddings=[true]"]
    tied = make_worker(load_experiment(None, two))
    untied = make_worker(load_experiment(None, [*two, "model.tie_embeddings=false"]))
    assert tied.space.embedding == EMBEDDING and untied.space.embedding == OUTPUT_EMBEDDING
    state = untied.initial_state()
    assert OUTPUT_EMBEDDING in state and EMBEDDING not in state
    config = DeviceConfig(lora_rank=4, trainable_layers=1, partial_embeddings=True)
    # tied: the input rows' gradient runs back through block 0; untied: the head needs only the last hidden state
    assert untied.measure(config).activation_bytes < tied.measure(config).activation_bytes
    _, partial = train_unit(untied, state, [4], [config])
    changed = partial.sums[OUTPUT_EMBEDDING].abs().sum(1).nonzero().squeeze(1)
    seen = torch.unique(untied.dataset.device_examples(4))
    assert len(changed) and set(changed.tolist()) <= set(seen.tolist())
    assert torch.equal(untied.base.state[EMBEDDING], untied._submodels[untied.space.structure(config)]
                       .lm.get_parameter(EMBEDDING).cpu())  # the input table stays the base model's
