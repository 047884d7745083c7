"""Llama-style decoders (RMSNorm, rotary positions, SwiGLU, grouped-query attention) under every method.

The tiny model has 4 query heads and 2 key-value heads of 8 dimensions: width pruning keeps or drops whole
key-value groups (a key head, a value head and their 2 query heads). Its weights are ``nn.Linear``'s,
(out, in), where GPT-2's Conv1D stores (in, out): the state's ``ΔW`` is (out, in) for both.

Tolerances: where an aggregate is compared with the same mean taken here, both sum the same float32
products in float64 in another order, so they agree to float32's rounding of the devices' tensors
(rtol 1e-5, atol 1e-8 on values of order 1e-2 to 1), as in tests/test_methods.py.
"""

import json

import pytest
import torch

from raysim.aggregation.rules import combine, weighted_mean
from raysim.config import load_experiment
from raysim.errors import ConfigError
from raysim.methods.lora import product
from raysim.models.build import initial_base_model, instantiate
from raysim.types import DeviceConfig

from conftest import TINY, make_worker, new_state, train_unit, trained_alone

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = [*TINY, "model.family=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_inner=64",
         f"methods.lora_target_modules=[{','.join(PROJECTIONS)}]"]
BLOCK = "model.layers.1"
EMBEDDING = "model.embed_tokens.weight"


def _worker(*overrides):
    return make_worker(load_experiment(None, [*LLAMA, *overrides]))


@pytest.fixture(scope="module")
def llama():
    return _worker("methods.lora_rank=[4,2,0]", "methods.partial_embeddings=[false,true]")


def _name(kind: str, layer: int = 1) -> str:
    part = "self_attn" if kind in PROJECTIONS[:4] else "mlp"
    return f"model.layers.{layer}.{part}.{kind}"


def test_model_keys_build_a_grouped_query_llama_with_rmsnorm_rotary_and_swiglu():
    cfg = load_experiment(None, LLAMA)
    base = initial_base_model(cfg.model, seed=0)
    c = base.config
    assert c["model_type"] == "llama" and c["num_key_value_heads"] == 2 and c["num_attention_heads"] == 4
    assert c["intermediate_size"] == 64 and c["hidden_act"] == "silu" and c["tie_word_embeddings"] is True
    model = instantiate(base)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"LlamaRMSNorm", "LlamaRotaryEmbedding"} <= kinds and "LayerNorm" not in kinds
    assert model.get_submodule("model.layers.0.self_attn.k_proj").weight.shape == (16, 32)  # 2 kv heads x 8
    again = initial_base_model(cfg.model, seed=0)
    assert all(torch.equal(base.state[k], again.state[k]) for k in base.state)


def _assert_width_submodel_is_the_masked_full_model(worker, config, device_ids) -> set[int]:
    """The submodel's logits equal the full model's with the dropped query heads' columns of o_proj and the
    dropped units' columns of down_proj zeroed: what a dropped unit contributes to the residual stream.
    Rounding: the submodel's matmuls sum fewer terms (zeros left out), float32, logits of order 1: atol 1e-5.
    Returns the attention units some device kept in block 0."""
    sizes = worker.space.sizes
    state = worker.initial_state()
    sub = worker.submodel(config)
    with torch.no_grad():  # the adapters start at B = 0 (other tests may have trained this submodel)
        for name, p in sub.params.items():
            p.zero_() if "lora_B" in name else None
    masked = instantiate(worker.base).eval()
    kept = set()
    for device_id in device_ids:
        slices = worker._slices(config, round=1, device_id=device_id)
        kept |= set(slices[0][0].tolist())
        sub.load_frozen(state, slices, version=(1, device_id))
        for layer, (units, mlp) in enumerate(slices):
            block = masked.model.layers[layer]
            keep_heads = torch.zeros(sizes.n_head, dtype=torch.bool)
            for u in units.tolist():  # query heads u*group ... u*group + group - 1 read key-value head u
                keep_heads[u * sizes.group:(u + 1) * sizes.group] = True
            keep_units = torch.zeros(sizes.inner, dtype=torch.bool)
            keep_units[mlp] = True
            with torch.no_grad():
                block.self_attn.o_proj.weight.copy_(worker.base.state[f"model.layers.{layer}.self_attn.o_proj.weight"]
                                                    * keep_heads.repeat_interleave(sizes.head_dim))
                block.mlp.down_proj.weight.copy_(worker.base.state[f"model.layers.{layer}.mlp.down_proj.weight"]
                                                 * keep_units)
        tokens = torch.randint(0, sizes.vocab_size, (2, 16), generator=torch.Generator().manual_seed(device_id))
        with torch.no_grad():
            torch.testing.assert_close(sub.lm.eval()(input_ids=tokens).logits, masked(input_ids=tokens).logits,
                                       rtol=0, atol=1e-5)
    return kept


