"""The default federated corpus: the docstrings and comments of CPython's standard library.

Text that is on every machine raysim runs on, written by hundreds of
CPython contributors over three decades. A *user* is one module (``email.message``,
``turtle``, ``asyncio.tasks``, ...): modules differ wildly in how much they say and
how (terse one-liners, tutorial prose, RFC paraphrase, licence headers), which is
the natural non-IID split federated text needs. The *public* split is the Python
language reference (``pydoc_data.topics``), written separately by the docs team:
the tokenizer and the central pre-training stage see only it.

The corpus is built once with :func:`build` and shipped as
``raysim/corpora/python_docs.parquet`` so that it is byte-identical on every
machine whatever its Python version; rebuild with
``python -m raysim.data.corpus raysim/corpora/python_docs.parquet``.
Licence: Python Software Foundation License Version 2 (the CPython sources and
documentation).
"""

from __future__ import annotations

import ast
import io
import sys
import sysconfig
import tokenize
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raysim.io.results import atomic_write

SHIPPED = Path(__file__).resolve().parent.parent / "corpora" / "python_docs.parquet"
PUBLIC_USER = "__public__"
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
_MIN_CHARS = 24


def docstrings(tree: ast.AST) -> list[str]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, kinds) if (d := ast.get_docstring(node))]


def comment_blocks(source: str) -> list[str]:
    """Runs of comment lines on consecutive lines, joined into one text each."""
    blocks, current, last_line = [], [], -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        text = tok.string.lstrip("#").strip()
        if tok.start[0] != last_line + 1 and current:
            blocks.append(" ".join(current))
            current = []
        if text and not text.startswith(("!", "-*-", "type:", "noqa", "pragma")):
            current.append(text)
        last_line = tok.start[0]
    if current:
        blocks.append(" ".join(current))
    return blocks


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def build() -> pa.Table:
    """Rows (user, text, kind) from this interpreter's standard library, in path order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows: dict[str, list] = {"user": [], "text": [], "kind": []}

    def add(user: str, kind: str, texts: list[str]) -> None:
        for t in texts:
            t = t.strip()
            if len(t) >= _MIN_CHARS:
                rows["user"].append(user)
                rows["text"].append(t)
                rows["kind"].append(kind)

    from pydoc_data.topics import topics

    add(PUBLIC_USER, "reference", [topics[k] for k in sorted(topics)])
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP_DIRS & set(rel.parts) or rel.parts[0] == "pydoc_data":
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
            comments = comment_blocks(source)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
            continue
        user = _module_name(rel)
        add(user, "docstring", docstrings(tree))
        add(user, "comment", comments)
    return pa.table(rows)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED
    table = build()
    atomic_write(out, lambda tmp: pq.write_table(table, tmp, compression="zstd", compression_level=19))
    print(f"{out}: {table.num_rows} texts, {len(set(table.column('user').to_pylist()))} users, "
          f"{sum(len(t) for t in table.column('text').to_pylist()) / 1e6:.2f} MB of text")
