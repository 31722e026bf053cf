"""The package has no import cycle: every ``import`` / ``from ... import`` between moh modules,
at any depth of the file (inside functions and TYPE_CHECKING blocks too), forms an acyclic graph.
And ``import moh`` gives the public API."""
from __future__ import annotations

import ast
from pathlib import Path

import moh

SRC = Path(moh.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "moh.core.attention" in graph["moh"]  # the walk found the package
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the search finds cycles
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_public_api():
    for name in ("MoHAttention", "MoHConfig", "Routing", "load_balance_loss", "ROUTERS", "BACKENDS", "set_backend",
                 "create_model", "list_models", "__version__"):
        assert hasattr(moh, name), name
    assert {"reference", "masked", "sparse"} <= set(moh.BACKENDS.names())
    assert {"all", "two_stage", "query_norm"} <= set(moh.ROUTERS.names())
    assert "Mixture-of-Head" in moh.__doc__
