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


@pytest.mark.parametrize("script", ALL, ids=lambda p: p.name)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_only_prints_help(script, flag, tmp_path):
    """--help says what the script does and does nothing: no pip, no files, not even as root."""
    pip_log = _fake_venv(tmp_path)
    env = {**os.environ, "HMOE_ROOT": str(tmp_path), "HMOE_VENV": str(tmp_path / "opt/hmoe/venv")}
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = subprocess.run([script, flag], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and script.name in result.stdout, result.stdout + result.stderr
    assert not pip_log.exists() and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_install_dry_run_says_each_step_and_changes_nothing(tmp_path):
    pip_log = _fake_venv(tmp_path)
    result = subprocess.run(
        [SCRIPTS / "install.sh", "--dry-run", "--root", str(tmp_path), "hmoe==0.1.0"],
        capture_output=True,
        text=True,
        check=True,
    )
    steps = result.stdout.splitlines()
    assert all(step.startswith("+ ") for step in steps), steps
    assert any("-m pip install" in step and "hmoe==0.1.0" in step for step in steps)
    assert f"+ write {tmp_path}/etc/hmoe/hmoe.toml (hmoe config-skeleton)" in steps
    assert not any("useradd" in step or "systemctl" in step for step in steps)  # a staging root touches neither
    assert "pip install" not in (pip_log.read_text() if pip_log.exists() else "")  # (it may probe for torch)
    assert not (tmp_path / "etc").exists()
    bad = subprocess.run([SCRIPTS / "install.sh", "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 64 and "unknown option '--frobnicate'" in bad.stderr


def test_hmoectl_usage_and_unknown_role():
    hmoectl = SCRIPTS / "hmoectl"
    usage = subprocess.run([hmoectl, "help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "hmoectl health" in usage.stdout
    unknown = subprocess.run([hmoectl, "frobnicate"], capture_output=True, text=True)
    assert unknown.returncode == 64 and "unknown command 'frobnicate'" in unknown.stderr
    bad = subprocess.run([hmoectl, "restart", "nope"], capture_output=True, text=True)
    assert bad.returncode == 64 and "unknown role 'nope'" in bad.stderr


def test_hmoectl_roles_name_their_units(tmp_path):
    """Each role, the HTTP API's included, maps to its systemd unit (a stand-in systemctl prints its args)."""
    fake = tmp_path / "systemctl"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", HMOE_ENV_FILE=str(tmp_path / "none"))
    units = {
        "router": "hmoe-router.service",
        "prefill": "hmoe-worker@prefill.service",
        "http": "hmoe-http.service",
        "pack": "hmoe-pack.service",
        "all": "hmoe.target",
    }
    for role, unit in units.items():
        done = subprocess.run([SCRIPTS / "hmoectl", "restart", role], capture_output=True, text=True, env=env)
        assert (done.returncode, done.stdout.strip()) == (0, f"restart {unit}"), done.stderr
