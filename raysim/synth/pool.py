"""The broad public pool: text no user of the shipped corpus holds, for ``raysim synth`` to draw on.

Wu et al. (2024) start from a broad public corpus (C4) and make it resemble
what users type. Here the users are CPython's standard-library modules
(:mod:`raysim.data.corpus`); the broad pool is the corpus' public split (the
language reference) plus the documentation of nineteen third-party packages
raysim's stack installs: their docstrings and comments, their READMEs
(package metadata) and their licence texts. Some of it reads like the users'
text (a numpy docstring), much of it does not (licences, markdown READMEs,
numpydoc tables): the filter's job.

*Disjoint from the users by construction:* packages that vendor the standard
library (pip, setuptools, typing_extensions, ...) are not read, and any text
sharing a run of :data:`SHINGLE` words with any user's text, or shorter and
found in one, is dropped when the pool is built (the count is printed). ``tests/test_synth.py`` checks again
on every chunk the synth steps read.

Built once and shipped as ``raysim/corpora/public_pool.parquet`` (byte-identical
on every machine), at most :data:`PER_PACKAGE` characters per package, chosen
by content hash; rebuild with ``python -m raysim.synth.pool``. Licences:
``raysim/corpora/LICENSE-public-pool.txt`` (BSD, MIT and Apache-2.0 texts,
each package's own).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import tokenize
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raysim.data.corpus import PUBLIC_USER, SHIPPED, comment_blocks, docstrings
from raysim.io.results import atomic_write

POOL = SHIPPED.parent / "public_pool.parquet"
LICENSES = SHIPPED.parent / "LICENSE-public-pool.txt"
# (distribution, import package): permissive licences only (BSD, MIT, Apache-2.0)
PACKAGES = (("numpy", "numpy"), ("torch", "torch"), ("transformers", "transformers"), ("ray", "ray"),
            ("pyarrow", "pyarrow"), ("peft", "peft"), ("opacus", "opacus"), ("omegaconf", "omegaconf"),
            ("safetensors", "safetensors"), ("pandas", "pandas"), ("networkx", "networkx"), ("sympy", "sympy"),
            ("jinja2", "jinja2"), ("click", "click"), ("pygments", "pygments"), ("pytest", "_pytest"),
            ("huggingface_hub", "huggingface_hub"), ("scipy", "scipy"), ("accelerate", "accelerate"))
PER_PACKAGE = 160_000  # characters of docstrings and comments per package
SHINGLE = 10  # words: a pool text sharing this many consecutive words with a user's text is dropped
MIN_CHARS = 24
CHUNK_CHARS = 600  # chunks: paragraphs packed up to this many characters
LICENCE_FILE = re.compile(r"dist-info/(licenses/)?(LICENSE|COPYING)[^/]*$")


def chunks(text: str, *, limit: int = CHUNK_CHARS) -> list[str]:
    """``text`` cut at blank lines into pieces of at most about ``limit`` characters (a longer paragraph stays
    whole), each stripped; pieces under :data:`MIN_CHARS` are dropped."""
    out, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if current and len(current) + len(para) + 2 > limit:
            out.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        out.append(current)
    return [c for c in out if len(c) >= MIN_CHARS]


def shingles(text: str) -> set[int]:
    """Hashes of every run of :data:`SHINGLE` consecutive words (lower-cased, punctuation kept)."""
    words = text.lower().split()
    return {hash(" ".join(words[i:i + SHINGLE])) for i in range(max(0, len(words) - SHINGLE + 1))}


def normal(text: str) -> str:
    return " ".join(text.lower().split())


class Overlap:
    """Whether a text shares a run of :data:`SHINGLE` words with any of ``texts``, or, shorter than that, occurs
    in one of them (case and spacing aside)."""

    def __init__(self, texts: list[str]):
        self.shingles = set().union(*(shingles(t) for t in texts))
        self.joined = "\n".join(normal(t) for t in texts)

    def __call__(self, text: str) -> bool:
        n = normal(text)
        return bool(shingles(text) & self.shingles) or (len(n.split()) < SHINGLE and n in self.joined)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _package_texts(package: str) -> list[tuple[str, str]]:
    """(kind, text) of every docstring and comment block of ``package``'s modules, tests and vendored code
    aside."""
    root = Path(__import__(package).__file__).parent
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if {"test", "tests", "testing", "_vendor", "vendored", "third_party"} & set(rel):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            out += [("docstring", d) for d in docstrings(tree)] + [("comment", c) for c in comment_blocks(source)]
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue
    return out


def _capped(texts: list[tuple[str, str]], cap: int) -> list[tuple[str, str]]:
    """Texts in content-hash order until ``cap`` characters: a spread of the package, the same on every
    machine that has its version."""
    kept, total = [], 0
    for kind, text in sorted(texts, key=lambda kt: digest(kt[1])):
        if total >= cap:
            break
        kept.append((kind, text))
        total += len(text)
    return kept


def build() -> tuple[pa.Table, str, int]:
    """Rows (source, kind, text) of the pool, the licences' text and how many texts were dropped as overlapping
    a user's."""
    corpus = pq.read_table(SHIPPED).to_pydict()
    overlaps = Overlap([t for u, t in zip(corpus["user"], corpus["text"]) if u != PUBLIC_USER])
    rows: dict[str, list] = {"source": [], "kind": [], "text": []}
    licences, dropped = [], 0
    for dist, package in PACKAGES:
        meta = metadata.distribution(dist)
        version = meta.version
        texts = [(k, t.strip()) for k, t in _package_texts(package) if len(t.strip()) >= MIN_CHARS]
        readme = Parser().parsestr(meta.read_text("METADATA") or "").get_payload() or ""
        texts = _capped(texts, PER_PACKAGE) + [("readme", c) for c in chunks(readme)]
        files = sorted(f for f in meta.files or [] if LICENCE_FILE.search(str(f)))
        for f in files:
            licence = f.read_text()
            licences.append(f"==== {dist} {version}: {f.name} ====\n{licence}")
            texts += [("license", c) for c in chunks(licence)]
        for kind, text in texts:
            if overlaps(text):
                dropped += 1
                continue
            rows["source"].append(f"{dist}-{version}")
            rows["kind"].append(kind)
            rows["text"].append(text)
    return pa.table(rows), "\n\n".join(licences), dropped


if __name__ == "__main__":
    table, licences, dropped = build()
    atomic_write(POOL, lambda tmp: pq.write_table(table, tmp, compression="zstd", compression_level=19))
    atomic_write(LICENSES, lambda tmp: Path(tmp).write_text(licences))
    print(f"{POOL}: {table.num_rows} texts from {len(PACKAGES)} packages, "
          f"{sum(map(len, table.column('text').to_pylist())) / 1e6:.2f} MB of text; {dropped} texts dropped as "
          f"overlapping a user's", file=sys.stderr)
