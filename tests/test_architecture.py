"""How the package reads: short functions (the round loop and every seam stay readable top to bottom)."""

from __future__ import annotations

import ast
from pathlib import Path

RAYSIM = Path(__file__).resolve().parents[1] / "raysim"


def test_no_function_in_raysim_is_over_60_lines():
    long = []
    for path in sorted(RAYSIM.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(RAYSIM)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long
