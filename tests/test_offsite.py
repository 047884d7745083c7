"""Offsite-tuning emulators (raysim.offsite, methods.emulator): their structure, their training on public text,
what they cost, the one-time download, the two evaluations and one-line errors for bad specs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raysim.config import EmulatorConfig, load_experiment
from raysim.errors import ConfigError
from raysim.offsite import layout as layouts
from raysim.offsite.emulator import Harmonizer, LowRank, Skip, low_rank, svd_rank
from raysim.types import DeviceConfig

from conftest import TINY, make_worker, train_unit

DEEP = [*TINY, "model.n_layer=6", "methods.lora_rank=[4]"]


def _spec(**kw) -> EmulatorConfig:
    return EmulatorConfig(**kw)


def _emulators(tmp_path, **specs) -> list[str]:
    """Overrides defining ``specs`` (name -> {key: value}) and listing them in methods.emulator."""
    out = [f"pretrain.cache_dir={tmp_path}", f"methods.emulator=[null,{','.join(specs)}]"]
    for name, spec in specs.items():
        out += [f"emulators.{name}.{k}={v}" for k, v in spec.items()]
    return out


# -- which blocks ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("middle, keep, expected", [
    (4, 2, (0, 3)), (5, 3, (0, 2, 4)), (4, 3, (0, 2, 3)),
    (6, 3, (0, 2, 5)),  # 2.5 rounds half to even, as Python's round in the Offsite-Tuning code
    (6, 4, (0, 2, 3, 5)), (4, 1, (0,)), (4, 4, (0, 1, 2, 3)),
])
def test_uniform_drop_keeps_offsite_tunings_indices(middle, keep, expected):
    lay, bad = layouts.layout(_spec(bottom=2, top=1, keep=keep), middle + 3)
    assert bad is None and lay.middle == tuple(range(2, 2 + middle))
    assert layouts.uniform(lay) == tuple(2 + i for i in expected)


def test_layout_adapters_default_keep_and_groups():
    lay, _ = layouts.layout(_spec(bottom=2, top=2), 8)
    assert lay.adapters == (0, 1, 6, 7) and lay.middle == (2, 3, 4, 5) and lay.keep == 2
    assert layouts.groups(lay) == [(2, 3), (4, 5)]
    lay, _ = layouts.layout(_spec(bottom=1, top=0, keep=2), 6)
    assert lay.keep == 2 and layouts.groups(lay) == [(1, 2, 3), (4, 5)]
    assert layouts.most_important({1: 0.5, 2: 0.5, 3: 0.1}, (1, 2, 3), 1) == (1,)  # ties: the lower block


def test_every_kind_has_its_builder():
    from raysim.offsite.build import _Owner

    assert set(layouts.KINDS) == {"uniform", "distilled", "importance", "harmonizer"}
    assert all(callable(getattr(_Owner, kind, None)) for kind in layouts.KINDS)


# -- the modules -------------------------------------------------------------------------------------------------

def test_harmonizer_shapes_and_zero_start():
    h = Harmonizer(32, 8)
    assert h.down.weight.shape == (8, 32) and h.up.weight.shape == (32, 8)
    assert h.down.bias is None and h.up.bias is None
    x = torch.randn(2, 5, 32)
    assert torch.equal(h(x), x)  # W_up starts at zero: a harmonizer starts as a dropped block
    assert torch.equal(Skip()(x, None, attention_mask=None), x)


def test_svd_rank_and_factors_are_the_best_rank_r_approximation():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(32, 96, generator=g), torch.randn(96, generator=g)  # a Conv1D's (in, out) weight
    assert svd_rank((96, 32), 0.5) == 16 and svd_rank((96, 32), 0.01) == 1
    f = low_rank(w, b, rank=16, transposed=True)
    assert f["down.weight"].shape == (16, 32) and f["up.weight"].shape == (96, 16) and torch.equal(f["up.bias"], b)
    m = LowRank(32, 96, 16, bias=True)
    m.load_state_dict(f)
    x = torch.randn(4, 32, generator=g)
    approx = (f["up.weight"] @ f["down.weight"]).double()
    # Eckart-Young: the error of the best rank-16 approximation is the norm of the dropped singular values
    s = torch.linalg.svdvals(w.T.double())
    err = torch.linalg.matrix_norm(w.T.double() - approx)
    # factors stored in float32: each product entry within a few float32 ulps of its float64 value
    tol = 64 * torch.finfo(torch.float32).eps * float(s[0])
    assert float(err) == pytest.approx(float(s[16:].norm()), abs=tol)
    assert torch.allclose(m(x).double(), x.double() @ approx.T + b.double(), atol=tol * 8)


def test_kd_is_offsite_tunings_normalised_squared_error():
    from raysim.offsite.build import kd

    t, s = torch.full((2, 3), 2.0), torch.ones(2, 3)
    assert float(kd(t, s)) == 0.25  # ((2 - 1) / rms 2)^2, exactly representable
    assert float(kd(t, t)) == 0.0


# -- built on the public split -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from raysim.data.build import build_dataset
    from raysim.models.build import initial_base_model
    from raysim.offsite.build import build_emulators

    tmp = tmp_path_factory.mktemp("emulators")
    cfg = load_experiment(None, [*DEEP, *_emulators(tmp, u={"kind": "uniform", "bottom": 1},
                                                    d={"kind": "distilled", "bottom": 1, "steps": 40},
                                                    i={"kind": "importance", "bottom": 1},
                                                    h={"kind": "harmonizer", "bottom": 1, "steps": 20,
                                                       "harmonizer_rank": 8, "svd_fraction": 0.5})])
    dataset = build_dataset(cfg)
    base = build_emulators(cfg, initial_base_model(cfg.model, seed=0), dataset.public_examples(), seed=0)
    return cfg, dataset, base


def test_emulators_have_their_golden_structure(built):
    from raysim.models.build import instantiate
    from raysim.offsite.emulator import install

    cfg, _, base = built
    e = base.emulators
    assert e["u"].kept == (1, 3) and e["u"].dropped == (2,) and e["u"].layout.adapters == (0, 4, 5)
    assert e["d"].kept == (1, 3) and set(e["d"].state) == {n for n in base.state if n.startswith(
        ("transformer.h.1.", "transformer.h.3."))}
    scores = dict(e["i"].scores)
    assert e["i"].kept == layouts.most_important(scores, (1, 2, 3), 2)
    h = e["h"]
    assert h.harmonized == tuple(b for b in (1, 2, 3) if b not in h.kept) and len(h.kept) == 2
    assert {b for b in h.kept} <= {1, 2, 3} and h.kept[-1] == 3  # groups (1, 2) and (3,): 3 is its group's only
    assert dict(h.ranks) == {f"transformer.h.{b}.attn.{p}": 16 for b in h.kept for p in ("c_attn", "c_proj")}
    model = install(instantiate(base), h, base.architecture, width=32)
    blocks = model.transformer.h
    for b in h.harmonized:
        assert isinstance(blocks[b], Harmonizer) and blocks[b].down.weight.shape == (8, 32)
        assert blocks[b].up.weight.abs().sum() > 0  # trained away from the zero start
    for b in h.kept:
        assert isinstance(blocks[b].attn.c_attn, LowRank) and blocks[b].attn.c_attn.down.weight.shape == (16, 32)
    assert blocks[0].attn.c_attn.weight.shape == (32, 96)  # adapter blocks are the base's own


def test_importance_scores_are_the_public_loss_each_drop_adds(built):
    from raysim.models.build import instantiate

    cfg, dataset, base = built
    model = instantiate(base).eval()
    x = dataset.public_examples()[:64]
    with torch.no_grad():
        full = model(input_ids=x, labels=x).loss.item()
        model.transformer.h[2] = Skip()
        dropped = model(input_ids=x, labels=x).loss.item()
    # the build scores in batches of 16, weighted: the same mean up to float32 summation order
    assert dict(base.emulators["i"].scores)[2] == pytest.approx(dropped - full, abs=1e-5 * max(1.0, full))


def test_distillation_brings_the_middle_closer_to_the_full_models(built):
    from raysim.models.build import instantiate
    from raysim.offsite.build import kd
    from raysim.offsite.emulator import install

    cfg, dataset, base = built
    x = dataset.public_examples()[:32]
    outs = {}
    for name in ("teacher", "u", "d"):
        model = instantiate(base).eval()
        if name != "teacher":
            model = install(model, base.emulators[name], base.architecture, width=32)
        model.transformer.h[3].register_forward_hook(lambda m, a, o, name=name: outs.setdefault(name, o))
        with torch.no_grad():
            model(input_ids=x)
    assert kd(outs["teacher"], outs["d"]) < kd(outs["teacher"], outs["u"])


def test_emulators_are_cached_by_content(built):
    from raysim.offsite.build import build, cache_key

    cfg, dataset, base = built
    public = dataset.public_examples()
    spec = cfg.emulators["d"]
    files = sorted((Path(cfg.pretrain.cache_dir) / "emulators").glob("*.pt"))
    assert len(files) == 4 and f"{base.emulators['d'].key}.pt" in {f.name for f in files}
    again = build("d", spec, base, public, cache_dir=cfg.pretrain.cache_dir, seed=0, progress=False)
    assert again.key == base.emulators["d"].key
    assert all(torch.equal(again.state[k], v) for k, v in base.emulators["d"].state.items())
    assert cache_key(base, public, spec, seed=0) != cache_key(base, public, _spec(kind="distilled", bottom=1,
                                                                                   steps=41), seed=0)


def test_emulator_devices_cost_less_and_change_only_their_adapter_blocks(built):
    cfg, dataset, base = built
    worker = make_worker(cfg, base=base)
    full, emu = DeviceConfig(lora_rank=4), DeviceConfig(lora_rank=4, emulator="u")
    m_full, m_emu = worker.measure(full), worker.measure(emu)
    assert m_emu.flops_per_step < m_full.flops_per_step and m_emu.param_bytes < m_full.param_bytes
    assert m_full.setup_bytes_down == 0
    frozen = sum(p.numel() * 4 for n, p in worker.submodel(emu).lm.named_parameters() if not p.requires_grad)
    assert m_emu.setup_bytes_down == frozen
    state = worker.initial_state()
    _, partial = train_unit(worker, state, [1, 2], [emu, emu])
    changed = {k.split(".")[2] for k, v in partial.sums.items() if v.abs().sum() > 0}
    assert changed == {"0", "4", "5"}  # blocks 0, 4 and 5 only
    masks = worker.space.support([emu], state, pruning="heterofl", round=1)
    assert {k.split(".")[2] for k, m in masks.items() if m.any()} == {"0", "4", "5"}  # central DP's support
    assert all(m.all() for k, m in masks.items() if k.split(".")[2] in {"0", "4", "5"})


# -- bad specs ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["methods.emulator=[x]"], "methods.emulator[0]"),
    (["methods.emulator=[e]", "emulators.e.kind=squeeze"], "emulators.e.kind"),
    (["methods.emulator=[e]", "emulators.e.keep=5"], "emulators.e.keep"),
    (["methods.emulator=[e]", "emulators.e.bottom=3", "emulators.e.top=3"], "emulators.e.top"),
    (["methods.emulator=[e]", "emulators.e.bottom=-1"], "emulators.e.bottom"),
    (["methods.emulator=[e]", "emulators.e.svd_fraction=1.5"], "emulators.e.svd_fraction"),
    (["methods.emulator=[e]", "emulators.e.harmonizer_rank=0"], "emulators.e.harmonizer_rank"),
    (["methods.emulator=[e]", "emulators.e.lr=0"], "emulators.e.lr"),
    (["methods.emulator=[e]", "emulators.e.kind=uniform", "methods.prune_ratio=[0.0,0.5]"], "methods.emulator"),
])
def test_bad_emulator_specs_get_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [*DEEP, *overrides])
    assert key in str(err.value) and "\n" not in str(err.value)


# -- a run -------------------------------------------------------------------------------------------------------

def test_a_run_charges_the_download_once_and_evaluates_both_models(ray_session, tmp_path):
    from raysim.api import run

    cfg = load_experiment(None, [*DEEP, "population=iot-edge", "population_size=6", "cohort.size=4",
                                 "cohort.over_selection=1.0",
                                 "eval.every=1", f"output_dir={tmp_path / 'run'}",
                                 *_emulators(tmp_path, full={"kind": "uniform", "bottom": 1, "keep": 3}),
                                 "methods.emulator=[full]"])
    out = run(cfg)
    devices = pq.read_table(out / "devices.parquet").to_pandas().sort_values(["round", "device_id"])
    reached = devices[devices.status != "unavailable"]
    first = ~reached.duplicated("device_id")
    assert (reached.setup_bytes_down[first] > 0).all() and (reached.setup_bytes_down[~first] == 0).all()
    assert (~first).any()  # six devices, always on, three rounds of four: some come back
    rounds = pq.read_table(out / "rounds.parquet").to_pandas()
    # the emulator keeps every middle block: alone, it is the full model, bit for bit
    assert np.array_equal(rounds.emulator_eval_loss, rounds.eval_loss)
    assert np.array_equal(rounds.emulator_eval_accuracy, rounds.eval_accuracy)
    assert all(math.isfinite(v) for v in rounds.emulator_eval_loss)


def test_downloads_are_charged_once_and_survive_a_checkpoint():
    from raysim.emulation.costmodel import Downloads

    d = Downloads()
    ids, names = np.array([3, 4, 5]), [None, "a", "b"]
    assert d.first(ids, [None, None, None]) is None
    assert d.first(ids, names).tolist() == [False, True, True]
    d.record(ids, np.array(names, dtype=object), np.array([0, 10, 0]))  # 5 paid nothing (say, unavailable)
    assert d.first(ids, names).tolist() == [False, False, True]
    assert d.first(ids, ["a", "a", "b"]).tolist() == [True, False, True]
    assert d.first(np.array([4]), ["b"]).tolist() == [True]  # held per emulator
    again = Downloads.of(d.state())
    assert again.holding == {"a": {4}} and again.state() == {"a": [4]}
