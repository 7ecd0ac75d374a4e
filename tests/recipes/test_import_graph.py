"""The recipes' modules depend on each other one way only: no import circle, however deferred.

Every relative import counts, including those inside functions and ``if TYPE_CHECKING:`` blocks: a
circle that only type checkers or a lazy import close is still two files that need each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The sibling recipe modules that ``path`` imports anywhere in its body."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        if node.module is None:  # from . import a, b
            found.update(alias.name for alias in node.names if alias.name in modules)
        else:
            found.add(node.module.split(".")[0])
    return found & modules


def _graph() -> dict[str, set[str]]:
    files = {p.stem: p for p in RECIPES.glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_sees_a_circle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_is_read() -> None:
    graph = _graph()
    # the dependencies the issue names, in the direction they must run
    assert "report" in graph["train_loop"] and "finetune_loop" in graph["finetune"]
    assert "train_loop" not in graph["report"] and "finetune" not in graph["finetune_loop"]


def test_no_import_circle_in_recipes() -> None:
    cycle = _find_cycle(_graph())
    assert cycle is None, "import circle in recipes/: " + " -> ".join(cycle or [])
