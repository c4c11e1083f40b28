"""The services as systemd runs them, minus systemd: the units' command lines, a NOTIFY_SOCKET and
WATCHDOG_USEC per process, and hmoectl against the live router and workers.

Each process gets the environment systemd gives a Type=notify service with WatchdogSec=1s; the test
owns the datagram sockets, so it sees exactly what systemd would: READY=1 once the process can
serve, WATCHDOG=1 at least every half interval, STOPPING=1 when a drain begins. The HTTP API (hmoe-http)
runs beside them as its unit runs it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers.net import free_port

from hmoe.runtime.client import Client

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
HMOECTL = UNITS.parent / "scripts" / "hmoectl"
WATCHDOG_S = 1.0
START_TIMEOUT_S = 60.0


class Service:
    """One process started as its unit would start it, and the notify socket systemd would own
    (read at once by a thread, as systemd does, so the process never waits on a full queue)."""

    def __init__(self, name: str, argv: list[str], tmp: Path, env: dict):
        self.name = name
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(f"\0hmoe-test-{uuid.uuid4().hex}")  # abstract, as `@name` in NOTIFY_SOCKET
        self.notify.settimeout(0.2)
        address = "@" + self.notify.getsockname()[1:].decode()
        self.messages: list[tuple[float, str]] = []  # (when, KEY=VALUE) in arrival order
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                env={**env, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6))},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _read(self) -> None:
        while self.notify.fileno() >= 0:
            try:
                datagram = self.notify.recv(4096)
            except (TimeoutError, OSError):
                continue
            self.messages += [(time.monotonic(), line) for line in datagram.decode().split("\n")]

    def wait_for(self, line: str, timeout_s: float, after_s: float = 0.0) -> float:
        """When `line` arrived (after `after_s`), or fail with the process's log."""
        deadline = time.monotonic() + timeout_s
        while (found := [t for t, m in list(self.messages) if m == line and t > after_s]) == []:
            if (
                time.monotonic() > deadline
                or self.proc.poll() is not None
                and time.monotonic() > deadline - timeout_s + 1
            ):
                raise AssertionError(
                    f"{self.name}: no {line} (exit {self.proc.poll()}); log:\n{self.log_path.read_text()[-3000:]}"
                )
            time.sleep(0.05)
        return found[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self.notify.close()


def exec_start(unit: str, config: Path, env: dict, instance: str = "") -> list[str]:
    """The unit's ExecStart= as systemd would run it here: this venv and config for /opt/hmoe/venv and
    /etc/hmoe/hmoe.toml, %i the instance, ${VAR} one word and $VAR split into words from `env`."""
    line = next(x for x in (UNITS / unit).read_text().splitlines() if x.startswith("ExecStart="))
    line = (
        line.removeprefix("ExecStart=")
        .replace("/opt/hmoe/venv/bin", str(VENV_BIN))
        .replace("/etc/hmoe/hmoe.toml", str(config))
        .replace("%i", instance)
    )
    argv = []
    for word in shlex.split(line):
        if whole := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(env.get(whole[1], ""))
        elif split := re.fullmatch(r"\$(\w+)", word):
            argv += env.get(split[1], "").split()
        else:
            argv.append(word)
    return argv


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    """hmoe-pack's command, then hmoe-router and hmoe-worker@prefill|decode, each as its unit runs it."""
    tmp = tmp_path_factory.mktemp("deploy")
    (tmp / "run").mkdir()
    prefix = f"hmoe-test-{uuid.uuid4().hex[:8]}."
    config = tmp / "hmoe.toml"  # stands in for /etc/hmoe/hmoe.toml
    http_port = free_port()
    config.write_text(f"""
[router]
frontend = "ipc://{tmp}/frontend.sock"
drain_grace_s = 20.0
[worker]
experts = "torch"
kv_cache_gib = 0.01
handoff_slot_tokens = 256
[shm]
prefix = "{prefix}"
[http]
port = {http_port}
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HMOE_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env |= {
        "HMOE_ROUTER_MODEL_DIR": str(tiny_models("deepseek_v3", "fp32")),
        "HMOE_WORKER_PACK": "deploy",
        "HMOE_PACK_ARGS": "",
        "RUNTIME_DIRECTORY": str(tmp / "run"),
    }  # what install.sh writes to hmoe.env, and what systemd sets
    stand_in = tmp / "bin"  # hmoectl drain runs `systemctl stop hmoe.target` on a systemd host: not ours
    stand_in.mkdir()
    (stand_in / "systemctl").write_text("#!/bin/sh\nexit 0\n")
    (stand_in / "systemctl").chmod(0o755)
    ctl_env = {
        **env,
        "PATH": f"{stand_in}:{env['PATH']}",
        "HMOE_VENV": str(VENV_BIN.parent),
        "HMOE_CONFIG": str(config),
        "HMOE_ENV_FILE": str(tmp / "none"),
        "HMOE_USER": "",
    }
    loaded = subprocess.run(
        exec_start("hmoe-pack.service", config, env), env=env, capture_output=True, text=True, timeout=120
    )
    assert loaded.returncode == 0 and "loaded pack deploy" in loaded.stdout, loaded.stdout + loaded.stderr
    services = {}
    for role in ("prefill", "decode"):  # Before=hmoe-router.service: workers first, the router once they are ready
        services[role] = Service(role, exec_start("hmoe-worker@.service", config, env, role), tmp, env)
    for role in ("prefill", "decode"):
        services[role].wait_for("READY=1", START_TIMEOUT_S)

    def start_router() -> None:
        services["router"] = Service("router", exec_start("hmoe-router.service", config, env), tmp, env)
        services["router"].wait_for("READY=1", START_TIMEOUT_S)
        deadline = time.monotonic() + 20.0  # workers register: sent before the router bound, or after it came back
        while hmoectl(ctl_env, "health", "--timeout", "1").returncode != 0:
            assert time.monotonic() < deadline, "the workers never registered with the router"
            time.sleep(0.2)

    start_router()
    services["http"] = Service("http", exec_start("hmoe-http.service", config, env), tmp, env)  # After=router
    services["http"].wait_for("READY=1", START_TIMEOUT_S)
    ctl_env["HTTP_URL"] = f"http://127.0.0.1:{http_port}"
    yield services, ctl_env, config, start_router
    codes = {name: services[name].stop() for name in ("http", "router", "prefill", "decode")}  # systemd's stop order
    removed = hmoectl(ctl_env, "shm", "rm", "deploy")
    assert codes == {"http": 0, "router": 0, "prefill": 0, "decode": 0}, codes
    assert removed.returncode == 0, removed.stderr


def hmoectl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HMOECTL), *args], env=env, capture_output=True, text=True, timeout=60)


def test_ready_then_watchdog_pings_from_every_process(stack):
    services, _, _, _ = stack
    time.sleep(2 * WATCHDOG_S)
    for service in services.values():
        ready_s = service.wait_for("READY=1", 1.0)
        pings = [t for t, m in list(service.messages) if m == "WATCHDOG=1" and t > ready_s]
        assert len(pings) >= 3, (service.name, service.messages)
        gaps = [b - a for a, b in zip([ready_s, *pings], [*pings, time.monotonic()])]
        assert max(gaps) < WATCHDOG_S, (service.name, gaps)  # systemd would never have fired


def test_hmoectl_health_and_status(stack):
    services, env, _, _ = stack
    health = hmoectl(env, "health")
    assert health.returncode == 0, health.stdout + health.stderr
    assert health.stdout.startswith("healthy: 1 prefill + 1 decode workers") and health.stdout.count("\n") == 1
    status = hmoectl(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    workers = json.loads(status.stdout)["workers"]
    assert sorted((w["role"], w["pid"]) for w in workers) == sorted(
        (role, services[role].proc.pid) for role in ("decode", "prefill")
    )  # the very processes started here
    packs = hmoectl(env, "shm", "ls", "--json")
    (pack,) = [p for p in json.loads(packs.stdout) if p["name"] == "deploy"]
    assert pack["state"] == "ready" and set(pack["attached_pids"]) >= {
        services[r].proc.pid for r in ("prefill", "decode")
    }


def test_the_http_api_serves_what_its_unit_runs(stack):
    _, env, _, _ = stack
    health = urllib.request.urlopen(f"{env['HTTP_URL']}/health", timeout=10)
    assert health.status == 200 and json.loads(health.read())["status"] == "healthy"
    body = json.dumps({"prompt": [5, 9, 2], "max_tokens": 4, "ignore_eos": True, "temperature": 0}).encode()
    answer = urllib.request.urlopen(urllib.request.Request(f"{env['HTTP_URL']}/v1/completions", body), timeout=60)
    usage = json.loads(answer.read())["usage"]
    assert usage == {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _stream_while(config: Path, stop) -> tuple[list[int], str]:
    """Tokens and finish reason of a 60-token request during which `stop()` runs (after its first token)."""
    with Client(f"ipc://{config.parent}/frontend.sock") as client:
        stream = client.generate(token_ids=[5, 9, 2, 44], max_tokens=60, ignore_eos=True)
        tokens = list(next(stream).token_ids)  # running: prefilled and decoding (a for loop left early cancels)
        stop()
        tokens += [t for chunk in stream for t in chunk.token_ids]
        return tokens, stream.final().finish_reason


def test_hmoectl_drain_finishes_requests_in_flight(stack):
    services, env, config, _ = stack
    drain = []

    def hmoectl_drain():
        drain.append(
            subprocess.Popen([str(HMOECTL), "drain", "--grace-s", "20"], env=env, stdout=subprocess.PIPE, text=True)
        )
        services["router"].wait_for("STOPPING=1", 10.0)

    tokens, reason = _stream_while(config, hmoectl_drain)
    assert reason == "length" and len(tokens) == 60  # nothing in flight was lost
    out, _ = drain[0].communicate(timeout=40)
    assert drain[0].returncode == 0 and out.splitlines()[-1] == "drained: the router has exited", out
    assert services["router"].proc.wait(10) == 0
    after = hmoectl(env, "health", "--timeout", "1")
    assert after.returncode == 2 and after.stdout.startswith("unhealthy: the router"), after.stdout


def test_workers_outlive_a_router_restart_and_sigterm_drains(stack):
    """Restart=on-failure brings a router back under running workers: they register again. Then
    `systemctl stop` (SIGTERM to the router, then to the workers it binds) loses nothing in flight."""
    services, env, config, start_router = stack
    start_router()  # waits until both workers registered with the new router

    def systemctl_stop():
        services["router"].proc.send_signal(signal.SIGTERM)
        services["router"].wait_for("STOPPING=1", 10.0)

    tokens, reason = _stream_while(config, systemctl_stop)
    assert reason == "length" and len(tokens) == 60
    assert services["router"].proc.wait(30) == 0
    for role in ("prefill", "decode"):  # stop order: the workers after the router; SIGTERM drains them
        services[role].proc.send_signal(signal.SIGTERM)
        services[role].wait_for("STOPPING=1", 10.0)
        assert services[role].proc.wait(30) == 0
