"""hmoe-router on its own: start-up failures and their exit status, systemd readiness, and refusing
work while no worker is registered. Everything with workers is in test_serve.py (real processes)."""

from __future__ import annotations

import signal
import socket

import pytest
from helpers.net import start_router

from hmoe.runtime import Client, RequestRefused


def test_start_up_failures_exit_3_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = start_router(tmp_path, "--frontend", f"tcp://127.0.0.1:{port}", wait=False)
        assert r.proc.wait(20) == 3 and "startup_failed" in r.log()
    bad = start_router(tmp_path, "--heartbeat-liveness", "1", wait=False)
    assert bad.proc.wait(20) == 3 and "config_invalid" in bad.log()
    live = start_router(tmp_path)
    twin = start_router(tmp_path, "--backend", live.backend, wait=False)  # would steal the live router's ipc socket
    assert twin.proc.wait(20) == 3 and "in use by a running router" in twin.log()
    assert live.stop() == 0


def test_ready_and_watchdog_reach_notify_socket(tmp_path):
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(20)
        r = start_router(tmp_path, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}, wait=False)
        got = set()
        while not {"READY=1", "WATCHDOG=1"} <= got:
            got |= set(listener.recv(4096).decode().splitlines())
        r.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in got:
            got |= set(listener.recv(4096).decode().splitlines())
        assert r.proc.wait(10) == 0


def test_router_without_workers_refuses_with_no_worker(tmp_path):
    r = start_router(tmp_path)
    with Client(r.frontend) as client:
        with pytest.raises(RequestRefused) as refused:
            client.complete(token_ids=[1, 2], max_tokens=2)
        assert refused.value.code == "no_worker" and "start one" in refused.value.message
        assert client.status()["workers"] == []
    assert r.stop() == 0
