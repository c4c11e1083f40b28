"""The client SDK on its own: what importing it costs, typed errors, an absent router, CURVE."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import zmq.auth
from helpers.net import free_port, start_router

from hmoe.runtime import Client, QueueFull, RequestFailed, RequestRefused, RouterUnreachable, WorkerLost
from hmoe.runtime.client import Result, Usage, router_error, status_once
from hmoe.runtime.supervisor import RestartPolicy


def test_the_sdk_imports_no_torch_numba_or_tokenizers():
    code = (
        "import sys; from hmoe.runtime import Client, AsyncClient;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numba', 'tokenizers'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_generate_command_imports_no_torch():
    trace = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hmoe.runtime.cli", "generate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    assert not [line for line in trace.splitlines() if line.rstrip().endswith((" torch", " numba"))]


def test_error_codes_become_typed_exceptions():
    assert type(router_error("queue_full", "busy")) is QueueFull and isinstance(
        router_error("queue_full", "x"), RequestRefused
    )
    refused = router_error("prompt_too_long", "too long")
    assert (
        type(refused) is RequestRefused
        and refused.code == "prompt_too_long"
        and str(refused) == "[prompt_too_long] too long"
    )
    partial = Result("r", "ab", (1, 2), "error", Usage(3, 2, 0.1, 0.01))
    lost = router_error("worker_lost", "gone", partial)
    assert type(lost) is WorkerLost and isinstance(lost, RequestFailed) and lost.result is partial


def test_an_absent_router_is_reported_not_waited_for_forever():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with Client(endpoint, heartbeat_interval_s=0.1, router_timeout_s=0.5) as client:
        with pytest.raises(RouterUnreachable) as absent:
            client.complete("hello", max_tokens=2)
        assert absent.value.code == "router_unreachable"
        with pytest.raises(RouterUnreachable):
            client.status()
    with pytest.raises(RouterUnreachable):
        status_once(endpoint, 0.3)


def test_curve_encrypts_the_frontend_and_refuses_plain_clients(tmp_path):
    public, secret = zmq.auth.create_certificates(tmp_path, "router")
    router = start_router(tmp_path, "--curve-secret-key", secret)
    with Client(router.frontend, server_public_key=public, router_timeout_s=3.0) as client:
        assert client.status()["workers"] == []
    assert status_once(router.frontend, 3.0, secret)["queued"] == 0  # the secret file holds the public key too
    with pytest.raises(RouterUnreachable):
        status_once(router.frontend, 0.5)  # no CURVE handshake: the router never sees the request
    assert router.stop() == 0


def test_restart_policy_bounds_restarts_per_child_and_never_restarts_a_start_up_failure():
    policy = RestartPolicy(max_restarts=2, window_s=10.0)
    assert [policy.allow("decode", -9, t) for t in (0.0, 1.0, 2.0)] == [True, True, False]
    assert policy.allow("prefill", 1, 2.0)  # counted per child
    assert policy.allow("decode", -9, 10.5)  # the first restart left the window
    assert not policy.allow("router", 3, 20.0) and not policy.allow("router", 2, 20.0)


def test_every_error_code_the_runtime_raises_is_documented():
    import re
    from pathlib import Path

    from hmoe.runtime.error_codes import ERROR_CODES

    root = Path(__file__).resolve().parents[2]
    # Everything that can answer a client: the router side, and the worker engines (their per-request
    # errors reach the client in Finished.error unchanged).
    sources = [*(root / "runtime").rglob("*.py"), *(root / "workers" / "engine").rglob("*.py")]
    pattern = re.compile(
        r'(?:HmoeError|ProtocolError|RouterUnreachable|HandoffError|Error)\(\s*"([a-z_]+)"|"code": "([a-z_]+)"'
        r'|(?:RequestError\(|_refuse\(|_cancel_all\()[^,()]*(?:\([^()]*\))?,\s*"([a-z_]+)"'
    )
    raised = {a or b or c for path in sources for a, b, c in pattern.findall(path.read_text())}
    raised -= {"config_invalid", "config_missing"}  # config errors: hmoe.runtime.config, reported at start-up
    assert raised and raised <= set(ERROR_CODES), sorted(raised - set(ERROR_CODES))


@pytest.fixture
def short_dir():
    """A folder with a short path: unix socket paths hold at most 107 bytes."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="hmoe-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _child(tmp_path, name: str, body: str) -> list[str]:
    """A tiny child process that speaks sd_notify like the router and the workers."""
    script = tmp_path / f"{name}.py"
    script.write_text("import sys, time\nfrom hmoe.runtime.sd_notify import SdNotify\nn = SdNotify.from_env()\n" + body)
    return [sys.executable, str(script)]


