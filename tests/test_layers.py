"""The package's import graph: no cycle, and no module imports from a layer above its own.

Layers, bottom up: errors / yaml_file / run_files / device < data, model, distill, methods, config, evaluate
(the metric) < plots < engine < benchmark, demo, predict, export < cli. Imports inside `if TYPE_CHECKING:`
are type hints only and do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "sdidd"
LAYER = {"errors": 0, "yaml_file": 0, "run_files": 0, "device": 0, "data": 1, "model": 1, "distill": 1, "methods": 1,
         "config": 1, "evaluate": 1, "plots": 2, "export": 4, "engine": 3, "benchmark": 4, "demo": 4, "predict": 4,
         "cli": 5, "__init__": 5, "__main__": 5}


def _imports() -> dict[str, set[str]]:
    """module -> the sdidd modules it imports (anywhere in it, except TYPE_CHECKING blocks)."""
    out: dict[str, set[str]] = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        pkg = ".".join(parts[:-1])
        tree = ast.parse(f.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for n in ast.walk(node)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                targets.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.split(".")[0] == "sdidd":
                targets.add(node.module)
        out[mod] = {t for t in targets if t != mod}
    return out


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYER[parts[1] if len(parts) > 1 else "__init__"]


def test_no_module_imports_from_a_layer_above_it() -> None:
    upward = [(m, t) for m, ts in _imports().items() for t in ts
              if t.startswith("sdidd.") and _layer(t) > _layer(m)]
    assert not upward, upward


def test_no_import_cycle() -> None:
    imports = _imports()
    graph = {m: {t for t in ts if t in imports} for m, ts in imports.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            assert state.get(t) != 1, " -> ".join(path + [t])
            if t not in state:
                visit(t, path + [t])
        state[m] = 2
    for m in graph:
        if m not in state:
            visit(m, [m])
