"""How the package reads: short functions and modules, no import cycle, every package says what it holds."""

from __future__ import annotations

import ast
from pathlib import Path

RAYSIM = Path(__file__).resolve().parents[1] / "raysim"
MODULES = {".".join(p.relative_to(RAYSIM.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(RAYSIM.rglob("*.py"))}


def test_no_function_in_raysim_is_over_60_lines():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.relative_to(RAYSIM)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


def test_no_module_in_raysim_is_over_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 400}
    assert not long, long


def test_every_package_opens_with_a_docstring_that_says_what_it_holds():
    packages = {name: path for name, path in MODULES.items() if path.name == "__init__.py"}
    assert {"raysim.engine", "raysim.emulation", "raysim.models", "raysim.methods", "raysim.privacy",
            "raysim.aggregation", "raysim.policies", "raysim.data", "raysim.study", "raysim.io",
            "raysim.config"} <= set(packages)
    bare = [name for name, path in packages.items()
            if len((ast.get_docstring(ast.parse(path.read_text())) or "").split()) < 12]
    assert not bare, bare


def _module(name: str) -> str | None:
    """The raysim module an import names (``raysim.a.b.f`` -> ``raysim.a.b``), or None outside raysim."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path) -> set[str]:
    """Every raysim module that importing or running ``name`` may import: module-level imports and those inside
    functions alike (``if TYPE_CHECKING:`` blocks excepted), with the packages whose ``__init__`` each runs."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in tree.body
                   if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                   for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in filter(None, map(_module, targets)):
            parts = target.split(".")
            found |= {".".join(parts[:k]) for k in range(2, len(parts) + 1)}  # a.b.c runs a.b's __init__ first
    return {m for m in found if m in MODULES and m != name and not name.startswith(m + ".")}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_raysim_has_no_import_cycle():
    graph = {name: imports(name, path) for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 200  # the graph was read: raysim's modules import each other
    assert cycles(graph) == []


def test_the_cycle_check_finds_cycles_and_reads_imports_inside_functions():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    lazy = imports("raysim.config.validate", MODULES["raysim.config.validate"])  # inside a function
    assert {"raysim.data.sources", "raysim.data"} <= lazy  # the module, and the package whose __init__ runs first
