"""Real prefill and decode worker processes over real ZeroMQ sockets and real shared memory.

The workers run the routed experts on the CPU kernels over the weight pack (the production path);
the reference is the same pack's weights with torch experts in this process (`hmoe run --pack`).

The test plays the router: it binds the backend socket, answers heartbeats, sends Prefill, hands
the Prefilled KV to the decode worker with Adopt, and collects Tokens.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import zmq
from helpers.net import with_fields

from hmoe.runtime import protocol
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.shm import ShmConfig
from hmoe.workers.engine.kv_handoff import HandoffPool
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.generate import generate
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.pack_loader import load_pack
from hmoe.workers.weights.pack_source import PackSource

pytestmark = pytest.mark.slow


class Harness:
    """The router's side of the backend socket, reduced to what the tests need: a thread owns the
    socket, answers heartbeats (as the router does, whatever the test is doing), queues everything
    else for the test and sends what the test hands it."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.outbox: queue.Queue = queue.Queue()
        self.inbox: queue.Queue = queue.Queue()
        self.stash: list = []
        self.workers: dict[str, bytes] = {}  # role -> identity
        self.registered: dict[str, protocol.Register] = {}
        self.pings: dict[str, protocol.WorkerPing] = {}
        self.running = True
        self.silent = False  # True: play a dead router (no pongs)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            while not self.outbox.empty():
                self.sock.send_multipart(self.outbox.get())
            if not self.sock.poll(10):
                continue
            identity, frame = self.sock.recv_multipart()
            msg = protocol.decode(frame)
            if isinstance(msg, protocol.WorkerPing):
                self.pings[msg.worker_id.split("-")[0]] = msg
                if not self.silent:
                    self.sock.send_multipart([identity, protocol.encode(protocol.WorkerPong())])
                continue
            if isinstance(msg, protocol.Register):
                self.workers[msg.role] = identity
                self.registered[msg.role] = msg
            self.inbox.put(msg)

    def pump(self, until, kinds: tuple = (object,), timeout_s: float = 120.0) -> list:
        """Collect messages of `kinds` until until(messages) is true; others wait for their pump."""
        got, deadline = [], time.monotonic() + timeout_s
        for msg in [m for m in self.stash if isinstance(m, kinds)]:
            self.stash.remove(msg)
            got.append(msg)
        while not until(got):
            try:
                msg = self.inbox.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise AssertionError(f"timed out; got {got}") from None
            (got if isinstance(msg, kinds) else self.stash).append(msg)
        return got

    def send(self, role: str, msg) -> None:
        self.send_raw(role, protocol.encode(msg))

    def send_raw(self, role: str, frame: bytes) -> None:
        self.outbox.put([self.workers[role], frame])

    def prefill(self, request_id: str, token_ids: list[int], params: SamplingParams) -> protocol.Prefilled:
        self.send("prefill", protocol.Prefill(request_id, token_ids, params))
        (done,) = self.pump(bool, (protocol.Prefilled, protocol.RequestError))
        assert isinstance(done, protocol.Prefilled), done
        return done

    def adopt(self, prefilled: protocol.Prefilled, token_ids: list[int], params: SamplingParams) -> None:
        self.send(
            "decode",
            protocol.Adopt(
                prefilled.request_id,
                len(token_ids),
                prefilled.first_token,
                prefilled.slot,
                prefilled.segment,
                params,
                prefilled.generation,
            ),
        )

    def decode_until_done(self, first_tokens: dict[str, int]) -> dict[str, list[int]]:
        """Collect Tokens until every request finished; return request_id -> generated ids."""
        out = {rid: [tok] for rid, tok in first_tokens.items()}
        open_ids = set(first_tokens)

        def done(got):
            for msg in got[len(done.seen) :]:
                assert isinstance(msg, protocol.Tokens), msg
                for rid, token, reason in ((i.request_id, i.token, i.finish_reason) for i in msg.items):
                    if rid not in out:
                        continue  # a cancelled request's last tokens, sent before the cancel arrived
                    out[rid].append(token)
                    if reason is not None:
                        open_ids.discard(rid)
            done.seen = list(got)
            return not open_ids

        done.seen = []
        self.pump(done, (protocol.Tokens, protocol.RequestError))
        return out

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close(linger=0)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.fixture(
    scope="module",
    params=[
        "cpu",
        "cpu,cpu",
        pytest.param("cuda", marks=pytest.mark.gpu),
        pytest.param("cuda:0,cuda:1", marks=[pytest.mark.gpu, TWO_GPUS]),
    ],
)
def served(request, tiny_models, tmp_path_factory):
    """A pack of the tiny DeepSeek model, a harness router, and one prefill + one decode worker
    (on the CPU; on the CPU with the prefill worker spanning two ranks, each streaming half of every
    layer's experts; and on a GPU where there is one: the same tokens every way, fp32)."""
    model_dir = tiny_models("deepseek_v3", "fp32")
    prefix = f"hmoe-test-{uuid.uuid4().hex[:8]}."
    shm = ShmConfig(prefix=prefix)
    pack, _ = load_pack(model_dir, "workers", config=shm)
    endpoint = f"ipc://{tmp_path_factory.mktemp('ipc')}/backend.sock"
    harness = Harness(endpoint)
    env = dict(
        os.environ,
        HMOE_SHM_PREFIX=prefix,
        HMOE_WORKER_EXPERTS="cpu",
        HMOE_WORKER_KV_CACHE_GIB="0.01",
        HMOE_ROUTER_HEARTBEAT_INTERVAL_S="0.5",
        HMOE_WORKER_PREFILL_CHUNK_TOKENS="16",
        HMOE_WORKER_HANDOFF_SLOTS="3",
        HMOE_WORKER_HANDOFF_SLOT_TOKENS="256",
        HMOE_WORKER_DEVICE=request.param.split(",")[0],
        HMOE_WORKER_DEVICES=request.param,
        HMOE_WORKER_DTYPE="fp32",
        HMOE_WORKER_PREFILL_EXPERTS="stream",  # prompts of >= 20 tokens stream their experts, shorter ones don't
        HMOE_WORKER_STREAM_MIN_TOKENS="20",
        HMOE_ROUTER_STUCK_AFTER_S="10",  # a hung prefill rank fails its group's collectives after this
    )
    procs = {}

    def start(role):
        procs[role] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hmoe.workers.engine.worker",
                "--role",
                role,
                "--pack",
                "workers",
                "--router",
                endpoint,
            ],
            env=env,
        )
        harness.pump(lambda got: any(m.role == role for m in got), (protocol.Register,))

    # The reference is `hmoe run --pack`: the same pack's weights, torch experts, in this process.
    source = PackSource.attach("workers", shm)
    model = load_model(source, "cpu", "fp32")
    start("prefill")
    start("decode")
    harness.shm = shm
    yield harness, procs, start, model
    for proc in procs.values():  # SIGTERM drains: both exit 0 and the prefill unlinks its hand-off segment
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(timeout=60) for proc in procs.values()] == [0, 0]
    assert shm.handoff_names() == []  # the hand-off segment lives under the [shm] prefix, unlinked on exit
    harness.close()
    source.close()
    pack.close()
    from hmoe.shm.registry import remove_pack

    remove_pack("workers", shm, force=True)


