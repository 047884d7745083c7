"""Public data that resembles the users' (raysim/synth/): the pool, the steps, pre-training sources, re-filtering."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest
import torch

from raysim.config import load_experiment
from raysim.data.corpus import PUBLIC_USER, SHIPPED
from raysim.errors import ConfigError
from raysim.models.build import initial_base_model
from raysim.models.pretrain import Mixture, cache_key
from raysim.synth import lm
from raysim.synth.pool import POOL, Overlap, chunks, digest
from raysim.synth.sources import pretraining_data
from raysim.synth.steps import Synth

from conftest import TINY

TEXT = [*TINY, "data.source=python-docs", "model.vocab_size=512", "data.max_examples=16", "data.eval_users=4",
        "eval.max_examples=32", "pretrain.steps=20", "pretrain.batch_size=8"]
SMALL_SYNTH = ["synth.max_pool=400", "synth.generator.n_layer=1", "synth.generator.n_embd=32",
               "synth.generator.n_head=2", "synth.generator.vocab_size=512", "synth.generator.seq_len=32",
               "synth.generator.steps=20", "synth.generated=48", "synth.max_new_tokens=12", "synth.prefix_tokens=6",
               "synth.domain_steps=5", "synth.transformed=40"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def users() -> dict[str, list[str]]:
    """Every private user's texts in the shipped corpus (all users but the public split)."""
    table = pq.read_table(SHIPPED).to_pydict()
    out: dict[str, list[str]] = {}
    for user, text in zip(table["user"], table["text"]):
        if user != PUBLIC_USER:
            out.setdefault(user, []).append(text)
    return out


