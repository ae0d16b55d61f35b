"""The package's shape: no import cycles between its modules (function-level imports included)."""

import ast
from pathlib import Path

import specgate

PACKAGE = Path(specgate.__file__).parent


def _imports(path: Path) -> set[str]:
    """The specgate modules a file imports, wherever in the file the import is (but for imports
    that only type checkers run, under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("specgate."):
            found.add(node.module.split(".")[1])
    return {name.split(".")[0] for name in found} - {"kernels"}


def test_the_import_graph_has_no_cycles():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert graph["train"] >= {"damage", "gradient"}, "the parser sees the imports"
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
