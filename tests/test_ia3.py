"""(IA)³ as a second adapter family (raysim/methods/ia3.py): peft's vectors on peft's default targets, the exact
start from the global model whichever family a device trains, costs priced as plain peft prices them, and
private runs that mix LoRA and (IA)³ devices under every policy."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysim.config import load_experiment
from raysim.methods import method_space
from raysim.types import DeviceConfig

from conftest import TINY, make_worker

FAMILIES = {
    "gpt2": ["model.n_layer=2"],
    "llama": ["model.family=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_inner=64"],
}
IA3 = DeviceConfig(adapter="ia3", lora_rank=None)


def _worker(family: str, *overrides: str):
    return make_worker(load_experiment(None, [*TINY, *FAMILIES[family], "methods.adapter=[lora,ia3]",
                                              "methods.lora_rank=[4,0]", *overrides]))


def test_an_ia3_config_has_no_rank_and_the_adapter_axis_multiplies_only_lora():
    cfg = load_experiment(None, [*TINY, "methods.adapter=[lora,ia3]", "methods.lora_rank=[4,2]"])
    space = method_space(cfg.methods)
    assert [(c.adapter, c.lora_rank) for c in space] == [("lora", 4), ("ia3", None), ("lora", 2)]  # product order


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_ia3_device_trains_peft_ia3_vectors_on_peft_default_targets(family):
    from peft import IA3Config, get_peft_model

    from raysim.models.build import instantiate

    worker = _worker(family)
    trained = set(worker.submodel(IA3).params)
    reference = get_peft_model(instantiate(worker.base), IA3Config(fan_in_fan_out=family == "gpt2"))
    expected = {n.removeprefix("base_model.model.") for n, p in reference.named_parameters() if p.requires_grad}
    assert trained == expected and trained  # peft's own choice of targets, from its model-type mapping


def _random_state(worker, seed: int):
    """A global state far from its start: a rank-2 ΔW on every LoRA target (a rank-4 device starts from it
    exactly) and (IA)³ vectors around 1; the projections' biases made non-zero (GPT-2 starts them at zero), so
    that an output rescaling must rescale them too (every submodel reloads them with the state)."""
    g = torch.Generator().manual_seed(seed)
    for name, _, _ in worker.space.projections():
        if (bias := worker.base.state.get(f"{name}.bias")) is not None:
            bias.add_(0.1 * torch.randn(bias.shape, generator=g))
    state = worker.initial_state()
    for key, value in state.items():
        if key.endswith(".delta"):
            out_features, in_features = value.shape
            state[key] = 0.05 * torch.randn(out_features, 2, generator=g) @ torch.randn(2, in_features, generator=g)
        elif key.endswith(".ia3"):
            state[key] = 1.0 + 0.2 * torch.randn(value.shape, generator=g)
    return state


def _start_logits(worker, config, state, batch):
    sub = worker.submodel(config)
    sub.load_frozen(state, None, version=object())
    initial = sub.initial(state, None, {})
    sub.load_fixed(initial)
    with torch.no_grad():
        for name, p in sub.params.items():
            p.copy_(initial[name])
        sub.lm.eval()
        return sub.lm(input_ids=batch).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_device_starts_from_the_global_model_whichever_family_it_trains(family):
    worker = _worker(family, "methods.lora_target_modules=" + ("[c_attn,c_fc]" if family == "gpt2" else
                                                               "[k_proj,v_proj,up_proj]"))
    state = _random_state(worker, seed=3)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, worker.vocab_size, (4, worker.cfg.data.seq_len), generator=g)
    model = worker.held_out.model
    model.load_frozen(state, None, version=object())
    model.lm.eval()
    with torch.no_grad():
        reference = model.lm(input_ids=batch).logits
    # float32 throughout; the paths differ only in association (a vector merged into a weight, or applied to the
    # activations it scales): a few ulps per product, well inside 1e-4 of logits of order 1
    for config in (IA3, DeviceConfig(lora_rank=4), DeviceConfig(lora_rank=0)):
        torch.testing.assert_close(_start_logits(worker, config, state, batch), reference, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(reference, _start_logits(worker, IA3, worker.initial_state(), batch), atol=1e-2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_ia3_step_is_priced_as_plain_transformers_and_peft_price_it(family):
    from peft import IA3Config
    from test_costmodel import _plain_step_costs

    worker = _worker(family)
    flops, memory = _plain_step_costs(worker.cfg, worker.base, peft_config=IA3Config(fan_in_fan_out=family == "gpt2"))
    m = worker.measure(IA3)
    assert m.flops_per_step == flops
    assert m.peak_memory_bytes == memory
    assert m.trainable_params == sum(v.numel() for k, v in worker.initial_state().items() if k.endswith(".ia3"))


def _private_run(tiny_cfg, tmp_path, policy: str):
    from raysim.engine.run import run_experiment

    cfg = tiny_cfg("model.n_layer=2", "methods.adapter=[lora,ia3]", "methods.lora_rank=[4,2]", f"policy={policy}",
                   "cohort.sampling=poisson", "cohort.size=6", "privacy.clip_norm=0.05",
                   "privacy.noise_multiplier=0.5", "rounds=2")
    run_dir = run_experiment(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pydict()
    devices = pq.read_table(run_dir / "devices.parquet").to_pydict()
    return summary, rounds, devices


def _policy_file(tmp_path, name: str) -> str:
    params = {"uniform": "{config: {adapter: ia3}}",
              "tiered": "{classes: {phone-low: {adapter: ia3}, phone-mid: {lora_rank: 2}}, default: {}}"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"policy: {name}\nparams: {params.get(name, '{}')}\n")
    return str(path)


def test_a_private_run_mixing_lora_and_ia3_devices_releases_only_what_it_noises(ray_session, tiny_cfg, tmp_path):
    summary, rounds, devices = _private_run(tiny_cfg, tmp_path, "random")
    assert summary["status"] == "finished"
    assert set(devices["adapter"]) == {"lora", "ia3"}
    ranks = {(a, r) for a, r in zip(devices["adapter"], devices["lora_rank"])}
    assert ("ia3", -1) in ranks and {r for a, r in ranks if a == "lora"} <= {4, 2}
    assert rounds["off_support_norm"] == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["uniform", "tiered", "greedy_fit", "random", "rl"])
def test_every_policy_runs_a_private_lora_and_ia3_population(ray_session, tiny_cfg, tmp_path, policy):
    summary, rounds, devices = _private_run(tiny_cfg, tmp_path, _policy_file(tmp_path, policy))
    assert summary["status"] == "finished" and rounds["off_support_norm"] == [0.0, 0.0]
    assert np.isfinite(rounds["train_loss"]).all()
    if policy in ("uniform", "tiered"):
        assert "ia3" in devices["adapter"]
