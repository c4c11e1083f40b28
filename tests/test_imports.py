"""The tree is the architecture: imports flow one way (STYLE.md rule 2), checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
# package -> third-party roots and hmoe subpackages its modules may import at module level.
ALLOWED = {
    "kernels": {"numpy", "numba", "llvmlite", "hmoe.kernels"},
    "shm": {"numpy", "posix_ipc", "msgpack", "hmoe.shm"},
    "runtime": {"zmq", "msgpack", "uvloop", "click", "structlog", "tokenizers", "hmoe.runtime", "hmoe.shm"},
}
# Never imported by these packages, not even lazily inside a function.
FORBIDDEN_ANYWHERE = {"runtime": {"torch", "numba", "hmoe.workers", "hmoe.kernels"}, "shm": {"hmoe.workers", "hmoe.runtime"},
                      "kernels": {"torch", "hmoe.workers", "hmoe.shm", "hmoe.runtime"}}


def _imports(tree: ast.Module, top_level_only: bool) -> list[str]:
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks are not real imports
            continue
    return names


def _allowed(name: str, allowed: set[str]) -> bool:
    root = name.split(".")[0]
    if root in STDLIB or root == "__future__":
        return True
    return any(name == a or name.startswith(a + ".") for a in allowed) or (root != "hmoe" and root in allowed)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_flow_one_way(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name in _imports(tree, top_level_only=True):
            if not _allowed(name, ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)}: imports {name}")
        for name in _imports(tree, top_level_only=False):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_ANYWHERE[package]):
                bad.append(f"{path.relative_to(ROOT)}: imports {name} (forbidden anywhere in {package}/)")
    assert not bad, "\n".join(bad)


def test_client_side_starts_without_torch_or_numba():
    """The SDK and router import neither torch nor numba (a client starts in well under a second)."""
    code = ("import sys, hmoe.runtime, hmoe.runtime.sampling_params, hmoe.runtime.tokenizer;"
            "import pkgutil, importlib;"
            "[importlib.import_module('hmoe.runtime.' + m.name) for m in pkgutil.iter_modules(hmoe.runtime.__path__)];"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numba')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