def _offline(model, prompt, params):
    kv = KVPool(model.config, 64, 16, torch.float32, torch.device("cpu"))
    return list(generate(model, kv, prompt, params).token_ids)


def _run(harness, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    """Prefill every request, then decode them all together."""
    first = {}
    for rid, (prompt, params) in requests.items():
        done = harness.prefill(rid, prompt, params)
        assert done.slot >= 0 and done.prompt_len == len(prompt)
        first[rid] = done.first_token
        harness.adopt(done, prompt, params)
    return harness.decode_until_done(first)


def _all_free(harness):
    """Every KV block of both workers (as their heartbeats report) and every hand-off slot is free."""

    def free(_):
        return all(
            harness.pings.get(role) is not None
            and harness.pings[role].kv_free_tokens == harness.registered[role].kv_capacity_tokens
            for role in ("prefill", "decode")
        )

    harness.pings.clear()
    deadline = time.monotonic() + 10
    while not free(None):
        assert time.monotonic() < deadline, harness.pings
        time.sleep(0.05)
    pool = HandoffPool.attach(f"kv-handoff.prefill-{harness.registered['prefill'].pid}", harness.shm)
    try:
        assert pool.free_slots() == pool.num_slots
    finally:
        pool.close()


def test_prefill_then_decode_gives_hmoe_run_tokens(served):
    harness, procs, _, model = served
    prompt = [5, 9, 2, 44, 17, 3, 8, 21, 11, 30, 2, 7, 19, 4, 13, 6, 22, 9, 1, 15, 28, 33]  # 22 tokens: two chunks
    for params in (
        SamplingParams(max_tokens=20, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.8, seed=9),
    ):
        out = _run(harness, {"one": (prompt, params)})
        assert out["one"] == _offline(model, prompt, params)


def test_eight_mixed_requests_batched_equal_alone(served):
    harness, procs, _, model = served
    gen = torch.Generator().manual_seed(3)
    requests = {}
    for i in range(8):
        length = [1, 3, 7, 12, 20, 33, 5, 40][i]
        prompt = torch.randint(2, model.config.vocab_size, (length,), generator=gen).tolist()
        requests[f"r{i}"] = (prompt, SamplingParams(max_tokens=6 + 2 * i, ignore_eos=True))
    together = _run(harness, requests)
    for rid, (prompt, params) in requests.items():
        assert together[rid] == _offline(model, prompt, params), rid
    _all_free(harness)


def test_cancel_frees_kv_and_slots_and_bad_frames_get_error_replies(served):
    harness, procs, _, model = served
    params = SamplingParams(max_tokens=200, ignore_eos=True)
    done = harness.prefill("long", list(range(2, 30)), params)
    harness.adopt(done, list(range(2, 30)), params)
    harness.pump(bool, (protocol.Tokens,))
    harness.send("decode", protocol.Cancel("long"))
    adopted = harness.prefill("adopted", [3, 4, 5], params)  # adopted, then cancelled (maybe before its first step)
    harness.adopt(adopted, [3, 4, 5], params)
    harness.send("decode", protocol.Cancel("adopted"))
    handed = harness.prefill("handed", [6, 7], params)  # cancelled between hand-off and adoption
    harness.send("prefill", protocol.Cancel("handed"))
    harness.send("prefill", protocol.Cancel("never-seen"))  # a cancel before the request arrives is harmless
    status = protocol.Status([], 0, 0, protocol.KVStatus(0, 0, 0), protocol.Throughput(0.0, 60.0, {}))
    for role, frame in (("decode", b"\xc1garbage"), ("prefill", protocol.encode(status))):
        harness.send_raw(role, frame)
        (err,) = harness.pump(bool, (protocol.Error,))
        assert err.code in ("bad_message", "unknown_message")
    assert adopted.slot >= 0 and handed.slot >= 0
    _all_free(harness)
    # Still serving after all that.
    out = _run(harness, {"after": ([7, 8, 9], SamplingParams(max_tokens=5, ignore_eos=True))})
    assert out["after"] == _offline(model, [7, 8, 9], SamplingParams(max_tokens=5, ignore_eos=True))


def test_what_a_request_carries_fails_that_request_never_the_worker(served):
    harness, procs, _, model = served
    unseeded = SamplingParams(max_tokens=4, temperature=0.7)  # the router seeds every request; a worker refuses it
    ok = SamplingParams(max_tokens=4)
    for role, rid, frame in (
        ("prefill", "unseeded", protocol.encode(protocol.Prefill("unseeded", [5, 6, 7], unseeded))),
        (
            "decode",
            "unseeded",
            protocol.encode(protocol.Adopt("unseeded", 3, 9, 0, "no-such-segment", unseeded)),
        ),
        ("prefill", "bad", with_fields(protocol.Prefill("bad", [5, 6], ok), params={"temperature": "hot"})),
        ("decode", "bad", with_fields(protocol.Adopt("bad", 2, 9, 0, "no-such-segment", ok), params={"top_p": 7})),
    ):
        harness.send_raw(role, frame)
        (err,) = harness.pump(bool, (protocol.RequestError,))
        assert (err.request_id, err.code) == (rid, "invalid_sampling") and err.message
    assert all(proc.poll() is None for proc in procs.values())
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=11)
    assert _run(harness, {"after": ([7, 8, 9], params)})["after"] == _offline(model, [7, 8, 9], params)


