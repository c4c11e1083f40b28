"""Chaos: kill -9 of each process of a real `hmoe serve` under 16 streaming clients.

Each test asserts that every request ends (an answer or a typed, coded error) within 3 s of the kill
unless the policy keeps it alive (a killed prefill worker loses no request), that no KV block or
hand-off slot is left taken, and that new requests succeed once the process is back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers.serve import Served, serve

from hmoe.runtime import AsyncClient, Client, RouterError, RouterRestarted, WorkerLost
from hmoe.runtime.client import status_once
from hmoe.shm import ShmConfig

pytestmark = pytest.mark.slow
PACK = "chaos-test"
STREAMS = 16
END_WITHIN_S = 3.0
TOKENS = 80


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    yield from serve(tiny_models("deepseek_v3", "fp32"), tmp_path_factory.mktemp("chaos"), PACK)


def _pid(served: Served, name: str) -> int:
    """A child of hmoe serve by its module (the router) or role (workers), from ps."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(served.proc.pid)], capture_output=True, text=True)
    needle = "hmoe.runtime.router" if name == "router" else f"--role {name}"
    return next(int(line.split()[0]) for line in out.stdout.splitlines() if needle in line)


def _handoff_slots_free(served: Served) -> bool:
    from hmoe.workers.engine.kv_handoff import HandoffPool

    config = ShmConfig(prefix=served.prefix)
    pools = [HandoffPool.attach(name, config) for name in config.handoff_names()]
    try:
        return bool(pools) and all(pool.free_slots() == pool.num_slots for pool in pools if _alive(pool))
    finally:
        for pool in pools:
            pool.close()


def _alive(pool) -> bool:
    import numpy as np

    pid = int(np.frombuffer(pool._segment.buffer(8, 8), np.int64)[0])
    return os.path.exists(f"/proc/{pid}")


def _wait(predicate, what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _streams_through(served: Served, kill, after_kill=None) -> list[tuple[float, object]]:
    """16 streaming clients; once each has a token, `kill()`; each stream's (seconds after the kill it
    ended, its Result or the error it raised); then what `after_kill` (a coroutine function, started
    right after the kill) returned, if given."""
    killed_at: list[float] = []

    async def one(i: int, started: asyncio.Event, counter: list[int]):
        async with AsyncClient(served.endpoint) as client:
            stream = client.generate(f"Stream {i} tells a long story", max_tokens=TOKENS, ignore_eos=True)
            first = True
            try:
                async for _ in stream:
                    if first:
                        first = False
                        counter[0] += 1
                        if counter[0] == STREAMS:
                            started.set()
                outcome = stream.result
            except RouterError as exc:
                outcome = exc
            return time.monotonic(), outcome

    async def main():
        started, counter = asyncio.Event(), [0]
        tasks = [asyncio.ensure_future(one(i, started, counter)) for i in range(STREAMS)]
        await asyncio.wait_for(started.wait(), 120)
        kill()
        killed_at.append(time.monotonic())
        if after_kill is not None:
            tasks.append(asyncio.ensure_future(after_kill()))
        return await asyncio.gather(*tasks)

    ended = asyncio.run(main())
    streams = [(t - killed_at[0], outcome) for t, outcome in ended[:STREAMS]]
    return streams + ended[STREAMS:]


def _serves_again(served: Served) -> None:
    _wait(lambda: _handoff_slots_free(served), "a hand-off slot stayed taken")
    served.wait_kv_free()
    with Client(served.endpoint) as client:
        assert len(client.complete("After the chaos", max_tokens=4, ignore_eos=True).token_ids) == 4


def test_kill_9_of_the_router_ends_every_stream_with_router_restarted_then_serves(served):
    before = served.wait_ready()
    router = _pid(served, "router")
    ended = _streams_through(served, lambda: os.kill(router, signal.SIGKILL))
    late = [(round(t, 2), o) for t, o in ended if t > END_WITHIN_S or not isinstance(o, RouterRestarted)]
    assert not late, late
    print(f"router kill -9: {STREAMS} streams ended with router_restarted within {max(t for t, _ in ended):.2f} s")
    assert served.wait_ready() == before  # the same workers registered with the new router
    _serves_again(served)


def test_kill_9_of_the_decode_worker_ends_every_stream_with_worker_lost_then_serves(served):
    before = served.wait_ready()
    ended = _streams_through(served, lambda: os.kill(before["decode"], signal.SIGKILL))
    late = [(round(t, 2), o) for t, o in ended if t > END_WITHIN_S or not isinstance(o, WorkerLost)]
    assert not late, late
    print(f"decode kill -9: {STREAMS} streams ended with worker_lost within {max(t for t, _ in ended):.2f} s")
    served.wait_ready(since_pids={"decode": before["decode"]})
    _serves_again(served)


def test_kill_9_of_the_prefill_worker_loses_no_stream_and_new_requests_wait_for_its_restart(served):
    """Streams already decoding go on to their end; a request sent right after the kill waits in the queue
    (worker_wait_s) and is served by the replacement instead of being refused with no_worker."""
    before = served.wait_ready()

    async def during_restart():
        async with AsyncClient(served.endpoint) as client:
            return await client.complete("Sent while prefill restarts", max_tokens=4, ignore_eos=True)

    *ended, queued = _streams_through(served, lambda: os.kill(before["prefill"], signal.SIGKILL), during_restart)
    assert all(getattr(o, "finish_reason", None) == "length" and len(o.token_ids) == TOKENS for _, o in ended), ended
    assert queued.finish_reason == "length" and len(queued.token_ids) == 4
    assert served.wait_ready(since_pids={"prefill": before["prefill"]})["decode"] == before["decode"]
    _serves_again(served)
    assert status_once(served.endpoint)["running"] == 0


def test_hmoe_drain_stops_hmoe_serve_instead_of_restarting_its_router(served):
    """Last in this module: it stops the service."""
    with Client(served.endpoint) as client:
        stream = client.generate("Finish me first", max_tokens=30, ignore_eos=True)
        next(stream)
        env = dict(os.environ, HMOE_ROUTER_FRONTEND=served.endpoint)
        drain = subprocess.run(
            [sys.executable, "-m", "hmoe.runtime.cli", "drain", "--grace-s", "20"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert drain.returncode == 0 and "drained: the router has exited" in drain.stdout, drain.stdout + drain.stderr
        assert sum(len(c.token_ids) for c in stream) == 29 and stream.result.finish_reason == "length"
    assert served.proc.wait(60) == 0
    out = served.out_path.read_text()
    assert "router drained on request: stopping the service" in out and "router exited with status 0" not in out
