"""`hmoe shm load|ls|rm|gc` as a user types them (click's runner; [shm] settings from HMOE_SHM_*)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers.shm_pack import CHILD_TIMEOUT_S, child, wait_line

from hmoe.runtime.cli import main


@pytest.fixture
def hmoe_shm(shm_config):
    env = {"HMOE_SHM_PREFIX": shm_config.prefix, "HMOE_SHM_LOCK_DIR": shm_config.lock_dir}

    def invoke(*args):
        return CliRunner().invoke(main, ["shm", *(str(a) for a in args)], env=env)  # as `hmoe shm ...`

    return invoke


def test_load_ls_rm(hmoe_shm, tiny_models):
    path = tiny_models("deepseek_v3", "fp8")
    loaded = hmoe_shm("load", path, "--name", "v3", "--threads", "2")
    assert loaded.exit_code == 0, loaded.output
    assert "loaded pack v3" in loaded.output and "experts fp8" in loaded.output
    assert "already loaded" in hmoe_shm("load", path, "--name", "v3").output
    int4 = hmoe_shm("load", path, "--name", "v3-q", "--experts", "int4", "--group", "32")
    assert int4.exit_code == 0, int4.output
    table = hmoe_shm("ls").output.splitlines()
    assert table[0].split()[:6] == ["NAME", "STATE", "SIZE", "EXPERTS", "MODEL", "ATTACHED"]
    assert [line.split()[0] for line in table[1:]] == ["v3", "v3-q"]
    assert "int4-g32" in table[2] and "DeepseekV3ForCausalLM" in table[1]
    listed = json.loads(hmoe_shm("ls", "--json").output)
    assert [(p["name"], p["state"], p["experts"]) for p in listed] == [
        ("v3", "ready", "fp8"),
        ("v3-q", "ready", "int4-g32"),
    ]
    assert listed[0]["source"] == str(path.resolve()) and listed[0]["nbytes"] > 0
    assert hmoe_shm("rm", "v3").exit_code == 0
    assert [p["name"] for p in json.loads(hmoe_shm("ls", "--json").output)] == ["v3-q"]


def test_errors_are_one_line_with_a_code(hmoe_shm, tiny_models):
    missing = hmoe_shm("rm", "nope")
    assert missing.exit_code == 1 and "[pack_not_found]" in missing.output and "Traceback" not in missing.output
    bad_name = hmoe_shm("load", tiny_models("qwen3_moe", "bf16"), "--name", "../etc")
    assert bad_name.exit_code == 1 and "[pack_name_invalid]" in bad_name.output
    assert hmoe_shm("gc").output.strip() == "nothing to remove"  # `rm nope` left no lock file behind


def test_gc_dry_run_then_gc_keeps_attached_packs(hmoe_shm, tiny_models, shm_config):
    for name in ("idle", "busy"):
        assert hmoe_shm("load", tiny_models("qwen3_moe", "bf16"), "--name", name).exit_code == 0
    user = child('pack = Pack.attach("busy", config); print("attached", flush=True); sys.stdin.readline()', shm_config)
    try:
        wait_line(user, "attached")
        busy = [p for p in json.loads(hmoe_shm("ls", "--json").output) if p["name"] == "busy"][0]
        assert busy["attached_pids"] == [user.pid]
        dry = hmoe_shm("gc", "--dry-run").output
        assert "would remove idle: ready but attached by no process" in dry and "busy" not in dry
        assert sorted(shm_config.pack_names()) == ["busy", "idle"]
        assert "removed idle" in hmoe_shm("gc").output
        assert shm_config.pack_names() == ["busy"]
        refused = hmoe_shm("rm", "busy")
        assert refused.exit_code == 1 and "[pack_busy]" in refused.output and str(user.pid) in refused.output
        assert hmoe_shm("rm", "busy", "--force").exit_code == 0
    finally:
        user.kill()
        user.wait(CHILD_TIMEOUT_S)


def test_load_and_rm_say_each_thing_once(tiny_models, shm_config):
    """As a terminal shows them (a real process: its log lines and its own lines share stderr/stdout)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HMOE_SHM_PREFIX=shm_config.prefix, HMOE_SHM_LOCK_DIR=shm_config.lock_dir)

    def hmoe_shm(*args):
        cmd = [sys.executable, "-m", "hmoe.runtime.cli", "shm", *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    loaded = hmoe_shm("load", tiny_models("qwen3_moe", "bf16"), "--name", "once")
    said = loaded.stdout + loaded.stderr
    assert loaded.returncode == 0, said
    lines = said.splitlines()
    assert sum("pages" in line for line in lines) == 1 and said.count("GB/s") == 1, said  # one page line, one speed
    removed = hmoe_shm("rm", "once")
    assert removed.returncode == 0 and (removed.stdout + removed.stderr).count("removed") == 1, removed


def test_a_half_loaded_pack_never_blames_pid_0():
    from hmoe.shm.pack import _not_ready

    assert "pid 0" not in str(_not_ready("p", 0, loader_alive=False))
    assert "pid 0" not in str(_not_ready("p", 0, loader_alive=True))
    assert "its loader, pid 77, stopped halfway" in str(_not_ready("p", 77, loader_alive=False))
