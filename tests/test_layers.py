"""The package layers (docs/architecture.md): imports point down only, and no
module imports itself back through others (no cycles), counting imports made
inside functions too. Read from the source with ast, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: lowest first: a package may import only the ones before it
LAYERS = ["gpu_runtime", "concordia_agents", "integrations", "concordia_cli"]


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (resolved relative imports; ``from a import b`` names the
    submodule a.b when there is one)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_imports_point_down_the_layers_only():
    """gpu_runtime imports no middleware, the middleware no integrations, nothing imports the CLI."""
    upward = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m))
    assert upward == []


def test_no_import_cycles_between_modules():
    """No module reaches itself through imports (package __init__ re-exports count as edges too, except a
    package importing its own submodules)."""
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in _graph().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_graph_sees_the_known_edges():
    """The checker itself: it finds edges that exist (a checker that sees nothing would pass anything)."""
    graph = _graph()
    assert "gpu_runtime.cuda.tasks" in graph["gpu_runtime.cuda.commit"]
    assert "gpu_runtime.planner" in graph["gpu_runtime.cuda.commit"]
    assert "concordia_agents._services" in graph["concordia_agents._session"]
    assert "integrations.langgraph" in graph["concordia_cli._main"] or any(
        d.startswith("integrations.") for d in graph["concordia_cli._main"])


def test_modules_over_500_lines_say_why_in_their_docstring():
    """A module longer than about 500 lines states the reason for its size in its docstring ("Size ...")."""
    unexplained = []
    for name, path in sorted(_modules().items()):
        text = path.read_text()
        if text.count("\n") > 520 and "Size" not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{name}: {text.count(chr(10))} lines")
    kernels = ROOT / "gpu_runtime" / "cuda" / "kernels"
    unexplained += [f"{p.name}: too long" for p in sorted(kernels.iterdir()) if p.read_text().count("\n") > 520]
    assert unexplained == []
