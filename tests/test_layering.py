"""Layers that point one way: molf_jax's import graph has no cycle, and the routing core imports
nothing of molf_jax outside ``routing/`` (docs/design.md, "Layers").

The graph is read from the source with ``ast``, so an import hidden inside a function (the usual
way to dodge a cycle at import time) counts like any other.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "molf_jax"

# Lower layers first; a module may import its own layer and those before it. Modules of no
# listed layer (data, eval, checkpoints, ...) are held only to the no-cycle rule. The routing
# core imports nothing, so it comes first: the tree utilities and LoRA read its two conventions
# (leaf paths, `lora_<i>` keys) rather than keeping copies.
LAYERS = (
    ("molf_jax.routing",),
    ("molf_jax.trees", "molf_jax.projections"),
    ("molf_jax.lora", "molf_jax.adalora"),
    ("molf_jax.models",),
    ("molf_jax.param_roles",),
    ("molf_jax.train",),
    ("molf_jax.cli", "molf_jax.experiments", "molf_jax.benchmarks"),
)


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package under ``root`` by dotted name (a package by its own name)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(target: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``target`` names (``a.b.func`` -> ``a.b``)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``module -> modules of the package it imports``, at any depth of its source."""
    known = module_files(root)
    top = root.name
    graph = {}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                # `from pkg import sub` imports the submodule when there is one.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] != top:
                    continue
                module = _resolve(target, known)
                if module and module != name:
                    edges.add(module)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated last), or None."""
    state = {}  # 1: on the current path, 2: done
    stack = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``'a -> b'`` for every import from a listed layer into a higher one."""
    out = []
    for module, edges in sorted(graph.items()):
        here = _layer_of(module)
        for target in sorted(edges):
            there = _layer_of(target)
            if here is not None and there is not None and there > here:
                out.append(f"{module} -> {target}")
    return out


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_routing_imports_only_routing():
    outside = [f"{m} -> {t}" for m, edges in import_graph().items()
               if m.startswith("molf_jax.routing") for t in edges
               if not t.startswith("molf_jax.routing")]
    assert outside == []


def test_layers_point_one_way():
    assert layer_violations(import_graph()) == []


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    # The checks above pass only if the reader finds every kind of import; a planted package
    # with a cycle through a function-level and a relative import must be caught.
    pkg = tmp_path / "molf_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from molf_jax.sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "high.py").write_text("from .. import low\n")
    graph = import_graph(pkg)
    assert graph["molf_jax.low"] == {"molf_jax.sub.high"}
    assert graph["molf_jax.sub.high"] == {"molf_jax.low"}
    assert find_cycle(graph) == ["molf_jax.low", "molf_jax.sub.high", "molf_jax.low"]


@pytest.mark.parametrize("module", ["molf_jax.lora", "molf_jax.routing._labels"])
def test_every_module_is_in_the_graph(module):
    assert module in import_graph()
