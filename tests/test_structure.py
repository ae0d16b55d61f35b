"""The package's shape: no import cycles between its modules (function-level imports included), and
the top-level kernels/ folder does not hide Hugging Face's `kernels` package."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels package is not installed")
def test_python_run_from_the_repo_root_still_imports_transformers():
    """`python -c` from the repo root puts it on sys.path, where our kernels/ folder would shadow Hugging
    Face's `kernels` package, which transformers imports; the folder hands the name over."""
    root = PACKAGE.parent
    code = "import specgate, specgate.kernels, transformers.activations, kernels; assert 'site-packages' in kernels.__file__"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
