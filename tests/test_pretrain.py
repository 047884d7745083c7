import pytest
import torch

from raysim.config import PretrainConfig, load_experiment
from raysim.data.build import build_dataset
from raysim.models.build import initial_base_model, instantiate
from raysim.models.pretrain import cache_key, lr_at, pretrain

from conftest import TINY


def _eval_loss(base, x):
    with torch.no_grad():
        return instantiate(base).eval()(input_ids=x, labels=x).loss.item()


def test_pretraining_lowers_public_loss_and_is_cached(tmp_path):
    cfg = load_experiment(None, TINY)
    public = build_dataset(cfg).public_examples()
    base = initial_base_model(cfg.model, seed=0)
    settings = PretrainConfig(steps=30, batch_size=8, lr=1e-2, cache_dir=str(tmp_path))
    trained = pretrain(base, public, settings, seed=0, progress=False)
    assert _eval_loss(trained, public) < _eval_loss(base, public) - 0.1
    cached = list((tmp_path / "pretrained").glob("*.pt"))
    assert len(cached) == 1
    again = pretrain(base, public, settings, seed=0, progress=False)
    assert all(torch.equal(again.state[k], trained.state[k]) for k in trained.state)
    assert again.origin == trained.origin and len(list((tmp_path / "pretrained").glob("*.pt"))) == 1


def test_zero_steps_keeps_the_initial_model(tmp_path):
    cfg = load_experiment(None, TINY)
    base = initial_base_model(cfg.model, seed=0)
    assert pretrain(base, build_dataset(cfg).public_examples(), PretrainConfig(steps=0, cache_dir=str(tmp_path)),
                    seed=0, progress=False) is base


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [lr_at(s, steps=100, lr=1.0) for s in range(100)]
    assert lrs[0] < lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert abs(lrs[-1] - 0.1) < 0.01


def test_pretraining_says_one_line_when_it_starts_even_without_progress_bars(tmp_path, capsys):
    cfg = load_experiment(None, TINY)
    base = initial_base_model(cfg.model, seed=0)
    settings = PretrainConfig(steps=2, batch_size=4, cache_dir=str(tmp_path))
    pretrain(base, build_dataset(cfg).public_examples(), settings, seed=0, progress=False)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("raysim: pre-training a base model on ") and "for 2 steps" in err[0]
    pretrain(base, build_dataset(cfg).public_examples(), settings, seed=0, progress=False)
    assert capsys.readouterr().err == ""  # cached: nothing to wait for


def test_pretraining_that_diverges_stops_and_caches_nothing(tmp_path):
    cfg = load_experiment(None, TINY)
    base = initial_base_model(cfg.model, seed=0)
    settings = PretrainConfig(steps=20, batch_size=4, lr=1e30, cache_dir=str(tmp_path))
    with pytest.raises(ArithmeticError, match="pre-training diverged at step"):
        pretrain(base, build_dataset(cfg).public_examples(), settings, seed=0, progress=False)
    assert not list(tmp_path.rglob("*.pt"))


def test_the_cache_key_changes_with_the_recipe_or_a_library_version_and_only_then(monkeypatch):
    """Weights cached by another recipe, or computed by another torch or transformers, are not reused."""
    import transformers

    import raysim.models.pretrain

    base = initial_base_model(load_experiment(None, TINY).model, seed=0)
    public, settings = torch.zeros((2, 16), dtype=torch.long), PretrainConfig(steps=2)
    key = cache_key(base, public, settings, seed=0)
    assert cache_key(base, public, settings, seed=0) == key
    for module, name, value in [(raysim.models.pretrain, "RECIPE_VERSION", raysim.models.pretrain.RECIPE_VERSION + 1),
                                (torch, "__version__", "0.0.1"), (transformers, "__version__", "0.0.1")]:
        with monkeypatch.context() as patch:
            patch.setattr(module, name, value)
            assert cache_key(base, public, settings, seed=0) != key, name
    assert cache_key(base, public, settings, seed=0) == key