def test_killing_prefill_mid_prompt_leaves_decode_serving(served):
    harness, procs, start, model = served
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    prompt = list(range(2, 20))
    done = harness.prefill("survivor", prompt, params)
    harness.adopt(done, prompt, params)
    harness.send("prefill", protocol.Prefill("victim", list(range(2, 250)), params))
    procs["prefill"].send_signal(signal.SIGKILL)
    procs["prefill"].wait()
    out = harness.decode_until_done({"survivor": done.first_token})
    assert out["survivor"] == _offline(model, prompt, params)
    start("prefill")  # a restarted prefill worker serves again
    again = _run(harness, {"again": (prompt, SamplingParams(max_tokens=4, ignore_eos=True))})
    assert again["again"] == _offline(model, prompt, SamplingParams(max_tokens=4, ignore_eos=True))


def test_a_silent_router_makes_workers_register_again(served):
    """Paranoid Pirate, worker side: no pongs for interval x liveness -> drop requests, new worker id."""
    harness, procs, _, model = served
    before = dict(harness.registered)
    params = SamplingParams(max_tokens=500, ignore_eos=True)
    done = harness.prefill("orphan", [4, 5, 6], params)
    harness.adopt(done, [4, 5, 6], params)
    harness.silent = True
    again = harness.pump(lambda got: {m.role for m in got} == {"prefill", "decode"}, (protocol.Register,), timeout_s=30)
    harness.silent = False
    for msg in again:
        assert msg.worker_id != before[msg.role].worker_id and msg.pid == before[msg.role].pid
    _all_free(harness)  # the decode worker dropped "orphan" and freed its KV
    out = _run(harness, {"after": ([7, 8], SamplingParams(max_tokens=4, ignore_eos=True))})
    assert out["after"] == _offline(model, [7, 8], SamplingParams(max_tokens=4, ignore_eos=True))


