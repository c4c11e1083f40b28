"""The README's command lines work: every `hmoe ...`, deploy script and benchmark line in its fenced
blocks is run with --help, and each option the line spells must be one its --help lists; the
commands a newcomer types first also run on a tiny input. A README line that fails, fails here."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hmoe.runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)


def _command_lines() -> list[str]:
    """Each command of the shell blocks: continuation lines joined, comments cut, chains split."""
    lines: list[str] = []
    for language, body in BLOCKS:
        if language:  # ```python: the SDK example, checked below
            continue
        for line in body.splitlines():
            if line.startswith(" ") and lines:
                lines[-1] += " " + line.strip()
            elif line.strip():
                lines.append(line)
    commands = []
    for line in lines:
        line = re.sub(r"\s{2,}#.*$", "", line)
        for part in re.split(r"&&|[{};]|\s&(?=\s|$)|\s{3,}(?=hmoe )", line):
            part = part.strip().removeprefix("sudo ").strip()
            if part:
                commands.append(part)
    return commands


COMMANDS = _command_lines()


def _flags(command: str) -> list[str]:
    return re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", command)


def _kind(command: str) -> str:
    word = command.split()[0]
    if word.endswith("bin/hmoe") or word == "hmoe":
        return "hmoe"
    if word.startswith("deploy/scripts/") or word == "hmoectl":
        return "script"
    if re.match(r"python (-m bench\.\w+|bench/\w+\.py)", command):
        return "bench"
    return "other"  # sudoedit, systemctl, pytest: not ours to smoke


def test_the_readme_has_the_commands_we_check():
    kinds = {_kind(c) for c in COMMANDS}
    assert {"hmoe", "script", "bench"} <= kinds, COMMANDS
    assert sum(_kind(c) == "hmoe" for c in COMMANDS) >= 10


@pytest.mark.parametrize("command", [c for c in COMMANDS if _kind(c) == "hmoe"])
def test_hmoe_lines(command):
    words = command.split()[1:]
    path, group = [], main
    while words and hasattr(group, "get_command"):
        sub = group.get_command(None, words[0]) if words[0].isidentifier() or "-" in words[0] else None
        if sub is None:
            break
        path.append(words.pop(0))
        group = sub
    assert path, f"README line {command!r} names no hmoe command"
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    for flag in _flags(command):
        assert flag in result.output, f"README line {command!r}: hmoe {' '.join(path)} has no {flag}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if _kind(c) == "script"])
def test_script_lines(command):
    word = command.split()[0]
    script = ROOT / "deploy" / "scripts" / ("hmoectl" if word == "hmoectl" else Path(word).name)
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for flag in _flags(command):
        assert flag in result.stdout, f"README line {command!r}: {script.name} --help has no {flag}"
    if word == "hmoectl":
        assert f"hmoectl {command.split()[1]}" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if _kind(c) == "bench"])
def test_benchmark_lines(command):
    argv = command.split()[:3] if command.startswith("python -m") else command.split()[:2]
    result = subprocess.run(
        [sys.executable, *argv[1:], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in _flags(command):
        assert flag in result.stdout, f"README line {command!r}: no {flag} in its --help"


def test_the_python_examples_parse_and_name_what_the_sdk_exports():
    import hmoe.runtime

    examples = [ast.parse(body) for language, body in BLOCKS if language == "python"]  # (a SyntaxError fails)
    imported = [
        alias.name
        for tree in examples
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "hmoe.runtime"
        for alias in node.names
    ]
    assert imported and all(hasattr(hmoe.runtime, name) for name in imported)


def test_the_first_commands_run_on_a_tiny_input(tmp_path):
    """make-model, run (prompt inline and from stdin), shm ls, install.sh --dry-run: as the README spells them."""
    runner = CliRunner()
    made = runner.invoke(main, ["make-model", str(tmp_path / "m"), "--arch", "qwen3_moe", "--preset", "tiny"])
    assert made.exit_code == 0, made.output
    ran = runner.invoke(main, ["run", str(tmp_path / "m"), "--prompt", "Hello", "--max-tokens", "2", "--json"])
    assert ran.exit_code == 0, ran.output
    piped = runner.invoke(main, ["run", str(tmp_path / "m"), "--prompt", "-", "--max-tokens", "2"], input="Hello")
    assert piped.exit_code == 0, piped.output
    env = {"HMOE_SHM_PREFIX": f"hmoe-readme-{os.getpid()}.", "HMOE_SHM_LOCK_DIR": str(tmp_path)}
    assert runner.invoke(main, ["shm", "ls", "--json"], env=env).output.strip() == "[]"
    dry = subprocess.run(
        [ROOT / "deploy/scripts/install.sh", "--dry-run", "--root", str(tmp_path / "staging")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dry.returncode == 0 and "+ install -m 0755" in dry.stdout, dry.stderr
    assert not (tmp_path / "staging" / "etc").exists()
