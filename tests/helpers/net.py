"""Helpers shared by the runtime tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from hmoe.runtime.protocol import MAX_MESSAGE_BYTES, MIN_VERSION, VERSION, Generate, encode

EOS = 256


@dataclass
class _Encoding:
    ids: list[int]


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is EOS (a special token: it decodes to nothing)."""

    def encode(self, text: str) -> _Encoding:
        return _Encoding(list(text.encode()))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RouterProcess:
    proc: object  # subprocess.Popen
    frontend: str
    backend: str
    log_path: object  # Path of its JSON log lines

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_router(tmp_path, *flags: str, env: dict | None = None, wait: bool = True) -> RouterProcess:
    """`python -m hmoe.runtime.router` on a free port with its own runtime dir; waits until it answers."""
    import os
    import subprocess
    import sys
    import time

    frontend = f"tcp://127.0.0.1:{free_port()}"
    runtime_dir = tmp_path / f"run-{frontend.rsplit(':', 1)[1]}"
    log_path = runtime_dir.with_suffix(".log")
    cmd = [
        sys.executable,
        "-m",
        "hmoe.runtime.router",
        "--frontend",
        frontend,
        "--runtime-dir",
        str(runtime_dir),
        *flags,
    ]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stderr=log_file, stdout=log_file, env={**os.environ, **(env or {})})
    router = RouterProcess(proc, frontend, f"ipc://{runtime_dir}/backend.sock", log_path)
    deadline = time.monotonic() + 30
    while wait and '"listening"' not in router.log():
        assert proc.poll() is None, router.log()
        assert time.monotonic() < deadline, "router did not start"
        time.sleep(0.05)
    return router


def with_fields(msg, **fields) -> bytes:
    """msg's frame with some fields replaced by raw wire values (values its dataclass would not take)."""
    return msgpack.packb({**msgpack.unpackb(encode(msg)), **fields})


# Frames a broken or hostile client may send, and the error code each must get back.
GARBAGE = [
    ([b"\xc1\xff not msgpack"], "bad_message"),
    ([msgpack.packb([1, 2, 3])], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "prompt": 42})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "token_ids": "1,2"})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "token_ids": [-1]})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "g1", "token_ids": b"\x01\x00\x00"})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "generate", "request_id": "bad id!", "token_ids": [1]})], "bad_message"),
    ([msgpack.packb({"v": VERSION, "t": "launch_missiles"})], "unknown_message"),
    ([msgpack.packb({"v": VERSION, "t": "tokens", "items": []})], "unknown_message"),  # a worker message
    ([msgpack.packb({"v": "2", "t": "ping"})], "version_mismatch"),
    ([msgpack.packb({"v": MIN_VERSION - 1, "t": "ping"})], "version_too_old"),
    ([b"x" * (MAX_MESSAGE_BYTES + 1)], "message_too_large"),
    ([encode(Generate("m1", token_ids=[1])), b"extra frame"], "bad_message"),
    ([with_fields(Generate("p1", token_ids=[1]), params={"temperature": "hot"})], "invalid_sampling"),
    ([with_fields(Generate("p2", token_ids=[1]), params={"max_tokens": 0})], "invalid_sampling"),
    ([with_fields(Generate("p2", token_ids=[1]), params={"best_of": 2})], "invalid_sampling"),  # never ignored
    ([encode(Generate("p3", token_ids=list(range(100)) * 400))], "prompt_too_long"),
]