def _follower(pid: int) -> int:
    """The pid of the prefill worker's rank-1 process (a spawned child; the other child is multiprocessing's
    resource tracker)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return next(c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_lost_or_hung_prefill_rank_restarts_the_worker_whole_and_a_lost_worker_ends_its_ranks(served, request):
    if "," not in request.node.callspec.params["served"]:
        pytest.skip("a prefill worker on one device has no other ranks")
    harness, procs, start, model = served
    os.kill(_follower(procs["prefill"].pid), signal.SIGKILL)
    assert procs["prefill"].wait(timeout=30) == 1  # rank_lost at its next command (a ping when idle): restart
    start("prefill")
    prompt, params = list(range(3, 40)), SamplingParams(max_tokens=4, ignore_eos=True)  # 37 tokens: streamed
    assert _run(harness, {"again": (prompt, params)})["again"] == _offline(model, prompt, params)
    follower = _follower(procs["prefill"].pid)
    procs["prefill"].send_signal(signal.SIGKILL)
    procs["prefill"].wait()
    assert _gone(follower, 30)  # its broadcast fails once rank 0 is gone
    start("prefill")
    follower = _follower(procs["prefill"].pid)
    os.kill(follower, signal.SIGSTOP)  # hung, not dead: the pass's all-reduce waits out the group's timeout
    started = time.monotonic()
    harness.send("prefill", protocol.Prefill("hung", prompt, params))
    assert procs["prefill"].wait(timeout=60) == 1 and time.monotonic() - started < 30
    assert _gone(follower, 5)  # the worker killed it on its way out
    start("prefill")
