import pytest
import torch

from raysim.config import MethodsConfig, ModelConfig
from raysim.errors import ConfigError
from raysim.models.build import add_lora, initial_base_model, instantiate

TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)


def test_same_seed_builds_identical_weights_and_another_seed_does_not():
    a, b, c = (initial_base_model(TINY, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_a_local_model_folder_loads_with_its_weights(tmp_path):
    original = instantiate(initial_base_model(TINY, seed=3))
    original.save_pretrained(tmp_path / "m")
    loaded = initial_base_model(ModelConfig(path=str(tmp_path / "m")), seed=0)
    assert loaded.origin == str(tmp_path / "m") and loaded.vocab_size == 64
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(instantiate(loaded)(x).logits, original.eval()(x).logits)


def test_a_folder_without_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.path"):
        initial_base_model(ModelConfig(path=str(tmp_path)), seed=0)


def test_lora_trains_only_the_adapters_and_starts_as_the_base_model():
    base = initial_base_model(TINY, seed=0)
    model = add_lora(instantiate(base), rank=4, methods=MethodsConfig(), seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        torch.testing.assert_close(model(x).logits, instantiate(base)(x).logits)


def test_model_seed_fixes_the_base_model_across_run_seeds():
    fixed = ModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16, seed=7)
    a, b = initial_base_model(fixed, seed=0), initial_base_model(fixed, seed=1)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    free = ModelConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    c, d = initial_base_model(free, seed=0), initial_base_model(free, seed=1)
    assert not torch.equal(c.state["transformer.wte.weight"], d.state["transformer.wte.weight"])