def test_a_width_submodel_is_the_full_model_without_the_dropped_key_value_groups(llama):
    """Federated dropout keeps one of the two key-value groups and half the MLP units, drawn per device."""
    kept = _assert_width_submodel_is_the_masked_full_model(llama, DeviceConfig(lora_rank=4, dropout_rate=0.5),
                                                           device_ids=(3, 4, 5, 6))
    assert kept == {0, 1}  # both groups were kept by some device: the check covers each


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_llama_style_folders_load_and_cut_into_the_same_submodels(tmp_path, model_type):
    """Mistral and Qwen2 (q, k, v with biases) folders: the family's every projection is a target, and a
    width submodel (3 key-value groups of 2 query heads, 2 kept) is the masked full model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=48, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                                  max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    worker = make_worker(load_experiment(None, [*TINY, f"model.path={tmp_path}", "methods.lora_rank=[4]",
                                                f"methods.lora_target_modules=[{','.join(PROJECTIONS)}]"]))
    assert worker.space.family == "llama" and len(worker.space.targets) == 2 * len(PROJECTIONS)
    assert ("model.layers.0.self_attn.q_proj.bias" in worker.base.state) == (model_type == "qwen2")
    kept = _assert_width_submodel_is_the_masked_full_model(worker, DeviceConfig(lora_rank=4, dropout_rate=0.34),
                                                           device_ids=(1, 2, 3, 4))
    assert kept == {0, 1, 2}


def test_mixed_ranks_on_every_projection_aggregate_to_the_weighted_sum_of_products(llama):
    state = llama.initial_state()
    configs = {3: DeviceConfig(lora_rank=4), 8: DeviceConfig(lora_rank=2), 5: DeviceConfig(lora_rank=4)}
    alone = {d: trained_alone(llama, state, d, c) for d, c in configs.items()}
    _, partial = train_unit(llama, state, list(configs), list(configs.values()), round=1)
    new = new_state(state, partial)
    total = sum(n for _, n in alone.values())
    for kind in PROJECTIONS:
        name = _name(kind)
        want = sum(n / total * product(lora_A=p[f"{name}.lora_A.default.weight"].double(),
                                       lora_B=p[f"{name}.lora_B.default.weight"].double(), scale=2.0)
                   for p, n in alone.values())
        assert want.abs().max() > 0, kind
        torch.testing.assert_close(new[f"{name}.delta"], want, rtol=1e-5, atol=1e-8)


def test_full_weights_train_in_one_grouped_pass_to_fedavg_of_the_weights(llama):
    """nn.Linear weights stack (raysim/models/grouped.py), so two rank-0 devices share one pass; each gets what it
    would alone, and ΔW (out, in) is the weights' mean change with no transpose."""
    config = DeviceConfig(lora_rank=0)
    assert llama.submodel(config).stackable
    state = llama.initial_state()
    alone = [trained_alone(llama, state, d, config) for d in (1, 2)]
    _, partial = train_unit(llama, state, [1, 2], [config, config], round=1)
    new = new_state(state, partial)
    total = sum(n for _, n in alone)
    for kind in ("q_proj", "down_proj"):
        name = _name(kind)
        w0 = llama.base.state[f"{name}.weight"].double()
        want = sum(n / total * (p[f"{name}.weight"].double() - w0) for p, n in alone)
        torch.testing.assert_close(new[f"{name}.delta"], want, rtol=1e-5, atol=1e-8)


