"""Data sources, partitions, the shipped corpus, tokenizers and packing."""

import hashlib
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch

from raysim import rng
from raysim.config import DataConfig, load_experiment
from raysim.data.corpus import PUBLIC_USER, SHIPPED
from raysim.data.sources import partition, read_table
from raysim.data.synthetic import SyntheticTokens
from raysim.data.text import build_text_dataset
from raysim.data.tokenizer import train_tokenizer
from raysim.errors import ConfigError

ROWS = {"user": ["ann", "bob", "ann", "cy", "bob", "ann"],
        "text": ["alpha beta", "gamma", "delta epsilon", "zeta", "eta theta", "iota"],
        "topic": ["a", "b", "a", "b", "a", "b"]}


def _write_all(tmp_path):
    table = pa.table(ROWS)
    pq.write_table(table, tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(dict(zip(ROWS, r))) + "\n" for r in zip(*ROWS.values())))
    folder = tmp_path / "ds"
    folder.mkdir()
    with ipc.new_stream(str(folder / "data-00000-of-00001.arrow"), table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    return [tmp_path / "t.parquet", tmp_path / "t.jsonl", folder]


def test_every_source_reads_the_same_rows(tmp_path):
    for path in _write_all(tmp_path):
        assert read_table(path).select(["user", "text"]).to_pydict() == {"user": ROWS["user"], "text": ROWS["text"]}


def test_natural_partition_groups_texts_by_user(tmp_path):
    users = partition(pa.table(ROWS), DataConfig(), seed=0, source="t")
    assert users == {"ann": ["alpha beta", "delta epsilon", "iota"], "bob": ["gamma", "eta theta"], "cy": ["zeta"]}


def test_iid_partition_deals_texts_evenly():
    rows = {"user": ["u"] * 100, "text": [f"t{i}" for i in range(100)]}
    users = partition(pa.table(rows), DataConfig(partition="iid", num_users=4), seed=0, source="t")
    assert sorted(len(v) for v in users.values()) == [25, 25, 25, 25]
    assert sorted(t for v in users.values() for t in v) == sorted(rows["text"])


def test_dirichlet_small_alpha_concentrates_labels_large_alpha_spreads_them():
    labels = [str(i % 5) for i in range(2000)]
    rows = {"user": ["u"] * 2000, "text": [f"{lab}:{i}" for i, lab in enumerate(labels)], "topic": labels}

    def labels_per_user(alpha):
        cfg = DataConfig(partition="dirichlet", label_column="topic", dirichlet_alpha=alpha, num_users=10)
        users = partition(pa.table(rows), cfg, seed=0, source="t")
        assert sum(len(v) for v in users.values()) == 2000
        # Share of each user's texts in its most common label.
        return np.mean([Counter(t.split(":")[0] for t in v).most_common(1)[0][1] / len(v) for v in users.values()])

    assert labels_per_user(0.05) > 0.6 > 0.3 > labels_per_user(100.0)  # 5 labels: 0.2 is fully mixed


def test_missing_column_names_the_file_and_field(tmp_path):
    path = _write_all(tmp_path)[0]
    with pytest.raises(ConfigError) as err:
        partition(read_table(path), DataConfig(text_column="body"), seed=0, source=str(path))
    assert err.value.field == "data.text_column" and "t.parquet" in str(err.value) and "body" in str(err.value)


def test_empty_user_is_rejected_with_its_row():
    rows = {"user": ["ann", ""], "text": ["a", "b"]}
    with pytest.raises(ConfigError, match="row 1 has an empty user"):
        partition(pa.table(rows), DataConfig(), seed=0, source="t")


def test_unreadable_and_missing_files_are_config_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ConfigError, match="cannot read"):
        read_table(bad)
    with pytest.raises(ConfigError, match="not found"):
        read_table(tmp_path / "nope.jsonl")


# ---- the shipped corpus ----------------------------------------------------

PINNED_HASHES = {  # sha256 of each user's texts joined by NUL: the corpus must not drift
    "json.decoder": "dabba56bc4217fe0",
    "turtle": "413c4f5b0eabed3f",
    "email.message": "a7d4c62c9cc52b2b",
}


def _user_hash(table, user):
    texts = [t for u, t in zip(table["user"], table["text"]) if u == user]
    return hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]


def test_shipped_corpus_has_hundreds_of_very_different_users():
    table = pq.read_table(SHIPPED).to_pydict()
    chars = Counter()
    for u, t in zip(table["user"], table["text"]):
        chars[u] += len(t)
    del chars[PUBLIC_USER]
    sizes = sorted(chars.values())
    assert len(sizes) >= 200
    assert sizes[-1] / sizes[len(sizes) // 2] > 20  # a few users say far more than the median user


def test_shipped_corpus_users_are_pinned_by_content_hash():
    table = pq.read_table(SHIPPED).to_pydict()
    assert {u: _user_hash(table, u) for u in PINNED_HASHES} == PINNED_HASHES


def test_tokenizer_training_is_cached_by_content(tmp_path):
    texts = ["the quick brown fox", "jumps over the lazy dog"] * 50
    a = train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path)
    files = list((tmp_path / "tokenizers").rglob("tokenizer.json"))
    b = train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path)
    assert len(files) == 1 and a.get_vocab() == b.get_vocab()
    train_tokenizer(texts + ["more"], vocab_size=300, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").rglob("tokenizer.json"))) == 2


def test_two_runs_training_one_tokenizer_at_once_both_cache_it(tmp_path, monkeypatch):
    """Runs of a study may train the same tokenizer at once: both must be inside the cache write together and
    still both succeed, leaving one whole tokenizer.json."""
    import raysim.data.tokenizer

    both_writing, real = threading.Barrier(2), raysim.data.tokenizer.atomic_write

    def together(path, write):
        def wait_then_write(tmp):
            both_writing.wait(timeout=30)
            write(tmp)

        real(path, wait_then_write)

    monkeypatch.setattr(raysim.data.tokenizer, "atomic_write", together)
    texts = ["the quick brown fox", "jumps over the lazy dog"] * 50
    with ThreadPoolExecutor(2) as pool:  # a thread's error is raised here
        built = list(pool.map(lambda _: train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path), range(2)))
    files = [f.name for f in (tmp_path / "tokenizers").rglob("*") if f.is_file()]
    assert files == ["tokenizer.json"] and built[0].get_vocab() == built[1].get_vocab()
    assert train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path).get_vocab() == built[0].get_vocab()


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_experiment(None, ["model.vocab_size=1024", f"pretrain.cache_dir={cache}", "data.seq_len=32",
                                 "model.n_positions=32", "data.eval_users=8", "eval.max_examples=64"])
    return cfg, build_text_dataset(cfg)


