"""House rules that are written down are checked here, so CI enforces them (STYLE.md): ruff's lint and
format at 120 columns, mypy on the torch-free packages (runtime/, shm/; both configured in
pyproject.toml) and the line budget of a module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("runtime", "workers", "shm", "kernels", "bench", "tests")
LINE_BUDGET = 400  # a module past it says why at its top: "past 400 lines because ..."


TYPED = ("runtime", "shm")  # mypy-checked: the packages every process and the SDK import


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: deploy/scripts/dev-setup.sh test installs it")
    return subprocess.run([path, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return _tool("ruff", *args)


def test_ruff_lint_passes():
    out = _ruff("check", "--output-format", "concise", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_format_leaves_every_file_as_it_is():
    out = _ruff("format", "--check", ".")
    assert out.returncode == 0, f"run `ruff format .`:\n{out.stdout}{out.stderr}"


def test_mypy_passes_on_runtime_and_shm():
    out = _tool("mypy", *TYPED)
    assert out.returncode == 0, out.stdout + out.stderr


def test_modules_past_the_line_budget_say_why():
    over = []
    for package in CODE:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > LINE_BUDGET:
                doc = ast.get_docstring(ast.parse(text)) or ""
                if f"past {LINE_BUDGET} lines" not in doc.lower():
                    over.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines, no reason in its docstring")
    assert not over, "\n".join(over)
