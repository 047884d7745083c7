import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.loss.loss_utils import ForCausalLMLoss

from raysim.models.grouped import (
    KEYED_ATTENTION,
    DropoutKeys,
    KeyedDropout,
    install_keyed_dropout,
    keyed,
    per_device_loss,
    stacked,
)


def test_per_device_loss_is_each_devices_causal_lm_loss():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (6, 9), generator=g)
    logits = torch.randn(6, 9, 50, generator=g)
    losses = per_device_loss(logits, tokens, devices=3)
    for d in range(3):
        rows = slice(2 * d, 2 * d + 2)
        expected = ForCausalLMLoss(logits[rows], tokens[rows], vocab_size=50)
        torch.testing.assert_close(losses[d], expected)


def test_stacked_linear_gives_each_device_its_own_weights_and_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    x = torch.randn(2 * 5, 4)
    stack = nn.Parameter(torch.randn(2, 3, 4))
    with stacked(model, ["0.weight"], [stack]):
        out = model(x)
    out.pow(2).sum().backward()
    for d in range(2):
        w = stack[d].detach().clone().requires_grad_()
        alone = x[5 * d:5 * d + 5] @ w.T
        alone.pow(2).sum().backward()
        torch.testing.assert_close(out[5 * d:5 * d + 5], alone)
        torch.testing.assert_close(stack.grad[d], w.grad)
    assert "forward" not in vars(model[0])  # the plain module is back


def test_keyed_dropout_masks_come_from_each_devices_generator():
    keys = DropoutKeys()
    drop = KeyedDropout(0.5, keys)
    x = torch.ones(4, 100)
    with keyed(keys, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]):
        both = drop(x)
    with keyed(keys, [torch.Generator().manual_seed(2)]):
        second = drop(x[2:])
    torch.testing.assert_close(both[2:], second)
    assert set(both.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(both[:2], both[2:])


def test_installing_keyed_dropout_replaces_every_dropout_and_routes_attention():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8))
    install_keyed_dropout(model)
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == KEYED_ATTENTION
    model.eval()
    x = torch.randint(0, 32, (2, 8))
    reference = GPT2LMHeadModel(model.config.__class__(**{**model.config.to_dict(), "attn_pdrop": 0.0}))
    reference.load_state_dict(model.state_dict())
    reference.eval()
    torch.testing.assert_close(model(input_ids=x).logits, reference(input_ids=x).logits, rtol=1e-5, atol=1e-5)
