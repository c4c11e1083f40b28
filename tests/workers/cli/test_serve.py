"""End to end, as a user runs it: `hmoe serve` (router + real prefill and decode worker processes on
the tiny model, CPU, real shared memory) and clients over real sockets. Nothing of ours is faked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import zmq
from helpers.net import GARBAGE, free_port
from helpers.serve import Served, serve
from helpers.signals import foreground

from hmoe.runtime import AsyncClient, Client, RequestFailed, RequestRefused, WorkerLost
from hmoe.runtime.client import status_once
from hmoe.runtime.protocol import Cancel, Error, Finished, Generate, decode, encode
from hmoe.runtime.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
PACK = "serve-test"


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    yield from serve(tiny_models("deepseek_v3", "fp32"), tmp_path_factory.mktemp("serve"), PACK)


def _router_pid(served: Served) -> int:
    """The router's pid: `ps` finds the `hmoe.runtime.router` child of hmoe serve."""
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(served.proc.pid)], capture_output=True, text=True
    ).stdout
    return next(int(line.split()[0]) for line in out.splitlines() if "hmoe.runtime.router" in line)


PROMPTS = [f"Request {i}: the fox {'jumps ' * (i % 5)}over {i * 7} dogs." for i in range(32)]


def test_32_concurrent_streaming_clients_get_what_sequential_runs_get(served):
    with Client(served.endpoint) as client:
        sequential = [client.complete(p, max_tokens=8, ignore_eos=True) for p in PROMPTS]

    async def one(prompt: str):
        async with AsyncClient(served.endpoint) as client:  # a client of its own each
            return [c async for c in client.generate(prompt, max_tokens=8, ignore_eos=True)]

    async def all_at_once():
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    concurrent = asyncio.run(all_at_once())
    for seq, chunks in zip(sequential, concurrent):
        assert [t for c in chunks for t in c.token_ids] == list(seq.token_ids) and len(seq.token_ids) == 8
        assert "".join(c.text for c in chunks) == seq.text and seq.finish_reason == "length"
        assert seq.usage.prompt_tokens > 10 and seq.usage.ttft_s > 0 and seq.usage.tpot_s > 0
    served.wait_kv_free()


def test_sampled_requests_without_a_seed_are_served_as_users_send_them(served):
    """The most ordinary request: temperature set, no seed (it crashed the prefill worker once)."""
    before = served.wait_ready()
    with Client(served.endpoint) as client:
        for _ in range(3):
            result = client.complete("Hello there", max_tokens=8, temperature=0.7, ignore_eos=True)
            assert result.finish_reason == "length" and len(result.token_ids) == 8
        top = client.complete("Hello there", max_tokens=8, temperature=1.3, top_p=0.9, top_k=20, ignore_eos=True)
        assert len(top.token_ids) == 8
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "hmoe.runtime.cli",
            "generate",
            "--endpoint",
            served.endpoint,
            "--temperature",
            "0.7",
            "Hello there",
            "--max-tokens",
            "4",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0 and json.loads(cli.stdout)["usage"]["output_tokens"] >= 1, cli.stderr
    assert served.wait_ready() == before  # no worker died or was replaced
    served.wait_kv_free()


def test_cancel_mid_stream_and_before_the_first_token(served):
    with Client(served.endpoint) as client:
        stream = client.generate("Tell me everything", max_tokens=3000, ignore_eos=True)
        got = [next(stream) for _ in range(3)]
        stream.close()
        assert len(got) == 3
        served.wait_kv_free()  # the decode worker dropped it and freed its KV
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(served.endpoint)
    sock.send(encode(Generate("early", token_ids=list(range(2, 400)), params=SamplingParams(max_tokens=50))))
    sock.send(encode(Cancel("early")))
    finished = decode(sock.recv())
    assert isinstance(finished, Finished) and finished.finish_reason == "cancelled" and finished.token_ids == []
    sock.close(linger=0)
    served.wait_kv_free()


def test_a_client_that_vanishes_is_cancelled_everywhere(served):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(served.endpoint)
    sock.send(encode(Generate("vanishing", prompt="Hello", params=SamplingParams(max_tokens=3000, ignore_eos=True))))
    time.sleep(0.5)
    sock.close(linger=0)  # no cancel, no more pings: gone after client_timeout_s = 2 s
    assert status_once(served.endpoint)["running"] == 1
    served.wait_kv_free()
    assert '"client_gone"' in served.log_path.read_text()


def test_garbage_gets_coded_errors_while_others_are_served(served):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 10000)
    sock.connect(served.endpoint)
    with Client(served.endpoint) as client:
        stream = client.generate("Still here?", max_tokens=20, ignore_eos=True)
        for frames, code in GARBAGE:
            sock.send_multipart(frames)
            reply = decode(sock.recv())
            assert isinstance(reply, Error) and reply.code == code and reply.message, (frames[0][:60], reply)
            if code in ("invalid_sampling", "prompt_too_long"):
                assert reply.request_id in ("p1", "p2", "p3")  # routed to the request that caused it
        with pytest.raises(RequestRefused) as refused:
            client.complete("x", max_tokens=10_000)
        assert refused.value.code in ("context_too_long", "kv_capacity")
        assert sum(len(c.token_ids) for c in stream) == 20 and stream.result.finish_reason == "length"
    sock.close(linger=0)


