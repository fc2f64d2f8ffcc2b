"""The library's import graph: one way down the layers, and no cycle (read with ``ast``)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Folder → package, as setup.cfg maps them.
PACKAGES = {"actorbus": "actorbus", "actors": "actorbus.actors", "bridge": "actorbus.bridge",
            "supervision": "actorbus.supervision"}

#: Value modules every layer may use; they import only each other.
LEAF = {"actorbus.config", "actorbus.codecs", "actorbus.envelope", "actorbus.ids",
        "actorbus.message", "actorbus.aggregate", "actorbus.policies", "actorbus.ports",
        "actorbus.errors", "actorbus.groups", "actorbus.checks", "actorbus.hashing",
        "actorbus.processes", "actorbus.actor_signals",
        "actorbus.redaction", "actorbus.tracing", "actorbus.snapshots"}
#: Higher imports lower, never the other way: facade → supervision → bridge → actors → leaf.
RANK = {"leaf": 0, "actorbus.actors": 1, "actorbus.bridge": 2, "actorbus.supervision": 3,
        "actorbus": 4}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def layer(module: str) -> str:
    if module in LEAF:
        return "leaf"
    package = module if module in PACKAGES.values() else module.rsplit(".", 1)[0]
    return package


GRAPH = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}


def test_the_leaf_modules_exist():
    assert LEAF <= set(GRAPH)


def test_leaf_modules_import_only_leaf_modules():
    wrong = {m: sorted(GRAPH[m] - LEAF) for m in LEAF if GRAPH[m] - LEAF}
    assert not wrong


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module):
    # A package's __init__ re-exports from below; everything else only looks down or sideways.
    upward = [target for target in GRAPH[module]
              if RANK[layer(target)] > RANK[layer(module)]]
    assert not upward, f"{module} imports a higher layer: {upward}"


def test_the_import_graph_has_no_cycle():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " → ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(GRAPH[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])