def test_pruned_devices_change_only_the_group_and_units_they_held(llama):
    """prune_ratio 0.5 keeps key-value group 0 (its 2 query heads) and MLP units 0-31 (HeteroFL's prefix)."""
    state = llama.initial_state()
    config = DeviceConfig(lora_rank=4, prune_ratio=0.5)
    alone = [trained_alone(llama, state, d, config) for d in (1, 2)]
    _, partial = train_unit(llama, state, [1, 2], [config, config], round=1)
    new = new_state(state, partial)
    total = sum(n for _, n in alone)
    held = {"q_proj": (slice(0, 16), slice(None)), "k_proj": (slice(0, 8), slice(None)),
            "o_proj": (slice(None), slice(0, 16)), "gate_proj": (slice(0, 32), slice(None)),
            "down_proj": (slice(None), slice(0, 32))}
    for kind, where in held.items():
        name = _name(kind)
        want = sum(n / total * product(lora_A=p[f"{name}.lora_A.default.weight"].double(),
                                       lora_B=p[f"{name}.lora_B.default.weight"].double(), scale=2.0)
                   for p, n in alone)
        torch.testing.assert_close(new[f"{name}.delta"][where], want, rtol=1e-5, atol=1e-8)
        rest = torch.ones_like(new[f"{name}.delta"], dtype=torch.bool)
        rest[where] = False
        assert rest.any() and torch.equal(new[f"{name}.delta"][rest], state[f"{name}.delta"][rest].double()), kind


def test_frozen_blocks_keep_their_value_and_embeddings_change_only_in_seen_rows(llama):
    state = llama.initial_state()
    config = DeviceConfig(lora_rank=4, trainable_layers=1, partial_embeddings=True)
    _, partial = train_unit(llama, state, [4], [config], round=1)
    new = new_state(state, partial)
    for kind in PROJECTIONS:
        assert torch.equal(new[f"{_name(kind, 0)}.delta"], state[f"{_name(kind, 0)}.delta"].double()), kind
    assert not torch.equal(new[f"{_name('q_proj')}.delta"], state[f"{_name('q_proj')}.delta"].double())
    changed = (new[EMBEDDING] != state[EMBEDDING].double()).any(dim=1)
    seen = torch.unique(llama.dataset.device_examples(4))
    assert changed.any() and set(changed.nonzero().squeeze(1).tolist()) <= set(seen.tolist())


def test_untied_llama_trains_the_heads_rows():
    worker = _worker("methods.partial_embeddings=[true]", "model.tie_embeddings=false")
    assert worker.space.embedding == "lm_head.weight"
    state = worker.initial_state()
    assert "lm_head.weight" in state and EMBEDDING not in state
    _, partial = train_unit(worker, state, [4], [DeviceConfig(lora_rank=4, partial_embeddings=True)], round=1)
    changed = partial.sums["lm_head.weight"].abs().sum(1).nonzero().squeeze(1)
    seen = torch.unique(worker.dataset.device_examples(4))
    assert len(changed) > 0 and set(changed.tolist()) <= set(seen.tolist())


def test_cost_model_follows_the_real_llama_submodel(llama):
    full = llama.measure(DeviceConfig(lora_rank=4))
    pruned = llama.measure(DeviceConfig(lora_rank=4, prune_ratio=0.5))
    top = llama.measure(DeviceConfig(lora_rank=4, trainable_layers=1))
    low_rank = llama.measure(DeviceConfig(lora_rank=2))
    four_bits = llama.measure(DeviceConfig(lora_rank=4, bits=4))
    assert pruned.flops_per_step < full.flops_per_step and pruned.param_bytes < full.param_bytes
    assert pruned.peak_memory_bytes < full.peak_memory_bytes
    assert top.activation_bytes < full.activation_bytes and top.flops_per_step < full.flops_per_step
    assert low_rank.trainable_params == full.trainable_params // 2 and low_rank.bytes_up == full.bytes_up // 2
    tensors = len(llama.submodel(DeviceConfig(lora_rank=4)).params)
    assert tensors == 2 * 2 * len(PROJECTIONS)  # A and B on every projection of both blocks
    assert four_bits.bytes_up == full.trainable_params // 2 + 8 * tensors  # nibbles plus (lo, step) per tensor
    # rank-4 adapters on 2 x 7 projections: r (in + out) each
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
              "gate_proj": (64, 32), "up_proj": (64, 32), "down_proj": (32, 64)}
    assert full.trainable_params == 2 * sum(4 * (o + i) for o, i in shapes.values())


def test_fewer_key_value_heads_hold_fewer_weights():
    mha = _worker("model.n_kv_head=4").measure(DeviceConfig(lora_rank=4))
    mqa = _worker("model.n_kv_head=1").measure(DeviceConfig(lora_rank=4))
    # k_proj and v_proj shrink from 32 to 8 outputs in both blocks: 2 x 2 x 24 x 32 weights, and their adapters'
    # B (rank 4): 2 x 2 x 24 x 4
    assert mha.param_bytes - mqa.param_bytes == 4 * (2 * 2 * 24 * 32 + 2 * 2 * 24 * 4)


