"""The package's layers: every import points down, models/ and data/ never import each other, and there is no cycle.

Imports inside functions count (a deferred import is still a dependency); imports under `if TYPE_CHECKING:` do
not (they never run). The map is the README's "Architecture" section; a new module must be placed in it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "dalle_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# module (or package prefix) -> layer; the longest matching prefix wins.
LAYERS = {
    "dalle_jax": 0, "dalle_jax.errors": 0, "dalle_jax.sharding": 0, "dalle_jax.distributed": 0,
    "dalle_jax.images": 0, "dalle_jax.hostenv": 0,
    "dalle_jax.models": 1, "dalle_jax.data": 1,
    "dalle_jax.config": 2,
    "dalle_jax.train": 3, "dalle_jax.runs": 3, "dalle_jax.sampling": 3, "dalle_jax.convert": 3, "dalle_jax.encode": 3,
    "dalle_jax.aot": 4, "dalle_jax.info": 4, "dalle_jax.demo": 4, "dalle_jax.experiments": 4,
    "dalle_jax.serve": 4,
    "dalle_jax.commands": 5, "dalle_jax.cli": 5,
}
NEIGHBOURS_APART = ("dalle_jax.models", "dalle_jax.data")  # same layer, but neither may import the other


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """{dotted module name: source} for every .py file of the package."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text()
    return sources


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def imports_of(name: str, source: str, modules: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its body (deferred included, TYPE_CHECKING excluded)."""
    tree = ast.parse(source)
    skipped = _type_checking_nodes(tree)
    is_package = name in {m for m in modules if any(other.startswith(m + ".") for other in modules)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            # `from a.b import c` imports a.b.c when that is a module, else a.b
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == PACKAGE or t.startswith(PACKAGE + "."))
    found.discard(name)
    return found


def layer_of(module: str) -> int | None:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len,
               default=None)
    return None if best is None else LAYERS[best]


def violations(sources: dict[str, str]) -> list[str]:
    """Every import that points up a layer or across models/data, and every module outside the map."""
    modules = set(sources)
    problems = []
    for name, source in sorted(sources.items()):
        here = layer_of(name)
        if here is None:
            problems.append(f"{name} is in no layer: add it to tests/test_layers.py LAYERS and the README map")
            continue
        for target in sorted(imports_of(name, source, modules)):
            there = layer_of(target)
            if there is not None and there > here:
                problems.append(f"{name} (L{here}) imports {target} (L{there}): an upward import")
            for side, other in (NEIGHBOURS_APART, NEIGHBOURS_APART[::-1]):
                if name.startswith(side + ".") and (target == other or target.startswith(other + ".")):
                    problems.append(f"{name} imports {target}: models/ and data/ never import each other")
    return problems


def cycles(sources: dict[str, str]) -> list[list[str]]:
    """Strongly connected groups of more than one module in the import graph (Tarjan)."""
    modules = set(sources)
    graph = {name: sorted(imports_of(name, source, modules) & modules) for name, source in sources.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return groups


def test_every_import_points_down():
    assert violations(module_sources()) == []


def test_no_import_cycle():
    assert cycles(module_sources()) == []


def test_the_map_covers_the_package():
    sources = module_sources()
    assert len(sources) > 40 and all(layer_of(name) is not None for name in sources)


@pytest.mark.parametrize("module, line, expected", [
    # deferred, inside a function: still an upward import (models L1 -> train L3)
    ("dalle_jax.models.dvae", "def f():\n    from dalle_jax.train import loop\n", "upward import"),
    ("dalle_jax.config", "import dalle_jax.commands.sample\n", "upward import"),
    ("dalle_jax.data.pipeline", "from dalle_jax.models.prior import Prior\n", "never import each other"),
    ("dalle_jax.errors", "from dalle_jax import config as config_lib\n", "upward import"),
])
def test_the_check_catches_a_synthetic_upward_import(module, line, expected):
    sources = module_sources()
    sources[module] = sources[module] + "\n" + line
    assert any(expected in problem and module in problem for problem in violations(sources))


def test_type_checking_imports_do_not_count_but_a_cycle_does():
    sources = module_sources()
    guarded = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dalle_jax.train import loop\n"
    assert violations({**sources, "dalle_jax.models.dvae": sources["dalle_jax.models.dvae"] + guarded}) == []
    # runs imports train.loop (same layer); train.loop importing runs back closes a cycle
    looped = {**sources, "dalle_jax.train.loop": sources["dalle_jax.train.loop"] + "\nfrom dalle_jax import runs\n"}
    assert any({"dalle_jax.runs", "dalle_jax.train.loop"} <= set(group) for group in cycles(looped))