def test_stop_strings_utf8_text_and_deadlines_over_the_wire(served):
    with Client(served.endpoint) as client:
        whole = client.complete("Hello world", max_tokens=30, ignore_eos=True)
        assert whole.text and "\ufffd" not in whole.text[-1:]  # never ends mid-character... unless the model says so
        stop = whole.text[5:8]
        cut = client.complete("Hello world", max_tokens=30, ignore_eos=True, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == whole.text[: whole.text.find(stop)]
        assert list(cut.token_ids) == list(whole.token_ids[: len(cut.token_ids)])
        late = client.complete("Hello world", max_tokens=3000, ignore_eos=True, timeout=0.5)
        assert late.finish_reason == "timeout" and 0 < len(late.token_ids) < 3000
    served.wait_kv_free()


def test_kill_9_of_the_decode_worker_gives_worker_lost_in_3_s_then_a_restart_serves(served):
    before = served.wait_ready()
    with Client(served.endpoint) as client:
        stream = client.generate("A long answer please", max_tokens=3000, ignore_eos=True)
        next(stream)
        os.kill(before["decode"], signal.SIGKILL)
        killed_s = time.monotonic()
        with pytest.raises(WorkerLost) as lost:
            for _ in stream:
                pass
        assert time.monotonic() - killed_s < 3.0 and lost.value.code == "worker_lost" and lost.value.result.token_ids
        after = served.wait_ready(since_pids={"decode": before["decode"]})  # hmoe serve restarted it
        assert after["prefill"] == before["prefill"]
        assert len(client.complete("Back again", max_tokens=5, ignore_eos=True).token_ids) == 5
    assert "decode exited with status -9; restarting it" in served.out_path.read_text()


def test_a_hung_prefill_worker_is_dropped_its_request_retried_when_it_comes_back(served):
    before = served.wait_ready()
    os.kill(before["prefill"], signal.SIGSTOP)  # hung: no heartbeats, no work, still alive
    try:
        with Client(served.endpoint) as client:
            stream = client.generate("Waiting for prefill", max_tokens=5, ignore_eos=True)
            deadline = time.monotonic() + 5
            while any(w["role"] == "prefill" for w in client.status()["workers"]):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(before["prefill"], signal.SIGCONT)  # its pongs are stale: it registers again
            assert sum(len(c.token_ids) for c in stream) == 5 and stream.result.finish_reason == "length"
    finally:
        os.kill(before["prefill"], signal.SIGCONT)
    assert served.wait_ready()["prefill"] == before["prefill"]


def test_router_drains_on_sigterm_and_comes_back_without_restarting_workers(served):
    before = served.wait_ready()
    router_pid = _router_pid(served)
    with Client(served.endpoint) as client:
        stream = client.generate("Finish me", max_tokens=500, ignore_eos=True)  # a few seconds of decoding
        next(stream)
        os.kill(router_pid, signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(RequestRefused) as refused:
            client.complete("New", max_tokens=2)
        assert refused.value.code == "draining"
        assert sum(len(c.token_ids) for c in stream) == 499 and stream.result.finish_reason == "length"
    deadline = time.monotonic() + 30
    while "router exited with status 0; restarting it" not in served.out_path.read_text():
        assert time.monotonic() < deadline, served.out_path.read_text()
        time.sleep(0.1)
    assert served.wait_ready() == before  # the same worker processes registered with the new router
    with Client(served.endpoint) as client:
        assert len(client.complete("After the restart", max_tokens=4, ignore_eos=True).token_ids) == 4


def test_a_second_signal_ends_running_requests_at_once(served):
    before = served.wait_ready()
    router_pid = _router_pid(served)
    with Client(served.endpoint) as client:
        stream = client.generate("Long", max_tokens=3000, ignore_eos=True)
        next(stream)
        os.kill(router_pid, signal.SIGTERM)
        time.sleep(0.3)
        os.kill(router_pid, signal.SIGINT)
        with pytest.raises(RequestFailed) as failed:
            for _ in stream:
                pass
        assert failed.value.code == "server_shutdown"
    deadline = time.monotonic() + 30
    while "router exited with status 130; restarting it" not in served.out_path.read_text():
        assert time.monotonic() < deadline, served.out_path.read_text()
        time.sleep(0.1)
    assert served.wait_ready() == before


def test_hmoe_generate_streams_and_ctrl_c_cancels_upstream_and_status_reports(served):
    hmoe = [sys.executable, "-m", "hmoe.runtime.cli"]
    as_json = subprocess.run(
        [*hmoe, "generate", "--endpoint", served.endpoint, "Hello", "--max-tokens", "6", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)
    assert answer["finish_reason"] in ("length", "stop") and answer["usage"]["output_tokens"] == len(
        answer["token_ids"]
    )
    shown = subprocess.run(
        [*hmoe, "generate", "--endpoint", served.endpoint, "Hello", "--max-tokens", "6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and shown.stdout.rstrip("\n") == answer["text"] and "tokens, " in shown.stderr
    long = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", *hmoe[1:], "generate", "--endpoint", served.endpoint, "Go on"]
        + ["--max-tokens", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=foreground,
    )
    deadline = time.monotonic() + 30
    while status_once(served.endpoint)["running"] == 0:
        assert time.monotonic() < deadline and long.poll() is None
        time.sleep(0.05)
    long.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        code = long.wait(30)
    except subprocess.TimeoutExpired:
        long.send_signal(signal.SIGABRT)  # -X faulthandler: every thread's stack, for the failure message
        long.wait(10)
        raise AssertionError(f"hmoe generate ignored Ctrl-C:\n{long.stderr.read()[-6000:]}") from None
    said = long.stderr.read()
    assert code == 130 and said.count("[cancelled]") == 1 and "Aborted" not in said, said
    served.wait_kv_free()
    status = subprocess.run(
        [*hmoe, "status", "--endpoint", served.endpoint, "--json"], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and {w["role"] for w in json.loads(status.stdout)["workers"]} == {"prefill", "decode"}
    down = subprocess.run(
        [*hmoe, "generate", "--port", str(free_port()), "Hi"], capture_output=True, text=True, timeout=60
    )
    assert down.returncode == 1 and "router_unreachable" in down.stderr and "Traceback" not in down.stderr


def test_status_agrees_with_itself_right_after_a_request_ends(served):
    from click.testing import CliRunner

    from hmoe.runtime.cli import main

    served.wait_kv_free()
    with Client(served.endpoint) as client:
        client.complete("Hello", max_tokens=8)
    shown = CliRunner().invoke(main, ["status", "--endpoint", served.endpoint, "--json"])  # at once
    status = json.loads(shown.output)
    assert status["running"] == 0 and status["queued"] == 0
    for worker in status["workers"]:  # their heartbeats say the same, not a beat behind
        assert worker["running"] == 0 and worker["kv_free_tokens"] == worker["kv_capacity_tokens"], status


def test_a_repeated_long_prefix_comes_from_the_prefix_cache_with_the_same_tokens(served):
    from click.testing import CliRunner

    from hmoe.runtime.cli import main

    prefix = f"{uuid.uuid4().hex} " + "The river runs under seven stone bridges to the sea. " * 12
    greedy = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    with Client(served.endpoint) as client:
        first = client.complete(prefix + "Tell me more.", **greedy)
        again = client.complete(prefix + "Tell me more.", **greedy)
        other = client.complete(prefix + "Now the bridges.", **greedy)
    assert first.usage.cached_tokens == 0
    assert again.token_ids == first.token_ids  # computed from cached KV: the same greedy answer
    assert first.usage.prompt_tokens - 16 <= again.usage.cached_tokens < first.usage.prompt_tokens
    assert 0.5 * other.usage.prompt_tokens < other.usage.cached_tokens <= again.usage.cached_tokens
    served.wait_kv_free()
    shown = CliRunner().invoke(main, ["status", "--endpoint", served.endpoint])
    assert shown.exit_code == 0 and "prefix cache " in shown.output and "hit rate " in shown.output, shown.output


def test_a_short_prompt_is_served_between_the_passes_of_a_long_one(served):
    """The long prompt prefills in 8 passes of 64 tokens; the short one, sent while it runs, is interleaved
    at the next pass boundary and ends before the long one's first token (without interleaving it waits
    for all eight)."""
    events: list[str] = []

    async def long_request(client: AsyncClient) -> None:
        async for _ in client.generate(token_ids=[(7 * i) % 200 + 2 for i in range(500)], max_tokens=2):
            events.append("long token")

    async def main() -> None:
        async with AsyncClient(served.endpoint) as client:
            long = asyncio.ensure_future(long_request(client))
            while not any(w["busy"] for w in (await client.status())["workers"] if w["role"] == "prefill"):
                await asyncio.sleep(0.005)
            await client.complete(token_ids=[5, 6, 7, 8, 9], max_tokens=1)
            events.append("short done")
            await long

    asyncio.run(main())
    assert events[0] == "short done", events


def test_serve_with_device_cuda_on_a_machine_without_it_stops_at_once_with_the_reason(tiny_models, tmp_path):
    """The issue's case: `hmoe serve --device cuda` without CUDA used to crash-loop its workers 7 times;
    now it stops before loading anything: exit 3, one line with the code, no pack left behind."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    prefix = f"hmoe-test-{os.getpid()}-nocuda."
    env = dict(os.environ, HMOE_SHM_PREFIX=prefix, HMOE_ROUTER_RUNTIME_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "hmoe.runtime.cli", "serve", str(tiny_models("deepseek_v3", "fp32"))]
        + ["--port", str(free_port()), "--pack", "serve-nocuda", "--device", "cuda"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert "[device_unavailable]" in done.stderr and "Traceback" not in done.stderr, done.stderr
    from hmoe.shm import ShmConfig

    assert ShmConfig(prefix=prefix).pack_names() == []