def test_python_docs_dataset_splits_train_eval_and_public_users(docs):
    cfg, ds = docs
    assert ds.num_users >= 200 and len(ds.eval_users) == 8
    assert not set(ds.users) & set(ds.eval_users) and PUBLIC_USER not in ds.users
    sizes = np.diff(ds.offsets)
    assert sizes.min() >= cfg.data.min_examples and sizes.max() <= cfg.data.max_examples
    assert ds.blocks.shape[1] == 32 and len(ds.public_blocks) > 0 and len(ds.eval_blocks) <= 64
    assert int(ds.blocks.max()) < ds.vocab_size <= 1024


def test_a_device_holds_its_users_sequences(docs):
    _, ds = docs
    u = ds.user_of(12345)
    assert np.array_equal(ds.device_examples(12345).numpy(), ds.blocks[ds.offsets[u]:ds.offsets[u + 1]].numpy())
    assert ds.user_of(12345) == ds.user_of(12345 + ds.num_users)


def test_rebuilding_gives_the_same_dataset(docs):
    cfg, ds = docs
    assert build_text_dataset(cfg).fingerprint() == ds.fingerprint()


def test_data_seed_fixes_the_held_out_users_across_run_seeds(docs):
    from dataclasses import replace

    cfg, ds = docs
    other_run = replace(cfg, seed=cfg.seed + 1)
    assert build_text_dataset(other_run).eval_users != ds.eval_users  # by default the split follows the run
    fixed = replace(other_run, data=replace(cfg.data, seed=cfg.seed))
    assert build_text_dataset(fixed).fingerprint() == ds.fingerprint()


def test_runs_that_share_caches_share_a_dataset_only_when_it_would_come_out_the_same(docs):
    from dataclasses import replace

    from raysim.data.build import build_dataset
    from raysim.io.caches import Caches

    cfg, ds = docs
    caches = Caches()
    built = build_dataset(cfg, caches=caches)
    assert built.fingerprint() == ds.fingerprint()
    assert build_dataset(cfg, caches=caches) is built and build_dataset(cfg, caches=Caches()) is not built
    other_policy = replace(cfg, policy="random", data=replace(cfg.data, seed=cfg.seed))
    assert (build_dataset(other_policy, caches=caches)
            is build_dataset(replace(other_policy, seed=cfg.seed + 1), caches=caches))  # split fixed
    assert build_dataset(replace(cfg, seed=cfg.seed + 1), caches=caches) is not built  # the split follows the seed
    assert build_dataset(replace(cfg, data=replace(cfg.data, seq_len=16)), caches=caches).blocks.shape[1] == 16


def _walk_in_torch(data, user_id, n):
    """The generator's first form, one torch indexing op per position: the reference its numpy walk keeps."""
    g = rng.generator(data.seed, "data", "user", user_id)
    styles = data.cfg.num_styles
    own = int(torch.randint(0, styles, (1,), generator=g))
    seq_style = torch.where(torch.rand(n, generator=g) < 0.8, own, torch.randint(0, styles, (n,), generator=g))
    prefs = torch.softmax(2.0 * torch.randn(data.successors, generator=g), dim=0)
    choice = torch.multinomial(prefs, n * (data.cfg.seq_len - 1), replacement=True, generator=g)
    choice = choice.view(n, data.cfg.seq_len - 1)
    tokens = torch.empty(n, data.cfg.seq_len, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, data.vocab_size, (n,), generator=g)
    for t in range(1, data.cfg.seq_len):
        tokens[:, t] = data.tables[seq_style, tokens[:, t - 1], choice[:, t - 1]]
    return tokens


def test_synthetic_users_are_the_same_sequences_as_the_torch_walk_made():
    data = SyntheticTokens(DataConfig(examples_per_user=6, seq_len=17, num_styles=5), vocab_size=300, seed=4)
    for user in (0, 1, 7, 99_999, 1 << 40):
        got = data._generate(user, 6)
        assert got.dtype == torch.long
        assert torch.equal(got, _walk_in_torch(data, user, 6))


def test_a_tokenizer_that_cannot_reach_the_vocabulary_stops_the_run_with_one_line(tmp_path):
    cfg = load_experiment(None, ["model.vocab_size=32768", f"pretrain.cache_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        build_text_dataset(cfg)
    message = str(err.value)
    assert message.startswith("model.vocab_size: the public text of ")
    built = int(message.split("BPE vocabulary of ")[1].split(" tokens")[0].replace(",", ""))
    assert 2048 < built < 32768  # what the shipped corpus's public split yields (9,194 with tokenizers 0.22)
    assert "model.vocab_size=32,768" in message and "data.tokenizer.path" in message and "synthetic" in message
    assert "\n" not in message