def test_supervisor_kills_and_restarts_a_child_that_stops_making_progress(tmp_path, short_dir):
    """READY=1, a second of watchdog pings, then a hang (a stuck main loop): killed after watchdog_s, restarted."""
    from hmoe.runtime.supervisor import ChildSpec, Supervisor

    hang = "n.ready()\nt = time.monotonic()\nwhile time.monotonic() - t < 1:\n    n.tick()\n    time.sleep(0.05)\n"
    hang += "time.sleep(600)\n"
    said: list[str] = []
    with open(tmp_path / "out.log", "wb") as out:
        sup = Supervisor(
            [ChildSpec("worker", tuple(_child(tmp_path, "w", hang)), 1.0, watchdog_s=0.5)],
            out,
            say=said.append,
            notify_dir=short_dir,
        )
        sup.start()
        first = sup.pids()["worker"]
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        sup.run(on_tick=lambda: sup.signals or (sup.pids()["worker"] != first and sup._on_signal(2, None)))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # not left to the next test
    assert any("made no progress" in line and "watchdog" in line for line in said), said
    assert any("worker exited with status -9; restarting it" in line for line in said), said


def test_supervisor_stops_the_service_when_a_child_drained_on_request(tmp_path, short_dir):
    from hmoe.runtime.supervisor import ChildSpec, Supervisor

    drained = "n.ready()\ntime.sleep(0.3)\nn.send('X_HMOE_STOP=1')\nsys.exit(0)\n"
    idle = "import signal\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\nn.ready()\ntime.sleep(600)\n"
    said: list[str] = []
    with open(tmp_path / "out.log", "wb") as out:
        sup = Supervisor(
            [
                ChildSpec("router", tuple(_child(tmp_path, "r", drained)), 5.0),
                ChildSpec("worker", tuple(_child(tmp_path, "w", idle)), 5.0),
            ],
            out,
            say=said.append,
            notify_dir=short_dir,
        )
        sup.start()
        code = sup.run()
    assert code == 0
    assert said[0] == "router drained on request: stopping the service" and not any("restarting" in s for s in said)


def test_a_router_that_goes_away_fails_requests_in_flight_with_router_restarted():
    """SDK against a stand-in router socket: a dropped connection fails what is in flight at once; a new
    router whose Pong says it does not know a request fails that one (both typed, retryable)."""
    from helpers.net import free_port

    from hmoe.runtime import RouterRestarted
    from hmoe.runtime.protocol import Generate, Ping, Pong, decode, encode

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    context = zmq.Context.instance()

    def stand_in() -> zmq.Socket:
        sock = context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(endpoint)
        sock.setsockopt(zmq.RCVTIMEO, 5000)
        return sock

    router = stand_in()
    with Client(endpoint, heartbeat_interval_s=0.1) as client:
        stream = client.generate(token_ids=[1, 2], max_tokens=4)
        assert isinstance(decode(router.recv_multipart()[1]), Generate)  # accepted, then the router dies
        router.close(linger=0)
        with pytest.raises(RouterRestarted) as dropped:
            next(stream)
        assert dropped.value.code == "router_restarted" and "dropped" in dropped.value.message
        router = stand_in()
        lost = client.generate(token_ids=[1, 2], max_tokens=4, request_id="sent-in-the-gap")
        while True:  # the new router never got the Generate (say it went to the old one): its Pong says so
            identity, frame = router.recv_multipart()
            if isinstance(msg := decode(frame), Ping) and "sent-in-the-gap" in msg.request_ids:
                router.send_multipart([identity, encode(Pong(msg.sent_s, ["sent-in-the-gap"], "new"))])
                break
        with pytest.raises(RouterRestarted):
            next(lost)
    router.close(linger=0)
