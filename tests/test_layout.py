"""The package's shape: no import cycles inside tl/."""

from __future__ import annotations

import ast
from pathlib import Path

TL = Path(__file__).resolve().parents[1] / "tl"


def module_name(path: Path) -> str:
    parts = path.relative_to(TL.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tl_imports() -> dict[str, set[str]]:
    """Each tl module -> the tl modules it imports (at any depth of its code, deferred imports included)."""
    modules = {module_name(p): p for p in TL.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = tl_imports()

    def reaches(start: str, target: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == target:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph.get(m, ()))
        return False

    # Package __init__ files re-export their children; a child importing its own package is not a cycle of concerns.
    cycles = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps
                    if not a.startswith(b + ".") and not b.startswith(a + ".") and reaches(b, a))
    assert not cycles, cycles
