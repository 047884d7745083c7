import numpy as np
import pytest
import torch

from raysim.config import load_experiment
from raysim.emulation.costmodel import Measurement, device_costs
from raysim.types import DeviceConfig, DeviceDraws

from conftest import TINY, make_worker


def _draws(**kw):
    base = dict(device_id=np.array([0]), device_class=np.array(["x"], dtype=object),
                train_flops_per_s=np.array([1e9]), memory_bytes=np.array([1e9]), uplink_bps=np.array([8e6]),
                downlink_bps=np.array([16e6]), rtt_s=np.array([0.05]), dropout_prob=np.array([0.0]))
    base.update({k: np.array([v]) for k, v in kw.items()})
    return DeviceDraws(**base)


def test_device_times_follow_the_profile():
    m = Measurement(flops_per_step=2e9, activation_bytes=0, param_bytes=0, trainable_params=0,
                    bytes_down=2_000_000, bytes_up=1_000_000)
    c = device_costs(_draws(), [m], local_steps=3)
    assert c.compute_s[0] == pytest.approx(6.0)
    assert c.download_s[0] == pytest.approx(0.05 + 1.0)
    assert c.upload_s[0] == pytest.approx(0.05 + 1.0)
    assert c.total_s[0] == pytest.approx(8.1)


def test_peak_memory_counts_weights_trainable_state_and_activations():
    m = Measurement(flops_per_step=1, activation_bytes=1000, param_bytes=400, trainable_params=10,
                    bytes_down=0, bytes_up=0)
    assert m.peak_memory_bytes == 400 + 10 * 12 + 1000


def test_a_device_with_too_little_memory_does_not_fit():
    m = Measurement(flops_per_step=1, activation_bytes=10**9, param_bytes=0, trainable_params=0,
                    bytes_down=0, bytes_up=0)
    assert not device_costs(_draws(memory_bytes=5e8), [m], local_steps=1).fits(_draws(memory_bytes=5e8))[0]


@pytest.fixture(scope="module")
def worker():
    return make_worker(load_experiment(None, TINY))


def test_lora_step_costs_about_two_forward_passes(worker):
    # Frozen weights need input gradients only (one more GEMM each), no weight gradients.
    m = worker.measure(DeviceConfig(lora_rank=4))
    cfg = worker.cfg
    tokens = cfg.train.batch_size * cfg.data.seq_len
    h, v, layers = cfg.model.n_embd, cfg.model.vocab_size, cfg.model.n_layer
    forward_dense = 2 * tokens * (layers * (h * 3 * h + h * h + 2 * h * 4 * h) + h * v)
    assert 1.5 * forward_dense < m.flops_per_step < 2.5 * forward_dense


def test_flops_are_linear_in_batch_size(worker):
    small = worker.measure(DeviceConfig(lora_rank=4))
    worker.cfg.train.batch_size *= 2
    try:
        large = worker.measure(DeviceConfig(lora_rank=4))
    finally:
        worker.cfg.train.batch_size //= 2
    assert large.flops_per_step == 2 * small.flops_per_step
    assert 1.8 * small.activation_bytes < large.activation_bytes < 2.2 * small.activation_bytes


def test_measurement_leaves_the_model_unchanged(worker):
    model = worker.submodel(DeviceConfig(lora_rank=4)).lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    worker.measure(DeviceConfig(lora_rank=4))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_bytes_are_the_trainable_state_size(worker):
    m = worker.measure(DeviceConfig(lora_rank=4))
    assert m.bytes_up == m.bytes_down == 4 * m.trainable_params


def _plain_step_costs(cfg, base, *, peft_config) -> tuple[float, int]:
    """One step of the base model with a peft adapter (``peft_config``) as plain transformers + peft run it
    (eager attention, the model's own loss, AdamW): FLOPs, and weights + gradients + Adam moments + the tensors
    autograd saves, each storage once. Written here without raysim's model building or cost code."""
    from peft import get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(base.config)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config),
                                             attn_implementation="eager")
    model.load_state_dict(base.state)
    model.config.use_cache = False
    model = get_peft_model(model, peft_config)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.data.seq_len),
                          generator=torch.Generator().manual_seed(5))
    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return float(counter.get_total_flops()), weights + trainable * (4 + 8) + sum(saved.values())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_reference_recipe_prices_a_plain_transformers_and_peft_step(family):
    """Whatever raysim computes with (fused GELU, chunked loss), a config is priced as the plain step."""
    overrides = {"gpt2": ["methods.lora_target_modules=[c_attn,c_fc]", "model.dropout=0.1"],
                 "llama": ["model.family=llama", "model.n_head=4", "model.n_kv_head=2", "model.n_inner=64",
                           "methods.lora_target_modules=[q_proj,v_proj,up_proj]"]}[family]
    worker = make_worker(load_experiment(None, [*TINY, "model.n_layer=2", *overrides]))
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "up_proj"]}[family]
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=family == "gpt2")
    flops, memory = _plain_step_costs(worker.cfg, worker.base, peft_config=lora)
    m = worker.measure(DeviceConfig(lora_rank=4))
    assert m.flops_per_step == flops
    assert m.peak_memory_bytes == memory


def test_the_fused_recipe_keeps_less_for_backward_than_the_reference(worker):
    """Same step, same FLOPs up to the GELU's and the loss's elementwise work; the chunked loss keeps the
    hidden states' gradient (positions x width) instead of the log-probabilities (positions x vocabulary)."""
    import dataclasses

    reference = worker.measure(DeviceConfig(lora_rank=4))
    fused_cfg = dataclasses.replace(worker.cfg, costs=dataclasses.replace(worker.cfg.costs, recipe="fused"))
    fused = make_worker(fused_cfg).measure(DeviceConfig(lora_rank=4))
    assert fused.activation_bytes < reference.activation_bytes
    assert fused.param_bytes == reference.param_bytes and fused.trainable_params == reference.trainable_params


def test_local_dp_sgd_holds_one_gradient_per_example():
    cfg = load_experiment(None, [*TINY, "privacy.local.enabled=true"])
    dp, plain = make_worker(cfg).measure(DeviceConfig(lora_rank=4)), make_worker(load_experiment(None, TINY)).measure(
        DeviceConfig(lora_rank=4))
    assert dp.per_example_gradients == cfg.train.batch_size
    assert dp.peak_memory_bytes - plain.peak_memory_bytes == 4 * cfg.train.batch_size * plain.trainable_params
