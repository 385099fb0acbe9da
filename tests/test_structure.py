"""Tier 1: the package's structure. No import cycles in scaling_lab, every import counted (function-local ones,
those under TYPE_CHECKING and `from package import submodule` too), and no module over MAX_LINES lines.

An import of a.b counts as an edge to a.b alone, not to the package a whose __init__ Python runs first."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "scaling_lab"
MAX_LINES = 450


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(file): file for file in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(file: Path, name: str, known: set[str]) -> set[str]:
    """The scaling_lab modules that `file` (module `name`) imports anywhere in its body."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {module for module in found if module in known and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(file, name, set(modules)) for name, file in modules.items()}


def cyclic_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm): each holds a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle in each cyclic component."""
    return [shortest_cycle(graph, component) for component in cyclic_components(graph)]


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """The shortest cycle through the first module of `component`, as a path that ends where it starts."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    next_frontier.append(target)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start} in {component}")


def test_the_graph_sees_local_relative_and_submodule_imports(tmp_path, monkeypatch):
    package = tmp_path / "scaling_lab"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "leaf.py").write_text("def f():\n    from scaling_lab import top\n")
    (package / "sub" / "other.py").write_text("from . import leaf\nfrom .leaf import f\n")
    (package / "top.py").write_text("import os\nfrom scaling_lab.sub import other\n")
    monkeypatch.setitem(globals(), "PACKAGE_DIR", package)
    graph = import_graph()
    assert graph["scaling_lab.sub.leaf"] == {"scaling_lab.top"}
    assert graph["scaling_lab.sub.other"] == {"scaling_lab.sub.leaf"}
    assert graph["scaling_lab.top"] == {"scaling_lab.sub.other"}
    assert find_cycles(graph) == [
        ["scaling_lab.sub.leaf", "scaling_lab.top", "scaling_lab.sub.other", "scaling_lab.sub.leaf"]
    ]


def describe(graph: dict[str, set[str]], component: list[str]) -> str:
    cycle = shortest_cycle(graph, component)
    others = sorted(set(component) - set(cycle))
    return " -> ".join(cycle) + (f"  (more cycles through {', '.join(others)})" if others else "")


def test_no_import_cycles():
    graph = import_graph()
    cycles = [describe(graph, component) for component in cyclic_components(graph)]
    assert not cycles, "import cycles in scaling_lab:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(package_modules()))
def test_module_is_small(name):
    lines = len(package_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by job to at most {MAX_LINES}"


def test_spec_base_is_a_leaf():
    """The settings classes of other modules raise SpecError from spec_base, which must import nothing back."""
    assert import_graph()["scaling_lab.spec_base"] == set()
