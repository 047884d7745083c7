"""Every method's mapped-back update is exactly zero off its config's support (a hypothesis property).

Central DP noises the coordinates some config of the method space can change (``Space.support``) and
releases nothing else. That is private only if no device ever sends anything elsewhere: a method's map-back
and its support must agree exactly. Here method spaces are drawn on both families (GPT-2 and Llama-style):
LoRA ranks under every rule (flexlora, hetlora, ffa), full fine-tuning (rank 0), (IA)³ vectors, width pruning (heterofl
and fedrolex's rolling window), federated dropout, top-k blocks, partial embeddings (device-seen and
server-chosen rows, tied and untied heads), sampled output losses, quantized updates and model dropout.
Real devices train on a real worker; each decoded, mapped-back update is read where it joins the partial
sum, and must be exactly 0.0 wherever its own config's support is False.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysim.config import load_experiment
from raysim.engine.processors import UpdateProcessor
from raysim.methods import method_space
from raysim.methods.embeddings import SELECTIONS, server_picks

from conftest import TINY, make_worker, train_unit

FAMILIES = {
    "gpt2": ["model.n_layer=2", "model.n_head=2"],
    "llama": ["model.family=llama", "model.n_layer=2", "model.n_head=4", "model.n_kv_head=2", "model.n_inner=64"],
}
TARGETS = {"gpt2": ["[c_attn]", "[c_attn,c_proj,c_fc]"],
           "llama": ["[q_proj,v_proj]", "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]}


class Recorder(UpdateProcessor):
    """Keeps every device's update as it joins the partial sum (decoded, in full coordinates)."""

    def __init__(self):
        self.updates = []

    def on_device(self, update, *, context, params):
        self.updates.append((context.device_id, context.config, {k: v.clone() for k, v in update.tensors.items()}))
        return update


@st.composite
def method_spaces(draw) -> list[str]:
    family = draw(st.sampled_from(sorted(FAMILIES)))
    rule = draw(st.sampled_from(["flexlora", "hetlora", "ffa"]))
    ranks = draw(st.lists(st.sampled_from([4, 2, 0] if rule == "flexlora" else [4, 2]), min_size=1, max_size=3,
                          unique=True))
    peu = draw(st.sampled_from([[False], [False, True], [True]]))
    selection = draw(st.sampled_from(list(SELECTIONS)))
    rows = 6 if server_picks(selection) else draw(st.sampled_from([None, 6]))
    return [
        *FAMILIES[family],
        f"methods.lora_target_modules={draw(st.sampled_from(TARGETS[family]))}",
        f"aggregation.lora={rule}",
        f"methods.lora_rank=[{','.join(map(str, ranks))}]",
        f"methods.prune_ratio={draw(st.sampled_from(['[0.0]', '[0.0,0.5]', '[0.5]']))}",
        f"methods.pruning={draw(st.sampled_from(['heterofl', 'fedrolex']))}",
        f"methods.dropout_rate={draw(st.sampled_from(['[0.0]', '[0.0,0.5]']))}",
        f"methods.trainable_layers={draw(st.sampled_from(['[null]', '[null,1]', '[1]']))}",
        f"methods.partial_embeddings=[{','.join(str(p).lower() for p in peu)}]",
        f"methods.embedding_selection={selection}",
        f"methods.embedding_rows={'null' if rows is None else rows}",
        f"model.tie_embeddings={draw(st.booleans())}",
        f"methods.output_loss={draw(st.sampled_from(['softmax', 'nce', 'sampled_softmax']))}",
        "methods.noise_samples=8",
        f"methods.bits={draw(st.sampled_from(['[32]', '[32,4]']))}",
        f"model.dropout={draw(st.sampled_from([0.0, 0.1]))}",
        f"methods.adapter={draw(st.sampled_from(['[lora]', '[lora,ia3]', '[ia3]']))}",
    ]


def _check_updates_stay_on_their_support(data) -> None:
    cfg = load_experiment(None, [*TINY, *data.draw(method_spaces(), label="overrides")])
    worker = make_worker(cfg)
    recorder = Recorder()
    worker.processors = [recorder]
    space = method_space(cfg.methods)
    picked = data.draw(st.lists(st.integers(0, len(space) - 1), min_size=1, max_size=4, unique=True), label="configs")
    ids, configs = [], []
    for i, j in enumerate(picked):  # one or two devices per config: two may share a stacked pass
        for d in range(data.draw(st.integers(1, 2), label="devices")):
            ids.append(10 * i + d)
            configs.append(space[j])
    round = data.draw(st.integers(1, 3), label="round")
    state = worker.initial_state()
    train_unit(worker, state, ids, configs, round=round)

    server = server_picks(cfg.methods.embedding_selection)
    assert sorted(d for d, _, _ in recorder.updates) == sorted(ids)
    sent = 0.0
    for device_id, config, update in recorder.updates:
        rows = worker.server_rows(round) if server and config.partial_embeddings else None
        masks = worker.space.support([config], state, pruning=cfg.methods.pruning, round=round, embedding_rows=rows)
        for key, tensor in update.items():
            off = tensor[~masks[key].to(tensor.device)]
            assert torch.count_nonzero(off) == 0, (device_id, config, key, float(off.abs().max()))
            sent += float(tensor.double().pow(2).sum())
    assert sent > 0  # real updates, not zeros everywhere


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_methods_update_is_zero_off_its_support(data):
    _check_updates_stay_on_their_support(data)


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_methods_update_is_zero_off_its_support_over_many_draws(data):
    _check_updates_stay_on_their_support(data)
