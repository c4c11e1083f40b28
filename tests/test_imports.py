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
    "runtime": {
        *("zmq", "msgpack", "uvloop", "click", "structlog", "tokenizers", "hmoe.runtime", "hmoe.shm"),
        *("fastapi", "starlette", "uvicorn", "jinja2", "prometheus_client"),  # the HTTP API (runtime/http)
    },
}
# Never imported by these packages, not even lazily inside a function.
FORBIDDEN_ANYWHERE = {
    "runtime": {"torch", "numba", "hmoe.workers", "hmoe.kernels"},
    "shm": {"torch", "numba", "hmoe.workers", "hmoe.runtime"},
    "kernels": {"torch", "hmoe.workers", "hmoe.shm", "hmoe.runtime"},
}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """Every statement that runs at import: module body, and inside its try/if/with/for blocks (but
    not function or class bodies, nor `if TYPE_CHECKING:`)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or _is_type_checking(node):
            continue
        out.append(node)
        if not isinstance(node, ast.ClassDef):
            todo.extend(ast.iter_child_nodes(node))
        else:
            todo.extend(n for n in node.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    return out


def _imports(tree: ast.Module, top_level_only: bool, package: str = "") -> list[str]:
    """Absolute module names imported; relative ones resolved against `package` (hmoe.kernels, ...)."""
    nodes = _module_level(tree) if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names.append(".".join(p for p in (base, node.module or "") if p) if node.level else node.module)
    return names


def _package_of(path: Path) -> str:
    """kernels/moe.py -> hmoe.kernels; workers/model/layers.py -> hmoe.workers.model."""
    return ".".join(("hmoe", *path.relative_to(ROOT).parent.parts))


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
        for name in _imports(tree, top_level_only=True, package=_package_of(path)):
            if not _allowed(name, ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)}: imports {name}")
        for name in _imports(tree, top_level_only=False, package=_package_of(path)):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN_ANYWHERE[package]):
                bad.append(f"{path.relative_to(ROOT)}: imports {name} (forbidden anywhere in {package}/)")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_imports_in_blocks_and_skips_functions():
    tree = ast.parse(
        "try:\n    import torch\nexcept ImportError:\n    pass\nif X:\n    from a.b import c\n"
        "with y:\n    import zmq\ndef f():\n    import numba\nif TYPE_CHECKING:\n    import q\n"
        "from .formats import x\nfrom .. import runtime\n"
    )
    found = sorted(_imports(tree, top_level_only=True, package="hmoe.kernels"))
    assert found == ["a.b", "hmoe", "hmoe.kernels.formats", "torch", "zmq"]
    assert "numba" in _imports(tree, top_level_only=False)


def test_client_side_starts_without_torch_or_numba():
    """The SDK, the router and every module of runtime/ import neither torch nor numba."""
    code = (
        "import sys, pkgutil, importlib, hmoe.runtime;"
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(hmoe.runtime.__path__, 'hmoe.runtime.')"
        " if not m.name.endswith('__main__')];"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numba')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["generate", "--help"],
        ["status", "--help"],
        ["health", "--help"],
        ["drain", "--help"],
        ["config-skeleton"],
    ],
)
def test_torch_free_commands_never_import_torch(argv):
    """`hmoe` assembles runtime/'s commands with the worker ones, which load only when invoked."""
    code = (
        "import sys, runpy; sys.argv = ['hmoe', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('hmoe.runtime.cli', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numba', 'hmoe.workers'}),"
        " [m for m in sys.modules if m.startswith('hmoe.workers')])"
    )
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY [] []"
