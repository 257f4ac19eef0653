"""No module of ``multichex`` is part of an import cycle (every import counts: top-level, in functions,
under ``TYPE_CHECKING``)."""

from __future__ import annotations

import ast
from pathlib import Path

import multichex

ROOT = Path(multichex.__file__).resolve().parent
PACKAGE = "multichex"


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``from ... import`` statement names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(names: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Module → {imported package module: line of the first such import}."""
    edges: dict[str, dict[str, int]] = {name: {} for name in names}
    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(node, module, is_package)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in names else base for a in node.names]
            for target in targets:
                while target and target not in names:  # `import a.b.c` of a name inside a.b → a.b
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != module:
                    edges[module].setdefault(target, node.lineno)
    return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in edges.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_cycle_in(component, edges) for component in sorted(components)]


def _cycle_in(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component (BFS)."""
    members, start = set(component), component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(edges[node]):
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if succ in members and succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle found in component {component}")  # pragma: no cover


def describe(cycle: list[str], edges: dict[str, dict[str, int]], names: dict[str, Path]) -> str:
    """``a (a.py:12) -> b (b.py:3) -> a``: each step with the line of the import that makes it."""
    steps = [f"{a}  ({names[a].relative_to(ROOT.parent)}:{edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "\n    -> ".join(steps + [cycle[-1]])


def test_the_graph_sees_relative_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import a\n")
    (package / "sub" / "a.py").write_text("def f():\n    from multichex.sub.b import g\n")
    (package / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    names = module_names(package)
    edges = import_edges(names)
    assert edges["multichex.sub"] == {"multichex.sub.a": 1}
    assert edges["multichex.sub.a"] == {"multichex.sub.b": 2}
    assert edges["multichex.sub.b"] == {"multichex.sub.a": 3}
    assert find_cycles(edges) == [["multichex.sub.a", "multichex.sub.b", "multichex.sub.a"]]


def test_no_module_is_part_of_an_import_cycle() -> None:
    names = module_names()
    assert "multichex.models.multichexnet" in names and "multichex.models.saliency" in names
    edges = import_edges(names)
    cycles = find_cycles(edges)
    report = "\n\n".join(f"  cycle {i + 1}:\n    {describe(c, edges, names)}" for i, c in enumerate(cycles))
    print(report or "no import cycles")
    assert not cycles, f"{len(cycles)} import cycle(s) among multichex modules:\n{report}"
