"""SdNotify speaks systemd's notify protocol: datagrams on a NOTIFY_SOCKET this test owns."""

from __future__ import annotations

import os
import socket
import time

import pytest

from hmoe.runtime.sd_notify import SdNotify, watchdog_interval_s


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """(NOTIFY_SOCKET value, bound receiving socket), as systemd would hand it to a service."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        address = f"@hmoe-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + address[1:])
    sock.settimeout(2.0)
    yield address, sock
    sock.close()


def _recv(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_stopping_arrive_as_datagrams(notify_socket):
    address, sock = notify_socket
    notify = SdNotify.from_env({"NOTIFY_SOCKET": address})
    assert notify.ready("serving on tcp://127.0.0.1:5555")
    assert _recv(sock) == ["READY=1", "STATUS=serving on tcp://127.0.0.1:5555"]
    assert notify.status("2 workers")
    assert _recv(sock) == ["STATUS=2 workers"]
    assert notify.stopping("draining")
    assert _recv(sock) == ["STOPPING=1", "STATUS=draining"]
    assert notify.extend_timeout(40.5)
    assert _recv(sock) == ["EXTEND_TIMEOUT_USEC=40500000"]


def test_tick_pings_at_most_every_half_interval(notify_socket):
    address, sock = notify_socket
    notify = SdNotify.from_env({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())})
    assert notify.watchdog_s == pytest.approx(0.2)
    assert notify.tick()  # the first tick pings at once
    assert _recv(sock) == ["WATCHDOG=1"]
    assert not notify.tick()  # too soon
    time.sleep(0.11)
    assert notify.tick()
    assert _recv(sock) == ["WATCHDOG=1"]


def test_without_systemd_every_call_is_a_no_op():
    notify = SdNotify.from_env({})
    assert not notify.enabled
    assert not notify.ready() and not notify.watchdog() and not notify.tick() and not notify.stopping()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval_s(env) == expected


def test_never_blocks_or_raises_when_the_socket_is_full_or_gone(tmp_path):
    """A supervisor that does not read (or went away) must not stall or kill a serving loop."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    notify = SdNotify.from_env({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    start = time.monotonic()
    sent = [notify.watchdog() for _ in range(2000)]  # far past the socket's queue of datagrams
    assert time.monotonic() - start < 5.0 and sent[0] and not sent[-1]
    sock.close()
    assert not notify.ready()  # nobody listens now: False, no exception
