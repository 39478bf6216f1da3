"""The package's architecture as a test: imports only go down the layers, and never in a circle.

Layers, lowest first (a module may import its own layer's and lower layers' modules):

0. ``config``, ``cli``, ``utils``: plumbing that knows no model
1. ``model``, ``meta``: the network and the meta-learning maths (neither knows Lightning nor Hydra)
2. ``data``: corpora, packing and the datamodule, which serves SMLMT episodes
3. ``runs``, ``eval``: the run directory and evaluation, reading what training wrote
4. ``lit``, ``sweep``: training in Lightning, the optuna sweeper
5. the entry points (``train``, ``align``, ``evaluate``, ``export``, ...), ``bench``, ``hydra_plugins``

Every import statement counts, at module level or inside a function, so a cycle cannot hide in a
deferred import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "picomaml.config": 0,
    "picomaml.cli": 0,
    "picomaml.utils": 0,
    "picomaml.conf": 0,
    "picomaml.model": 1,
    "picomaml.meta": 1,
    "picomaml.data": 2,
    "picomaml.runs": 3,
    "picomaml.eval": 3,
    "picomaml.lit": 4,
    "picomaml.sweep": 4,
}
TOP = 5  # entry points, bench, hydra_plugins


def _modules() -> dict[str, Path]:
    files = [*(ROOT / "picomaml").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py")]
    modules = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _layer(module: str) -> int:
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return TOP


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


GRAPH = {name: _imports(path, _modules()) - {name} for name, path in _modules().items()}


def test_the_layer_map_covers_the_package() -> None:
    assert {m for m in GRAPH if _layer(m) < TOP} >= {"picomaml.model.pico_decoder", "picomaml.runs"}
    assert "picomaml.train" in GRAPH and _layer("picomaml.train") == TOP
    # post-training is an entry point: it builds on lit (the training module) and train (the run)
    assert "picomaml.align.run" in GRAPH and _layer("picomaml.align.run") == TOP


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_upward_import(module: str) -> None:
    upward = sorted(m for m in GRAPH[module] if _layer(m) > _layer(module))
    assert not upward, f"{module} (layer {_layer(module)}) imports higher layers: {upward}"


def test_no_import_cycle() -> None:
    # package __init__ files that re-export their submodules are edges too; a cycle through one is real
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
