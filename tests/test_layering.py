"""The package's import graph: layered (no upward import, anywhere in a file) and without circles.

Layers, lowest first (a module may import its own subpackage and any lower layer):
provenance < pruning < ops < format < {config, capture, models} < cache < {eval, generate} < bench < analysis.
``mustafar/__init__.py`` (the public surface) may import anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import mustafar

PKG = Path(mustafar.__file__).parent
RANK = {"provenance": 0, "pruning": 1, "ops": 2, "format": 3, "config": 4, "capture": 4, "models": 4, "cache": 5,
        "eval": 6, "generate": 6, "bench": 7, "analysis": 8}


def _unit(module: str) -> str | None:
    """``mustafar.cache.layers`` -> ``cache``; ``mustafar`` itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "mustafar" and len(parts) > 1 else None


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, top_level_only: bool):
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in _MODULES]
            # `from mustafar.ops import reference` imports the submodule (and runs the package __init__ first,
            # which for an ancestor package of the importer is already running: not an edge)
            yield from subs if subs else [mod]


def _files():
    return [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]


_MODULES = {_module_name(p) for p in _files()}


def test_no_upward_imports():
    bad = []
    for path in _files():
        me = _unit(_module_name(path))
        if me is None or me not in RANK:
            continue
        for mod in _imports(path, top_level_only=False):
            other = _unit(mod)
            if other is None or other == me or other not in RANK:
                continue
            if RANK[other] >= RANK[me]:
                bad.append(f"{_module_name(path)} imports {mod}")
    assert not bad, bad


def test_no_import_cycles():
    names = {_module_name(p): p for p in _files()}
    graph = {}
    for name, path in names.items():
        graph[name] = {m for m in _imports(path, top_level_only=True) if m in names and m != name}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