def test_llama_updates_aggregate_to_the_same_bits_on_one_or_two_actors(ray_session):
    import numpy as np
    import ray

    from raysim.data.build import build_dataset
    from raysim.engine.pool import DevicePool

    cfg = load_experiment(None, [*LLAMA, "methods.lora_rank=[4,2,0]", "methods.partial_embeddings=[false,true]",
                                 "methods.embedding_rows=16", "model.dropout=0.1"])
    base, dataset = ray.put(initial_base_model(cfg.model, seed=0)), ray.put(build_dataset(cfg))
    configs = [DeviceConfig(lora_rank=4), DeviceConfig(lora_rank=2, prune_ratio=0.5, bits=4),
               DeviceConfig(lora_rank=0, dropout_rate=0.25, trainable_layers=1),
               DeviceConfig(lora_rank=4, partial_embeddings=True, bits=8), DeviceConfig(lora_rank=0),
               DeviceConfig(lora_rank=0), DeviceConfig(lora_rank=4)]
    means = []
    for n in (1, 2):
        pool = DevicePool(cfg=cfg, base=base, dataset=dataset, num_actors=n)
        _, partials = pool.train(ray.put(pool.initial_state()), round=1, device_ids=np.arange(10, 17),
                                 configs=configs, flops=np.ones(7))
        means.append(weighted_mean(combine(ray.get(partials))))
        pool.close()
    for k in means[0]:  # the units are the cohort's, added in unit order: equal, not close
        assert torch.equal(means[0][k], means[1][k]), k


def test_a_llama_run_finishes_with_finite_results(ray_session, tiny_cfg):
    from raysim.engine.run import run_experiment

    cfg = tiny_cfg(*LLAMA[len(TINY):], "methods.lora_rank=[4,0]", "methods.prune_ratio=[0.0,0.5]", "policy=random",
                   "methods.bits=[32,8]", "rounds=2", "eval.every=1")
    run_dir = run_experiment(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert all(torch.isfinite(torch.tensor(summary["final"][k])) for k in ("eval_loss", "eval_accuracy"))


def test_a_llama_folder_gives_sizes_vocabulary_and_tokenizer(tmp_path):
    """model.path: the folder's config decides family and sizes (model.* are ignored), its tokenizer.json
    tokenises the corpus, and its vocabulary bounds the tokenizer."""
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from raysim.data.build import build_dataset
    from raysim.data.corpus import SHIPPED

    folder = tmp_path / "llama"
    cfg = load_experiment(None, [*LLAMA, "model.vocab_size=512", "model.n_positions=64"])
    instantiate(initial_base_model(cfg.model, seed=1)).save_pretrained(folder)
    texts = pq.read_table(SHIPPED, columns=["text"]).column("text").to_pylist()[:200]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    run = load_experiment(None, ["data.source=python-docs", "data.seq_len=32", f"model.path={folder}",
                                 "model.n_layer=9", "model.vocab_size=64", "methods.lora_target_modules=[q_proj]"])
    base = initial_base_model(run.model, seed=0)
    assert base.sizes.n_layer == 2 and base.sizes.n_kv_head == 2 and base.vocab_size == 512
    dataset = build_dataset(run)
    assert dataset.vocab_size == tok.get_vocab_size() <= 512  # the folder's tokenizer, not BPE at model.vocab_size

    from raysim.methods.coordinates import Space

    with pytest.raises(ConfigError, match=r"methods.lora_target_modules\[0\].*llama has no projection 'c_attn'"):
        Space.build(load_experiment(None, [f"model.path={folder}", "methods.lora_target_modules=[c_attn]"]), base)


def test_an_unsupported_architecture_is_one_line_naming_model_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 100}))
    cfg = load_experiment(None, [f"model.path={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        initial_base_model(cfg.model, seed=0)
    message = str(err.value)
    assert "model.path" in message and "'t5' is not supported" in message and "llama" in message
    assert "\n" not in message


def test_a_projection_the_family_lacks_names_the_key():
    with pytest.raises(ConfigError, match=r"methods.lora_target_modules\[1\].*llama has no projection 'c_fc'"):
        load_experiment(None, [*LLAMA, "methods.lora_target_modules=[q_proj,c_fc]"])
    with pytest.raises(ConfigError, match="model.n_kv_head"):
        load_experiment(None, [*LLAMA, "model.n_kv_head=3"])
