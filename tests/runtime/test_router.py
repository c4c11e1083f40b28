"""hmoe-router as a process over real sockets: garbage on the wire, drain on SIGTERM, exit statuses,
systemd readiness, hung workers and vanished clients. The workers here are protocol-level stand-ins
(tests/runtime/fake_worker.py); tests/runtime/test_serve.py runs the same paths with real workers."""

from __future__ import annotations

import signal
import socket
import time

import msgpack
import pytest
import zmq
from fake_worker import FakeWorker, expected_tokens
from runtime_helpers import free_port, start_router

from hmoe.runtime import Client, RequestRefused, WorkerLost
from hmoe.runtime.protocol import MAX_MESSAGE_BYTES, VERSION, Error, Finished, Generate, decode, encode

FAST = ("--heartbeat-interval-s", "0.1", "--client-timeout-s", "1.0")


@pytest.fixture
def router(tmp_path):
    r = start_router(tmp_path, *FAST)
    workers = [FakeWorker(r.backend, "prefill").start(), FakeWorker(r.backend, "decode").start()]
    r.workers = workers
    with Client(r.frontend, router_timeout_s=5.0) as client:
        deadline = time.monotonic() + 10
        while len(client.status()["workers"]) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    yield r
    for w in workers:
        w.stop()
    r.stop()


def raw_dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    return sock


GARBAGE = [
    ([b"\xc1\xff not msgpack"], "bad_message"),
    ([msgpack.packb([1, 2, 3])], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "prompt": 42})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "token_ids": "1,2"})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "token_ids": [1], "evil": 1})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "bad id!", "token_ids": [1]})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "launch_missiles"})], "unknown_message"),
    ([msgpack.packb({"v": VERSION, "t": "tokens", "items": []})], "unknown_message"),  # a worker message
    ([msgpack.packb({"v": 99, "t": "ping"})], "version_mismatch"),
    ([b"x" * (MAX_MESSAGE_BYTES + 1)], "message_too_large"),
    ([encode(Generate("m1", token_ids=[1])), b"extra frame"], "bad_message"),
    ([encode(Generate("p1", token_ids=[1], params={"temperature": "hot"}))], "invalid_sampling"),
    ([encode(Generate("p2", token_ids=[1], params={"max_tokens": 0}))], "invalid_sampling"),
    ([encode(Generate("p3", token_ids=list(range(100)) * 400))], "prompt_too_long"),
]


def test_garbage_gets_a_coded_error_and_everyone_else_is_still_served(router):
    sock = raw_dealer(router.frontend)
    with Client(router.frontend) as client:
        stream = client.generate(token_ids=[5, 6], max_tokens=40)
        first = next(stream)
        for frames, code in GARBAGE:
            sock.send_multipart(frames)
            reply = decode(sock.recv())
            assert isinstance(reply, Error) and reply.code == code and reply.message, (frames[0][:60], reply)
            if code in ("invalid_sampling", "prompt_too_long") or frames[0].find(b"g1") >= 0:
                assert reply.request_id in ("p1", "p2", "p3", "g1")  # routed to the request that caused it
        tokens = list(first.token_ids) + [t for c in stream for t in c.token_ids]
        assert tokens == expected_tokens([5, 6], 40) and stream.result.finish_reason == "length"
        assert client.complete(token_ids=[9], max_tokens=3).token_ids == tuple(expected_tokens([9], 3))
    sock.close()
    assert router.proc.poll() is None


def test_cancel_and_a_vanished_client_free_the_request_at_the_worker(router):
    decode_worker = router.workers[1]
    decode_worker.step_s = 0.05
    with Client(router.frontend) as client:
        stream = client.generate(token_ids=[1], max_tokens=1000)
        next(stream)
        stream.close()
        deadline = time.monotonic() + 5
        while stream.request_id not in decode_worker.cancelled:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    sock = raw_dealer(router.frontend)  # sends a request and never pings: gone after client_timeout_s = 1 s
    sock.send(encode(Generate("vanish", token_ids=[3], params={"max_tokens": 1000})))
    sock.close(linger=2000)  # the request goes out, then the client is gone for good
    deadline = time.monotonic() + 5
    while "vanish" not in decode_worker.cancelled:
        assert time.monotonic() < deadline, router.log()[-2000:]
        time.sleep(0.05)
    assert '"client_gone"' in router.log()


def test_a_hung_worker_is_lost_within_3_s_and_a_new_one_serves(router):
    with Client(router.frontend) as client:
        router.workers[1].step_s = 0.2
        stream = client.generate(token_ids=[1], max_tokens=1000)
        next(stream)
        router.workers[1].stop()  # no more heartbeats, as after SIGKILL
        hung_s = time.monotonic()
        with pytest.raises(WorkerLost) as lost:
            for _ in stream:
                pass
        assert time.monotonic() - hung_s < 3.0 and lost.value.code == "worker_lost" and lost.value.result.token_ids
        with pytest.raises(RequestRefused, match="no_worker"):
            client.complete(token_ids=[1], max_tokens=2)
        router.workers.append(FakeWorker(router.backend, "decode").start())
        deadline = time.monotonic() + 5
        while sum(w["role"] == "decode" for w in client.status()["workers"]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.complete(token_ids=[4], max_tokens=3).token_ids == tuple(expected_tokens([4], 3))


def test_sigterm_drains_running_requests_then_exits_0(router):
    router.workers[1].step_s = 0.05
    with Client(router.frontend) as client:
        stream = client.generate(token_ids=[2], max_tokens=30)  # about 1.5 s of decoding
        next(stream)
        router.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(RequestRefused) as refused:
            client.complete(token_ids=[1], max_tokens=2)
        assert refused.value.code == "draining"
        assert len(list(stream)) == 29 and stream.result.finish_reason == "length"
    assert router.proc.wait(10) == 0


def test_second_signal_ends_running_requests_at_once(router):
    router.workers[1].step_s = 0.2
    sock = raw_dealer(router.frontend)
    sock.send(encode(Generate("long", token_ids=[2], params={"max_tokens": 1000}, stream=False)))
    time.sleep(0.5)
    router.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    router.proc.send_signal(signal.SIGINT)
    finished = decode(sock.recv())
    assert isinstance(finished, Finished) and finished.error["code"] == "server_shutdown"
    assert router.proc.wait(5) == 128 + signal.SIGINT
    sock.close()


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
    assert free_port()
