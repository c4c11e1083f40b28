"""A protocol-level stand-in for a worker, for the router's socket tests only (the end-to-end tests
run the real hmoe-worker processes). Deterministic: token i of a request is (sum(prompt) + i) % 256."""

from __future__ import annotations

import threading
import time

import zmq

from hmoe.runtime.protocol import (
    Adopt, Cancel, Prefill, Prefilled, Register, Tokens, WorkerPing, WorkerPong, decode, encode,
)  # fmt: skip


def expected_tokens(prompt_ids: list[int], max_tokens: int) -> list[int]:
    return [(sum(prompt_ids) + i) % 256 for i in range(max_tokens)]


class FakeWorker:
    """start() ↔ stop(); `silent` stops its heartbeats (a hung worker), `kill()` drops it like SIGKILL."""

    def __init__(self, backend: str, role: str, kv_capacity_tokens: int = 4096, max_batch: int = 8, step_s: float = 0.01,
                 heartbeat_s: float = 0.1):  # fmt: skip
        self.backend, self.role, self.step_s, self.heartbeat_s = backend, role, step_s, heartbeat_s
        self.register = Register(f"fake-{role}-{id(self):x}", role, 0, "cpu", {"name": "fake", "vocab_size": 256,
                                 "eos_token_ids": [], "max_position_embeddings": 8192}, kv_capacity_tokens, max_batch)  # fmt: skip
        self.running: dict[str, list] = {}  # request id -> [prompt ids, emitted, max_tokens]
        self.cancelled: list[str] = []
        self.pongs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> FakeWorker:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.backend)
        sock.send(encode(self.register))
        next_ping = next_step = time.monotonic()
        while not self._stop.is_set():
            if sock.poll(int(self.step_s * 1000)):
                self._handle(sock, decode(sock.recv()))
            now = time.monotonic()
            if now >= next_ping:
                sock.send(encode(WorkerPing(self.register.worker_id, 1000, len(self.running))))
                next_ping = now + self.heartbeat_s
            if now >= next_step and self.running:
                sock.send(encode(Tokens(self._step())))
                next_step = now + self.step_s
        sock.close()

    def _handle(self, sock, msg) -> None:
        match msg:
            case Prefill(request_id=rid, token_ids=ids, params=params):
                first = expected_tokens(ids, 1)[0]
                ends = params["max_tokens"] == 1
                sock.send(encode(Prefilled(rid, first, -1 if ends else 0, "fake-slots", len(ids))))
            case Adopt(request_id=rid, token_ids=ids, params=params):
                self.running[rid] = [ids, 1, params["max_tokens"]]
            case Cancel(request_id=rid):
                self.cancelled.append(rid)
                self.running.pop(rid, None)
            case WorkerPong():
                self.pongs += 1

    def _step(self) -> list[list]:
        items = []
        for rid, state in list(self.running.items()):
            ids, emitted, max_tokens = state
            token = expected_tokens(ids, emitted + 1)[-1]
            state[1] += 1
            done = state[1] >= max_tokens
            items.append([rid, token, "length" if done else None])
            if done:
                del self.running[rid]
        return items
