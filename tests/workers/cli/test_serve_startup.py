"""`hmoe serve` at start-up: cheap checks before anything heavy, one line and exit 3 on failure, and
nothing left behind (the pack this start loaded, the pid file, the sockets); `hmoe generate --wait`
stops waiting for it. Real processes where serve starts children; click's runner where it does not."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
from click.testing import CliRunner
from helpers.net import free_port

from hmoe.runtime.cli import main
from hmoe.shm import ShmConfig
from hmoe.workers.cli.serve import demo_pack_name


@pytest.fixture
def env(tmp_path):
    prefix = f"hmoe-test-{uuid.uuid4().hex[:8]}."
    yield {
        "HMOE_SHM_PREFIX": prefix,
        "HMOE_SHM_LOCK_DIR": str(tmp_path),
        "HMOE_ROUTER_RUNTIME_DIR": str(tmp_path / "run"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    from hmoe.shm.segment import unlink_segment

    config = ShmConfig(prefix=prefix, lock_dir=str(tmp_path))
    for name in config.pack_names():
        unlink_segment(name, config)


def _packs(env) -> list[str]:
    return ShmConfig(prefix=env["HMOE_SHM_PREFIX"], lock_dir=env["HMOE_SHM_LOCK_DIR"]).pack_names()


def test_a_port_in_use_fails_at_once_with_one_line_and_loads_nothing(env, tiny_models, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            main, ["serve", str(tiny_models("deepseek_v3", "bf16")), "--port", str(port)], env=env
        )
    assert result.exit_code == 3, result.output
    assert (
        result.output
        == f"error: [startup_failed] tcp://127.0.0.1:{port} is in use: stop what listens there or pick another --port\n"
    )
    assert _packs(env) == []  # checked before the pack was loaded
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [f"serve-{port}.failed"]  # no log, no pid file, no socket
    waited = CliRunner().invoke(main, ["generate", "--port", str(port), "--wait", "600", "Hi"], env=env)
    assert waited.exit_code == 1 and "[not_ready] hmoe serve failed to start" in waited.output


def test_a_bad_model_folder_or_device_fails_before_loading(env, tmp_path):
    missing = CliRunner().invoke(main, ["serve", str(tmp_path / "nope"), "--port", str(free_port())], env=env)
    assert missing.exit_code == 3 and missing.output.startswith("error: [model_not_found] "), missing.output
    device = CliRunner().invoke(main, ["serve", "--device", "cuda:99", "--port", str(free_port())], env=env)
    assert device.exit_code == 3 and device.output.startswith("error: [device_unavailable] "), device.output
    assert _packs(env) == [] and not (tmp_path / "cache").exists()  # not even the demo model was made


def test_the_demo_pack_is_named_per_user():
    assert demo_pack_name() == f"demo-u{os.getuid()}-deepseek_v3-tiny-bf16"


@pytest.mark.slow
def test_a_failed_start_removes_the_pack_it_loaded_and_its_files(env, tmp_path):
    """The demo model, its pack loaded, then the router fails (an unreadable CURVE key): exit 3, clean."""
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "hmoe.runtime.cli", "serve", "--port", str(port)],
        env={**os.environ, **env, "HMOE_ROUTER_CURVE_SECRET_KEY": str(tmp_path / "no-such-key")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 3, said
    assert f"loaded weight pack {demo_pack_name()}" in said and f"removed weight pack {demo_pack_name()}" in said
    assert "cannot read the CURVE secret key" in said  # the cause, from the router's log lines
    assert f"creating pack {demo_pack_name()}" in said  # the loader's lines reach the user under serve
    assert _packs(env) == []
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [f"serve-{port}.failed", f"serve-{port}.log"]
    assert "before it was ready" in (run_dir / f"serve-{port}.failed").read_text()
