"""How raysim computes faster never changes what a device is emulated to cost.

Every speed-up of the emulator (the fused GELU, the chunked head loss, glibc keeping freed memory, several
devices in one grouped pass) is switched off, alone and all together, in a run of mixed methods (LoRA ranks,
full fine-tuning, pruning, federated dropout, top-k blocks, partial embeddings, 8-bit updates, model dropout,
over-selection that makes stragglers): every cost column of ``devices.parquet`` must be byte-identical to the run
with all of them on. Costs are measured on a model built for the measurement alone, under ``costs.recipe``.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from raysim.config import load_experiment
from raysim.engine.run import run_experiment
from raysim.policies import Policy

from conftest import TINY, make_worker

COSTS = ["flops", "peak_memory_bytes", "memory_bytes", "compute_s", "download_s", "upload_s", "finish_s",
         "bytes_up", "bytes_down", "status"]
MIXED = [*TINY, "rounds=1", "model.n_layer=2", "model.dropout=0.1", "cohort.size=8",
         "methods.lora_rank=[4,0]", "methods.prune_ratio=[0.0,0.5]", "methods.dropout_rate=[0.0,0.25]",
         "methods.trainable_layers=[null,1]", "methods.partial_embeddings=[false,true]", "methods.bits=[8]",
         "methods.lora_target_modules=[c_attn,c_fc]", "ray.tokens_per_pass=256"]
OFF = {
    "fused_activations": ["speedups.fused_activations=false"],
    "chunked_loss": ["speedups.chunked_loss=false"],
    "keep_freed_memory": ["speedups.keep_freed_memory=false"],
    "grouped_passes": ["ray.tokens_per_pass=0"],
}


@pytest.fixture(scope="module")
def fast_run(ray_session, tmp_path_factory):
    return _costs(tmp_path_factory.mktemp("fast"))


class EveryConfig(Policy):
    """Device i gets config i mod |space|: a round of many configs, none priced before it is assigned."""

    def __init__(self, space):
        self.space = space

    def assign(self, devices, state):
        return [self.space[int(d) % len(self.space)] for d in devices.device_id]


def _costs(tmp, *overrides):
    run_dir = run_experiment(load_experiment(None, [*MIXED, f"output_dir={tmp / 'run'}", *overrides]),
                             make_policy=lambda context: EveryConfig(context.space))
    table = pq.read_table(run_dir / "devices.parquet")
    return {name: table[name].to_pylist() for name in COSTS}


def test_the_mixed_run_has_every_status_it_prices(fast_run):
    assert {"ok", "straggler"} <= set(fast_run["status"])
    assert len(set(fast_run["peak_memory_bytes"])) > 2  # several configs, several prices


def test_every_speedup_off_at_once_leaves_every_cost_column_as_it_was(fast_run, tmp_path):
    assert _costs(tmp_path, *(o for off in OFF.values() for o in off)) == fast_run


@pytest.mark.slow
@pytest.mark.parametrize("speedup", sorted(OFF))
def test_each_speedup_off_leaves_every_cost_column_as_it_was(fast_run, tmp_path, speedup):
    assert _costs(tmp_path, *OFF[speedup]) == fast_run


def test_speedups_off_train_the_plain_transformers_modules():
    from transformers.activations import NewGELUActivation

    from raysim.models.fastops import TanhGELU
    from raysim.types import DeviceConfig

    def activations(*overrides):
        lm = make_worker(load_experiment(None, [*TINY, *overrides])).submodel(DeviceConfig(lora_rank=4)).lm
        return {type(m) for m in lm.modules()} & {TanhGELU, NewGELUActivation}

    assert activations() == {TanhGELU}
    assert activations("speedups.fused_activations=false") == {NewGELUActivation}
