"""The method seam: every per-device method is one registered class, and everything that lists the methods is
derived from the registry (raysim/methods/base.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from raysim.config import MethodsConfig, load_experiment
from raysim.errors import ConfigError
from raysim.io.results import DEVICES_SCHEMA
from raysim.methods import METHODS, DeviceConfig, method_space
from raysim.methods.base import config_key

RAYSIM = Path(__file__).resolve().parents[1] / "raysim"


def test_every_registered_method_is_a_config_axis_a_device_config_field_and_a_device_column():
    axes = [f.name for f in dataclasses.fields(MethodsConfig)][:len(METHODS)]
    assert axes == list(METHODS) == [f.name for f in dataclasses.fields(DeviceConfig)]
    for key, method in METHODS.items():
        assert getattr(MethodsConfig(), key) == [method.default] == [getattr(DeviceConfig(), key)]
        assert DEVICES_SCHEMA.field(key).type == method.dtype


def test_the_method_space_is_the_product_of_the_axes_in_list_order():
    cfg = load_experiment(None, ["methods.lora_rank=[8,4]", "methods.bits=[32,8]", "methods.prune_ratio=[0.0,0.5]"])
    space = method_space(cfg.methods)
    assert len(space) == 8 and space[0] == DeviceConfig()
    assert [(c.lora_rank, c.prune_ratio, c.bits) for c in space[:3]] == [(8, 0.0, 32), (8, 0.0, 8), (8, 0.5, 32)]


def test_configs_sort_method_by_method_in_registration_order():
    a, b = DeviceConfig(lora_rank=4, bits=32), DeviceConfig(lora_rank=8, bits=4)
    assert config_key(a) < config_key(b)  # rank is registered before bits
    assert config_key(DeviceConfig(trainable_layers=None)) < config_key(DeviceConfig(trainable_layers=1))


def test_rl_feature_slots_are_distinct_and_contiguous_from_zero():
    slots = sorted(m.feature_slot for m in METHODS.values() if m.feature_slot is not None)
    assert slots == list(range(len(slots)))


@pytest.mark.parametrize("override, key, message", [
    ("methods.lora_rank=[4,64]", "methods.lora_rank[1]", "rank 64 must be in [0, layer width 32]"),
    ("methods.prune_ratio=[1.0]", "methods.prune_ratio[0]", "must be in [0, 1)"),
    ("methods.trainable_layers=[3]", "methods.trainable_layers[0]", "must be null (all) or in [1, model.n_layer=2]"),
    ("methods.bits=[17]", "methods.bits[0]", "must be in [1, 16] or 32 (unquantized)"),
    ("methods.adapter=[lora,prefix]", "methods.adapter[1]", "must be 'lora' or 'ia3'"),
    ("methods.dropout_rate=[]", "methods.dropout_rate", "needs at least one value"),
])
def test_a_bad_axis_value_is_one_error_naming_its_key(override, key, message):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, ["model.n_embd=32", "model.n_layer=2", override])
    assert err.value.field == key and message in str(err.value)


@pytest.mark.parametrize("key", ["lora_rank", "prune_ratio", "dropout_rate", "trainable_layers",
                                 "partial_embeddings"])
def test_each_method_key_is_named_in_at_most_three_modules(key):
    """Nothing outside a method's own modules lists it: the config schema, the method space, the work key, the
    device columns and the rl features are derived from the registry. (``bits`` is also the quantizer's own
    argument and ``adapter`` a word of peft's, so a search cannot tell their uses as keys apart.)"""
    word = re.compile(rf"\b{key}\b")
    named = {p.relative_to(RAYSIM).as_posix() for p in RAYSIM.rglob("*.py") if word.search(p.read_text())}
    assert len(named) <= 3, sorted(named)


def test_device_columns_come_from_the_registry():
    from raysim.methods.base import columns

    configs = [DeviceConfig(lora_rank=4, trainable_layers=None), DeviceConfig(lora_rank=2, trainable_layers=1)]
    cols = columns(configs)
    assert list(cols) == list(METHODS)
    assert cols["trainable_layers"].tolist() == [-1, 1] and cols["lora_rank"].dtype == np.int32
    table = pa.Table.from_pydict(cols, schema=pa.schema([(k, METHODS[k].dtype) for k in METHODS]))
    assert table.num_rows == 2
