"""The package layout's rules (docs/architecture.md, section 2), read from the source with
`ast`: no import cycle among the project's modules, and the engine never imports the HTTP
layer or Ray outside the two Ray modules (fast tier)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fusion", "server", "evaluation", "bench")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (at any depth of the file: lazy imports count)."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            deps |= {n for n in names if n in files and n != mod}
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert "fusion.engine" in graph and graph["fusion.engine"], "the graph was not read"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_engine_imports_neither_http_nor_ray_outside_the_ray_modules():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("fusion"):
            assert not any(d.startswith(("server", "bench", "evaluation")) for d in deps), mod
    ray_modules = {"fusion.ray_actor", "fusion.ray_worker"}
    for mod in graph:
        if mod.startswith("fusion") and mod not in ray_modules:
            src = (ROOT / (mod.replace(".", "/") + ".py"))
            src = src if src.exists() else ROOT / mod.replace(".", "/") / "__init__.py"
            tree = ast.parse(src.read_text())
            top = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            top |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
            assert "ray" not in top, mod