@pytest.fixture(scope="module")
def synth(cache):
    """The first three steps, made once on a small pool with tiny models."""
    s = Synth(load_experiment(None, [*TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}"]))
    s.made = {step: getattr(s, step)() for step in ("generated", "filtered", "transformed")}
    return s


# -- the pool ----------------------------------------------------------------------------------------------------

def test_the_shipped_pool_shares_no_run_of_words_with_any_user(users):
    overlaps = Overlap([t for texts in users.values() for t in texts])
    pool = pq.read_table(POOL).to_pydict()
    assert len(pool["text"]) > 10_000 and set(pool["kind"]) == {"docstring", "comment", "readme", "license"}
    assert [t for t in pool["text"] if overlaps(t)] == []
    some_user = next(iter(users.values()))[0]
    assert overlaps(some_user) and overlaps(some_user.split(".")[0][:60])  # the check can fail


def test_chunks_cut_at_blank_lines_and_keep_every_paragraph():
    text = "\n\n".join(f"paragraph {i} " + "x" * 200 for i in range(7))
    out = chunks(text, limit=600)
    assert all(len(c) <= 600 for c in out) and len(out) == 4
    assert "\n\n".join(out) == text


# -- the steps read public text only -----------------------------------------------------------------------------

def test_no_private_users_text_reaches_the_generator_the_filter_or_the_transform(synth, users):
    """Every text a step read is hashed (Synth.read); none is a private user's text or a chunk of one."""
    private = {digest(t) for texts in users.values() for t in texts}
    private |= {digest(c) for texts in users.values() for t in texts for c in chunks(t)}
    assert synth.read and not (synth.read & private)
    # what they read is the pool, the prompts and synth's own generated texts: nothing else
    made = {digest(t) for t in [*synth.pool, *synth.prompts, *synth.made["generated"].texts]}
    assert synth.read <= made
    assert {digest(t) for t in synth.pool} <= synth.read  # the log does record what the steps read


def test_steps_make_what_they_promise(synth):
    s, made = synth.s, synth.made
    assert len(made["generated"].texts) == s.generated
    prompts = synth.prompts  # each in turn: prompt j begins the texts j, j + len(prompts), ..., made together
    expected = [p for j, p in enumerate(prompts) for _ in range(j, s.generated, len(prompts))]
    assert all(t.startswith(p) for t, p in zip(made["generated"].texts, expected))
    assert len(made["filtered"].texts) == round(s.filter_fraction * len(synth.pool))
    assert set(made["filtered"].texts) <= set(synth.pool)
    assert len(made["transformed"].texts) == s.transformed
    starts = {synth.tokenizer.decode(synth.encode([t])[0][:s.prefix_tokens]) for t in synth.pool}
    assert all(any(t.startswith(p) for p in starts) for t in made["transformed"].texts[:5])
    for step, m in made.items():
        assert m.about["texts"] == len(m.texts) and m.about["sha256"], step


def test_steps_are_cached_by_content_and_reproducible(synth, cache):
    again = Synth(load_experiment(None, [*TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}"]))
    assert again.generated().texts == synth.made["generated"].texts  # from the cache
    files = sorted((cache / "synth").glob("generated-*.parquet"))
    assert len(files) == 1
    fresh = Synth(load_experiment(None, [*TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}"]))
    fresh.generator  # noqa: B018
    files[0].unlink()  # made again from the same (cached) generator: the same texts, draw for draw
    assert fresh.generated().texts == synth.made["generated"].texts
    other = Synth(load_experiment(None, [*TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}", "synth.seed=1"]))
    assert other.prompts == synth.prompts and other.generated().texts != synth.made["generated"].texts


def test_filter_ranks_by_the_cross_entropy_difference(synth):
    ids = synth.encode(synth.pool)
    width = synth.s.generator.seq_len
    score = (lm.nll(synth.generator, ids, eos=synth.eos, width=width)
             - lm.nll(synth.domain, ids, eos=synth.eos, width=width))
    kept = synth.made["filtered"].texts
    threshold = synth.made["filtered"].about["threshold"]
    by_text = dict(zip(synth.pool, score))
    assert min(by_text[t] for t in kept) == pytest.approx(threshold)
    assert max(v for t, v in by_text.items() if t not in set(kept)) <= threshold


# -- the models' two uses ----------------------------------------------------------------------------------------

def test_nll_is_the_models_own_next_token_loss(synth):
    ids = synth.encode(synth.pool[:3])
    text = ids[0][:synth.s.generator.seq_len - 1]
    got = lm.nll(synth.generator, [text], eos=synth.eos, width=synth.s.generator.seq_len)[0]
    x = torch.tensor([[*text, synth.eos]])
    with torch.no_grad():
        want = synth.generator(input_ids=x, labels=x).loss.item()
    assert got == pytest.approx(want, rel=1e-5)  # float32 logits summed in float64 vs transformers' float32 mean


def test_sampling_is_keyed_and_top_p_near_zero_is_greedy(synth):
    prompt = torch.tensor([synth.encode(["Return the"])[0]] * 3)
    kw = dict(eos=synth.eos, max_new_tokens=6, temperature=1.0, seed=0, purpose="t")
    a = lm.sample(synth.generator, prompt, top_p=0.9, batch=0, **kw)
    assert a == lm.sample(synth.generator, prompt, top_p=0.9, batch=0, **kw)
    greedy = lm.sample(synth.generator, prompt, top_p=1e-9, batch=1, **kw)
    x = prompt[:1]
    with torch.no_grad():
        for token in greedy[0][:3]:
            assert token == int(synth.generator(input_ids=x).logits[0, -1].argmax())
            x = torch.cat([x, torch.tensor([[token]])], dim=1)


# -- pre-training sources ----------------------------------------------------------------------------------------

def test_mixture_draws_by_weight_and_is_keyed():
    parts = (torch.zeros((10, 4), dtype=torch.long), torch.ones((1000, 4), dtype=torch.long))
    mix = Mixture(parts, (3.0, 1.0))
    g = torch.Generator().manual_seed(0)
    rows = mix.draw(20_000, g)
    share = float((rows[:, 0] == 0).double().mean())
    assert abs(share - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 20_000)  # binomial: five standard deviations
    assert torch.equal(rows, mix.draw(20_000, torch.Generator().manual_seed(0)))


def test_null_sources_and_the_public_split_alone_pretrain_the_same(cache):
    from raysim.data.build import build_dataset

    plain = load_experiment(None, [*TEXT, f"pretrain.cache_dir={cache}"])
    listed = load_experiment(None, [*TEXT, f"pretrain.cache_dir={cache}", "pretrain.sources=[{name: public}]"])
    data, about = pretraining_data(plain, build_dataset(plain), progress=False)
    same, listed_about = pretraining_data(listed, build_dataset(listed), progress=False)
    assert about is None and torch.equal(data, same)
    base = initial_base_model(plain.model, seed=0)
    assert cache_key(base, data, plain.pretrain, seed=0) == cache_key(base, same, listed.pretrain, seed=0)
    assert listed_about["sources"][0]["sequences"] == len(same)


def test_oracle_and_file_sources(cache, tmp_path):
    import pyarrow as pa

    from raysim.data.build import build_dataset
    from raysim.data.text import _public_names, load_user_texts
    from raysim.data.tokenizer import content_hash

    file = tmp_path / "extra.parquet"
    pq.write_table(pa.table({"text": ["Return the sum of the two numbers. " * 20] * 8}), file)
    cfg = load_experiment(None, [*TEXT, f"pretrain.cache_dir={cache}", "data.public_fraction=0.2",
                                 "pretrain.sources=[{name: oracle, weight: 2}, {name: file, weight: 1, "
                                 f"path: {file}}}]"])
    dataset = build_dataset(cfg)
    data, about = pretraining_data(cfg, dataset, progress=False)
    assert isinstance(data, Mixture) and data.weights == (2.0, 1.0)
    oracle, from_file = data.parts
    # the oracle is the users data.public_fraction sets aside: their texts, and none of them trains or evaluates
    texts = load_user_texts(cfg).texts
    set_aside = _public_names(cfg, texts) - {PUBLIC_USER}
    assert set_aside and not set_aside & (set(dataset.users) | set(dataset.eval_users))
    assert about["sources"][0]["sha256"] == content_hash([t for u in sorted(set_aside) for t in texts[u]])
    assert len(oracle) == about["sources"][0]["sequences"] > 0
    assert [s["name"] for s in about["sources"]] == ["oracle", "file"] and about["sources"][1]["texts"] == 8
    assert len(from_file) == about["sources"][1]["sequences"] > 0


@pytest.mark.parametrize("overrides, key", [
    (["pretrain.sources=[{name: webtext}]"], "pretrain.sources[0].name"),
    (["pretrain.sources=[{name: public}, {name: generated, weight: 1}]"], "pretrain.sources[0].weight"),
    (["pretrain.sources=[{name: public, weight: -1}]"], "pretrain.sources[0].weight"),
    (["pretrain.sources=[{name: file}]"], "pretrain.sources[0].path"),
    (["pretrain.sources=[{name: public, path: x.parquet}]"], "pretrain.sources[0].path"),
    (["pretrain.sources=[{name: refiltered}]"], "pretrain.sources[0].run"),
    (["pretrain.sources=[{name: oracle}]"], "pretrain.sources[0].name"),
    (["pretrain.sources=[]"], "pretrain.sources"),
    (["pretrain.steps=0", "pretrain.sources=[{name: public}]"], "pretrain.sources"),
    (["pretrain.sources=[{name: generated}]", "synth.filter_fraction=0"], "synth.filter_fraction"),
    (["pretrain.sources=[{name: generated}]", "synth.max_new_tokens=64"], "synth.max_new_tokens"),
])
def test_bad_source_specs_get_one_line(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_experiment(None, [*TEXT, *overrides])
    assert f"override: {key}:" in str(err.value) and "\n" not in str(err.value)


def test_a_missing_file_or_unfinished_run_is_one_line_at_the_start(tmp_path, cache):
    from raysim.data.build import build_dataset

    for source, key in ((f"{{name: file, path: {tmp_path / 'none.parquet'}}}", "none.parquet"),
                        (f"{{name: refiltered, run: {tmp_path}}}", "pretrain.sources[0].run")):
        cfg = load_experiment(None, [*TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}",
                                     f"pretrain.sources=[{source}]"])
        with pytest.raises(ConfigError) as err:
            pretraining_data(cfg, build_dataset(cfg), progress=False)
        assert key in str(err.value) and "\n" not in str(err.value)


# -- a run on synth's data, then the re-filter with its DP model ---------------------------------------------------

@pytest.fixture(scope="module")
def dp_run(ray_session, cache, tmp_path_factory):
    from raysim.api import run

    out = tmp_path_factory.mktemp("runs") / "dp"
    cfg = load_experiment(None, [*TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}", f"output_dir={out}",
                                 "population=iot-edge", "population_size=40", "cohort.size=8", "rounds=2",
                                 "cohort.sampling=poisson", "cohort.over_selection=1.0", "eval.every=1",
                                 "privacy.noise_multiplier=0.5",
                                 "privacy.clip_norm=1.0", "privacy.delta=1e-3",
                                 "pretrain.sources=[{name: public, weight: 1}, {name: generated, weight: 1}]"])
    return run(cfg)


def test_a_run_reports_its_sources_and_how_synth_made_them(dp_run, synth):
    summary = json.loads((dp_run / "summary.json").read_text())
    sources = summary["synth"]["sources"]
    assert [s["name"] for s in sources] == ["public", "generated"]
    generated = sources[1]
    assert generated["texts"] == synth.s.generated and generated["sequences"] > 0
    assert generated["sha256"] == synth.made["generated"].about["sha256"]
    assert "prompts" in generated["how"] and generated["generator"]["steps"] == synth.s.generator.steps
    assert summary["initial"]["eval_accuracy"] > 0 and summary["status"] == "finished"


def test_refilter_scores_with_the_runs_own_models(dp_run, synth):
    from raysim.data.build import build_dataset
    from raysim.synth.sources import run_models

    models = run_models(str(dp_run), field="run")
    rounds = pq.read_table(dp_run / "rounds.parquet").to_pandas()
    cfg = load_experiment(dp_run / "config.yaml")
    held_out = build_dataset(cfg).eval_examples()
    with torch.no_grad():
        logits = models.loaded[2](input_ids=held_out).logits[:, :-1].double()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held_out[:, 1:].flatten()).item()
    # the DP model rebuilt from the run directory scores the held-out users as the run's last evaluation did
    assert loss == pytest.approx(float(rounds.eval_loss.iloc[-1]), rel=1e-4)  # float32 sums in other orders
    made = synth.refiltered(models)
    candidates = synth.candidates()
    assert len(made.texts) == round(synth.s.refilter_fraction * len(candidates))
    assert set(made.texts) <= set(candidates) and made.about["run_epsilon"] == models.epsilon
    score = dict(zip(candidates, models.log_likelihood_ratio(candidates, progress=False)))
    assert min(score[t] for t in made.texts) >= max(v for t, v in score.items() if t not in set(made.texts))


def test_raysim_synth_prints_each_step_and_refuses_a_full_out_folder(synth, cache, tmp_path, capsys):
    from raysim.cli import main

    out = tmp_path / "synth"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["synth", "quickstart", *TEXT, *SMALL_SYNTH, f"pretrain.cache_dir={cache}", "--no-progress",
            "--out", str(out)]
    for flags in ([], ["--overwrite"]):  # a folder synth did not write is never replaced
        assert main([*args, *flags]) == 1 and (out / "keep.txt").read_text() == "mine"
        err = capsys.readouterr().err
        assert "--out" in err and len(err.strip().splitlines()) == 1
    (out / "keep.txt").unlink()
    assert main(args) == 0
    assert main([*args, "--overwrite"]) == 0  # its own output: replaced
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generated"]["sha256"] == synth.made["generated"].about["sha256"]
    assert pq.read_table(out / "filtered.parquet").column("text").to_pylist() == synth.made["filtered"].texts
    assert all(step in printed for step in ("generated", "filtered", "transformed"))
    assert sorted(p.name for p in out.iterdir()) == ["filtered.parquet", "generated.parquet", "manifest.json",
                                                     "transformed.parquet"]
