"""The package layout's rules (docs/architecture.md, section 2), read from the source with
`ast` (fast tier): one import root, no import cycle among the project's modules, `core`
reaches no torch (directly or through the project modules it imports), only the model
runtime (and the Ray modules) imports torch or transformers, nothing below the HTTP layer
imports it, and only the Ray modules import ray."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "coolfusion"
HEAVY = {"torch", "transformers", "accelerate", "gguf", "safetensors"}
RAY_MODULES = {"coolfusion.workers.ray_actor", "coolfusion.workers.ray_cluster", "coolfusion.workers.ray_proxy"}
CLIENTS = ("coolfusion.server", "coolfusion.evaluation", "coolfusion.bench")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(mod: str, path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Every dotted name the file imports (at any depth: lazy imports count), made absolute."""
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            # `from pkg import module` imports the module, not the package's own names
            names |= subs if subs <= modules else {base} | subs
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports."""
    files = _files()
    mods = set(files)
    return {m: {n for n in _imports(m, p, mods) if n in files and n != m} for m, p in files.items()}


def external(mod: str) -> set[str]:
    """The top-level names of the non-project packages a module imports."""
    files = _files()
    return {n.split(".")[0] for n in _imports(mod, files[mod]) if not n.startswith("coolfusion")}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for d in graph[m] - seen:
            seen.add(d)
            todo.append(d)
    return seen


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


def test_one_import_root():
    tops = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert tops == {"coolfusion"}


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert graph["coolfusion.engine.engine"], "the graph was not read"
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_core_reaches_no_torch():
    graph = import_graph()
    core = [m for m in graph if m.startswith("coolfusion.core")]
    assert len(core) > 5
    for mod in core:
        for dep in reachable(graph, mod) | {mod}:
            assert not external(dep) & HEAVY, f"{mod} reaches {dep}, which imports {external(dep) & HEAVY}"
            assert not dep.startswith(("coolfusion.runtime", "coolfusion.engine", *CLIENTS)), (mod, dep)


def test_nothing_below_the_http_layer_imports_it():
    graph = import_graph()
    for mod, deps in graph.items():
        if not mod.startswith(CLIENTS):
            assert not any(d.startswith(CLIENTS) for d in deps), mod


# the model runtime, the Ray modules (an actor holds its model), and the benchmark, which times
# transformers' own generate() beside the engine
TORCH_MODULES = ("coolfusion.runtime", *RAY_MODULES, "coolfusion.bench.speed")


def test_only_the_runtime_imports_torch_or_transformers():
    graph = import_graph()
    importers = {m for m in graph if external(m) & HEAVY}
    assert importers and all(m.startswith(TORCH_MODULES) for m in importers), sorted(
        m for m in importers if not m.startswith(TORCH_MODULES))


def test_only_the_ray_modules_import_ray():
    graph = import_graph()
    importers = {m for m in graph if "ray" in external(m)}
    assert importers == RAY_MODULES
