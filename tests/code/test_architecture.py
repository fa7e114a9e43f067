"""The architecture the tree promises: three layers, no import circle, a stated role per module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fod_core", "components", "pipelines")
# fod_core is the method alone: it must run where none of the MLOps stack is installed.
FOREIGN_TO_CORE = ("components", "pipelines", "kfp", "mlflow", "dvc", "kserve", "boto3")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, at module level or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def project_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def test_every_layer_imports_only_the_ones_below() -> None:
    allowed = {"fod_core": (), "components": ("fod_core",), "pipelines": ("fod_core", "components")}
    for name, path in project_modules().items():
        layer = name.split(".")[0]
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top in PACKAGES:
                assert top == layer or top in allowed[layer], f"{name} imports {imported}"
            if layer == "fod_core":
                assert top not in FOREIGN_TO_CORE, f"{name} imports {imported}"


def test_the_import_graph_has_no_circle() -> None:
    graph = project_graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            pytest.fail("import circle: " + " -> ".join(cycle))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_every_module_opens_with_a_docstring_that_says_its_role() -> None:
    for name, path in project_modules().items():
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring, f"{name} ({path.relative_to(ROOT)}) has no module docstring"
