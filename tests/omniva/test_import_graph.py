"""The import graph of the project, built from the source: no cycle between its modules,
and imports point one way (publishing → jobs → engines → omniva core; only the
composition layer imports every app). docs/architecture.md draws it.

Every import counts, at the top of a module or inside a function, except those under
`if TYPE_CHECKING:` (they never run): an import placed inside a function to dodge a
cycle is still a cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPS = ("omniva", "engines", "jobs", "publishing")
# The floor each app stands on: a module may import its own app and those below it.
LEVEL = {"omniva": 0, "engines": 1, "jobs": 2, "publishing": 3}
# The composition layer: these put every app together (LAYOUT.md).
COMPOSITION = (
    "omniva.urls",
    "omniva.asgi",
    "omniva.bench",
    "omniva.management.commands.bench",
    "omniva.management.commands.serve",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for app in APPS
        for path in sorted((ROOT / app).rglob("*.py"))
        if "migrations" not in path.parts
    }


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def imported_names(name: str, path: Path) -> Iterator[str]:
    """Every dotted name an import of the module makes (`from a import b` gives a and a.b)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {resolve(imported) for imported in imported_names(name, path)}
        graph[name] = {target for target in targets if target and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_composition(name: str) -> bool:
    return any(name == part or name.startswith(f"{part}.") for part in COMPOSITION)


def test_no_module_of_the_project_imports_itself_back_through_others() -> None:
    assert cycles(import_graph()) == []


def test_imports_point_from_publishing_to_jobs_to_engines_to_the_core() -> None:
    upward = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if not is_composition(name)
        for target in sorted(targets)
        if LEVEL[target.split(".")[0]] > LEVEL[name.split(".")[0]]
    ]
    assert upward == []


def test_no_runtime_module_imports_a_benchmark() -> None:
    importers = [
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if not is_composition(name)
        for target in sorted(targets)
        if is_composition(target) and target.startswith("omniva.bench")
    ]
    assert importers == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_the_cycle_finder_finds_a_cycle_through_three_modules_and_nothing_else(
    graph: dict[str, set[str]], expected: list[list[str]]
) -> None:
    assert cycles(graph) == expected


def test_an_import_inside_a_function_is_an_edge_but_one_for_type_checking_is_not(
    tmp_path: Path,
) -> None:
    source = tmp_path / "module.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from jobs import models\n"
        "def f():\n"
        "    from engines import services\n"
    )
    names = set(imported_names("omniva.module", source))
    assert "engines.services" in names
    assert "jobs.models" not in names
