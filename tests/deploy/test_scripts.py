"""deploy/scripts: shellcheck-clean, strict mode, and install.sh idempotent in a staging root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmoe.runtime.config import skeleton

SCRIPTS = Path(__file__).resolve().parents[2] / "deploy" / "scripts"
ALL = sorted(p for p in SCRIPTS.iterdir() if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash"))


def test_every_script_is_found():
    assert {p.name for p in ALL} >= {"dev-setup.sh", "install.sh", "hmoectl"}


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
def test_shellcheck_clean_and_strict(script, shellcheck):
    assert "\nset -euo pipefail\n" in script.read_text()
    assert os.access(script, os.X_OK)
    result = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _fake_venv(root: Path) -> Path:
    """A venv stand-in: its python records pip calls (and has torch), its hmoe is the real one."""
    bin_dir = root / "opt/hmoe/venv/bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >> {root}/pip.log\n')
    python.chmod(0o755)
    (bin_dir / "hmoe").symlink_to(Path(sys.executable).parent / "hmoe")
    return root / "pip.log"


def test_install_stages_everything_and_keeps_edited_config(tmp_path):
    pip_log = _fake_venv(tmp_path)
    env = {**os.environ, "HMOE_ROOT": str(tmp_path)}
    run = lambda: subprocess.run(
        [SCRIPTS / "install.sh", "hmoe==0.1.0"], env=env, capture_output=True, text=True, check=True
    )  # noqa: E731
    run()
    toml, hmoe_env = tmp_path / "etc/hmoe/hmoe.toml", tmp_path / "etc/hmoe/hmoe.env"
    assert toml.read_text() == skeleton()
    assert "HMOE_ROUTER_MODEL_DIR=" in hmoe_env.read_text() and "HMOE_WORKER_PACK=" in hmoe_env.read_text()
    assert oct(toml.stat().st_mode & 0o777) == "0o640"
    units = {p.name for p in (tmp_path / "etc/systemd/system").iterdir()}
    assert units == {p.name for p in (SCRIPTS.parent / "systemd").iterdir()}
    assert os.access(tmp_path / "usr/local/bin/hmoectl", os.X_OK)

    toml.write_text("[router]\nmax_queued = 7\n")  # the operator's edit
    run()  # again: an upgrade
    assert toml.read_text() == "[router]\nmax_queued = 7\n"
    assert pip_log.read_text().count("-m pip install") == 2 and "hmoe==0.1.0" in pip_log.read_text()
    assert not (tmp_path / "etc/hmoe/hmoe.toml.new").exists()


def test_hmoectl_usage_and_unknown_role():
    hmoectl = SCRIPTS / "hmoectl"
    usage = subprocess.run([hmoectl, "help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "hmoectl health" in usage.stdout
    assert subprocess.run([hmoectl, "frobnicate"], capture_output=True, text=True).returncode != 0
    bad = subprocess.run([hmoectl, "restart", "nope"], capture_output=True, text=True)
    assert bad.returncode == 64 and "unknown role 'nope'" in bad.stderr
